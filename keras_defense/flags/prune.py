"""kd-prune's and kd-augment's flags: PruneConfig and AugmentConfig.

They reuse the training flags of ``common`` and ``train``."""

from __future__ import annotations

from absl import flags

from keras_defense import data
from keras_defense.defenses import logits_augmentation as _la
from keras_defense.flags import common
from keras_defense.flags import train as train_flags

FLAGS = flags.FLAGS

# --- pruning and logits augmentation ---------------------------------------
# (kd-prune, kd-augment; reuse the data/training/export flags above:
# --learning_rate, --optimizer, --momentum, --nesterov, --lr_decay_epochs,
# --lr_decay_factor, --batch_size, --run_dir, --export_dir, --export_version,
# --seed, --dataset, --train_limit, --test_limit, --validation_size.)

flags.DEFINE_string("base_model_path", None,
                    "SavedModel to transform: M0 for kd-prune (saved_models/mnist_m0/1), "
                    "M1 for kd-augment (saved_models/mnist_m1/1). kd-prune also takes your own "
                    "model: a Keras 3 or tf_keras .keras file or an .h5 file.")
flags.DEFINE_float("dense_sparsity", 0.90,
                   "Final fraction of zeroed weights in every Dense kernel, [0, 1). Design "
                   "card: 0.90 (keep 10%); authors' 20 rounds of 10%: 1-0.9^20 = 0.878.")
flags.DEFINE_float("conv_sparsity", 0.95,
                   "Final fraction of zeroed weights in every Conv2D kernel, [0, 1). Design "
                   "card: 0.95 (keep 5%); authors' 20 rounds of 5%: 1-0.95^20 = 0.642.")
flags.DEFINE_float("initial_sparsity", 0.0, "Sparsity when pruning begins, [0, 1).")
flags.DEFINE_bool("prune_logits", True,
                  "Prune the logits Dense layer too (design card: all FC layers).")
flags.DEFINE_float("finetune_dropout", None,
                   "Dropout rate while fine-tuning the pruned model (default: the base "
                   "model's, C&W 0.5). No effect at inference.")
common.define_nonnegative("pruning_begin_epoch", 0.0,
                          "Fine-tuning epoch (may be fractional) at which pruning starts.")
common.define_nonnegative("pruning_end_epoch", 4.0,
                          "Epoch at which the final sparsity is reached (PolynomialDecay, power "
                          "3).")
common.define_count("pruning_frequency", 100, "Steps between mask updates.")
common.define_count("finetune_epochs", 8, "Epochs of fine-tuning while/after pruning.")
flags.DEFINE_string("report_path", None,
                    "Compression report prefix: writes <prefix>.json and <prefix>.md "
                    "(e.g. reports/compression/mnist_m1).")
flags.DEFINE_enum("transform", "logits_augmentation", list(_la.TRANSFORMS),
                  "logits_augmentation: logits kernel W <- (1+eps)W (the defense's M2); "
                  "gradient_inhibition: every Dense kernel W <- W + eps*sign(W) (Liu et al. "
                  "ASP-DAC'18).")
common.define_nonnegative("logits_epsilon", 20.0,
                          "Logits augmentation eps, W <- (1+eps)W. Authors' code recommends 20 for "
                          "MNIST and 10 for CIFAR-10; their later default was 100.")
common.define_nonnegative("inhibition_epsilon", _la.GRADIENT_INHIBITION_EPSILON,
                          "Gradient inhibition eps, W <- W + eps*sign(W) (Liu et al.: 0.1).")
flags.register_validator("dense_sparsity", lambda v: 0 <= v < 1,
                         "--dense_sparsity must be in [0, 1).")
flags.register_validator("conv_sparsity", lambda v: 0 <= v < 1,
                         "--conv_sparsity must be in [0, 1).")
flags.register_validator("initial_sparsity", lambda v: 0 <= v < 1,
                         "--initial_sparsity must be in [0, 1).")


def prune_config(fv=None):
  """The PruneConfig the pruning flags describe."""
  fv = FLAGS if fv is None else fv
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top  (imports tfmot)
  name = common.dataset_name(fv)
  return pruning.PruneConfig(
      base_model_path=fv.base_model_path or f"saved_models/{data.slug(name)}_m0/1",
      dataset=name, run_dir=fv.run_dir or f"runs/{data.slug(name)}_prune",
      dense_sparsity=fv.dense_sparsity, conv_sparsity=fv.conv_sparsity,
      initial_sparsity=fv.initial_sparsity, prune_logits=fv.prune_logits,
      finetune_dropout=fv.finetune_dropout,
      pruning_begin_epoch=fv.pruning_begin_epoch,
      pruning_end_epoch=fv.pruning_end_epoch,
      pruning_frequency=fv.pruning_frequency, finetune_epochs=fv.finetune_epochs,
      batch_size=fv.batch_size, optimizer=fv.optimizer,
      learning_rate=fv.learning_rate, momentum=fv.momentum, nesterov=fv.nesterov,
      lr_decay_epochs=tuple(int(e) for e in fv.lr_decay_epochs),
      lr_decay_factor=fv.lr_decay_factor, seed=fv.seed,
      train_limit=fv.train_limit, test_limit=fv.test_limit,
      validation_size=fv.validation_size, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, export_dir=fv.export_dir,
      export_version=fv.export_version, report_path=fv.report_path,
      deterministic=fv.deterministic, strategy=fv.strategy,
      num_cpu_devices=fv.num_cpu_devices, verbose=2,  # one log line per epoch
      adversarial=train_flags.adversarial_spec(fv), certified=train_flags.certified_spec(fv))


def augment_config(fv=None) -> _la.AugmentConfig:
  """The AugmentConfig the augmentation flags describe."""
  fv = FLAGS if fv is None else fv
  name = common.dataset_name(fv)
  return _la.AugmentConfig(
      base_model_path=fv.base_model_path or f"saved_models/{data.slug(name)}_m1/1",
      transform=fv.transform, logits_epsilon=fv.logits_epsilon,
      inhibition_epsilon=fv.inhibition_epsilon, dataset=name,
      test_limit=fv.test_limit, data_dir=fv.data_dir, manual_dir=fv.manual_dir,
      export_dir=fv.export_dir, export_version=fv.export_version)
