"""Flag definitions shared by the keras-defense binaries, each defined once.

Every flag is optional (has a default) so tests can import this module; range
checks are absl validators, so a bad value stops the binary with one line
naming the flag. A flag is named like the config field it fills. Library code
never reads FLAGS: binaries turn flags into a config with the ``*_config()``
functions here.
"""

from __future__ import annotations

from absl import flags

from keras_defense import data
from keras_defense import models
from keras_defense import training

FLAGS = flags.FLAGS

# --- data -------------------------------------------------------------------
flags.DEFINE_string("dataset", "mnist",
                    "tfds image-classification dataset (mnist, fashion_mnist, cifar10, ...).")
flags.DEFINE_string("data_dir", None, "tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", None,
                    "Folder with the dataset's official files (e.g. cifar-10-binary.tar.gz). "
                    "MNIST needs none: the package carries its files.")
flags.DEFINE_integer("validation_size", data.DEFAULT_VALIDATION_SIZE,
                     "Training examples held out for validation (C&W: 5000).", lower_bound=0)
flags.DEFINE_integer("train_limit", None, "Use only this many training examples.", lower_bound=1)
flags.DEFINE_integer("test_limit", None, "Use only this many test/validation examples.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed for data order, weights and attacks.")
flags.DEFINE_bool("deterministic", False, "Enable TensorFlow op determinism (slower).")

# --- model and training -----------------------------------------------------
flags.DEFINE_enum("model", None, list(models.MODEL_NAMES),
                  "Architecture; default: the paper's model for --dataset.")
flags.DEFINE_string("run_dir", None, "Run directory: checkpoints, TensorBoard, results.")
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Batch size (C&W: 128).", lower_bound=1)
flags.DEFINE_enum("optimizer", "sgd", list(training.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 0.05, "Initial learning rate.", lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum (C&W: 0.9).", lower_bound=0.0, upper_bound=0.999)
flags.DEFINE_bool("nesterov", True, "Nesterov momentum (C&W: true).")
flags.DEFINE_list("lr_decay_epochs", ["5", "8"],
                  "Epochs at which the learning rate is multiplied by --lr_decay_factor.")
flags.DEFINE_float("lr_decay_factor", 0.2, "Step decay factor in (0, 1].")
flags.DEFINE_float("dropout", 0.5, "Dropout after the first Dense layer (C&W: 0.5).")
flags.DEFINE_enum("compute_dtype", "float32", list(training.COMPUTE_DTYPES),
                  "float32, or bfloat16 (Keras mixed_bfloat16; variables stay float32).")
flags.DEFINE_string("export_dir", None,
                    "SavedModel base folder, e.g. saved_models/mnist_m0 (TF Serving layout <base>/<version>/).")
flags.DEFINE_integer("export_version", None, "SavedModel version (default: next free).", lower_bound=1)

flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator("lr_decay_factor", lambda v: 0 < v <= 1,
                         "--lr_decay_factor must be in (0, 1].")
flags.register_validator("dropout", lambda v: 0 <= v < 1, "--dropout must be in [0, 1).")
flags.register_validator(
    "lr_decay_epochs", lambda v: all(s.strip().isdigit() and int(s) >= 1 for s in v),
    "--lr_decay_epochs must be a comma-separated list of epochs >= 1.")


def train_config() -> training.TrainConfig:
  """The TrainConfig the training flags describe."""
  return training.TrainConfig(
      dataset=FLAGS.dataset, model=FLAGS.model,
      run_dir=FLAGS.run_dir or f"runs/{FLAGS.dataset}_train",
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
      nesterov=FLAGS.nesterov,
      lr_decay_epochs=tuple(int(e) for e in FLAGS.lr_decay_epochs),
      lr_decay_factor=FLAGS.lr_decay_factor, dropout=FLAGS.dropout,
      seed=FLAGS.seed, train_limit=FLAGS.train_limit, test_limit=FLAGS.test_limit,
      validation_size=FLAGS.validation_size, data_dir=FLAGS.data_dir,
      manual_dir=FLAGS.manual_dir, export_dir=FLAGS.export_dir,
      export_version=FLAGS.export_version, compute_dtype=FLAGS.compute_dtype,
      deterministic=FLAGS.deterministic)


# --- pruning and logits augmentation ---------------------------------------
# (kd-prune, kd-augment; reuse the data/training/export flags above:
# --learning_rate, --optimizer, --momentum, --nesterov, --lr_decay_epochs,
# --lr_decay_factor, --batch_size, --run_dir, --export_dir, --export_version,
# --seed, --dataset, --train_limit, --test_limit, --validation_size.)
from keras_defense import logits_augmentation as _la  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_string("base_model_path", None,
                    "SavedModel to transform: M0 for kd-prune (saved_models/mnist_m0/1), "
                    "M1 for kd-augment (saved_models/mnist_m1/1).")
flags.DEFINE_float("dense_sparsity", 0.90,
                   "Final fraction of zeroed weights in every Dense kernel, [0, 1). Design "
                   "card: 0.90 (keep 10%); authors' 20 rounds of 10%: 1-0.9^20 = 0.878.")
flags.DEFINE_float("conv_sparsity", 0.95,
                   "Final fraction of zeroed weights in every Conv2D kernel, [0, 1). Design "
                   "card: 0.95 (keep 5%); authors' 20 rounds of 5%: 1-0.95^20 = 0.642.")
flags.DEFINE_float("initial_sparsity", 0.0, "Sparsity when pruning begins, [0, 1).")
flags.DEFINE_bool("prune_logits", True,
                  "Prune the logits Dense layer too (design card: all FC layers).")
flags.DEFINE_float("pruning_begin_epoch", 0.0,
                   "Fine-tuning epoch (may be fractional) at which pruning starts.", lower_bound=0.0)
flags.DEFINE_float("pruning_end_epoch", 4.0,
                   "Epoch at which the final sparsity is reached (PolynomialDecay, power 3).",
                   lower_bound=0.0)
flags.DEFINE_integer("pruning_frequency", 100, "Steps between mask updates.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 8, "Epochs of fine-tuning while/after pruning.",
                     lower_bound=1)
flags.DEFINE_string("report_path", None,
                    "Compression report prefix: writes <prefix>.json and <prefix>.md "
                    "(e.g. reports/compression/mnist_m1).")
flags.DEFINE_enum("transform", "logits_augmentation", list(_la.TRANSFORMS),
                  "logits_augmentation: logits kernel W <- (1+eps)W (the defense's M2); "
                  "gradient_inhibition: every Dense kernel W <- W + eps*sign(W) (Liu et al. "
                  "ASP-DAC'18).")
flags.DEFINE_float("logits_epsilon", 20.0,
                   "Logits augmentation eps, W <- (1+eps)W. Authors' code recommends 20 for "
                   "MNIST and 10 for CIFAR-10; their later default was 100.", lower_bound=0.0)
flags.DEFINE_float("inhibition_epsilon", _la.GRADIENT_INHIBITION_EPSILON,
                   "Gradient inhibition eps, W <- W + eps*sign(W) (Liu et al.: 0.1).",
                   lower_bound=0.0)
flags.register_validator("dense_sparsity", lambda v: 0 <= v < 1,
                         "--dense_sparsity must be in [0, 1).")
flags.register_validator("conv_sparsity", lambda v: 0 <= v < 1,
                         "--conv_sparsity must be in [0, 1).")
flags.register_validator("initial_sparsity", lambda v: 0 <= v < 1,
                         "--initial_sparsity must be in [0, 1).")


def prune_config():
  """The PruneConfig the pruning flags describe."""
  from keras_defense import pruning  # pylint: disable=g-import-not-at-top  (imports tfmot)
  return pruning.PruneConfig(
      base_model_path=FLAGS.base_model_path or f"saved_models/{FLAGS.dataset}_m0/1",
      dataset=FLAGS.dataset, run_dir=FLAGS.run_dir or f"runs/{FLAGS.dataset}_prune",
      dense_sparsity=FLAGS.dense_sparsity, conv_sparsity=FLAGS.conv_sparsity,
      initial_sparsity=FLAGS.initial_sparsity, prune_logits=FLAGS.prune_logits,
      pruning_begin_epoch=FLAGS.pruning_begin_epoch,
      pruning_end_epoch=FLAGS.pruning_end_epoch,
      pruning_frequency=FLAGS.pruning_frequency, finetune_epochs=FLAGS.finetune_epochs,
      batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer,
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum, nesterov=FLAGS.nesterov,
      lr_decay_epochs=tuple(int(e) for e in FLAGS.lr_decay_epochs),
      lr_decay_factor=FLAGS.lr_decay_factor, seed=FLAGS.seed,
      train_limit=FLAGS.train_limit, test_limit=FLAGS.test_limit,
      validation_size=FLAGS.validation_size, data_dir=FLAGS.data_dir,
      manual_dir=FLAGS.manual_dir, export_dir=FLAGS.export_dir,
      export_version=FLAGS.export_version, report_path=FLAGS.report_path,
      deterministic=FLAGS.deterministic, verbose=2)  # one log line per epoch


def augment_config() -> _la.AugmentConfig:
  """The AugmentConfig the augmentation flags describe."""
  return _la.AugmentConfig(
      base_model_path=FLAGS.base_model_path or f"saved_models/{FLAGS.dataset}_m1/1",
      transform=FLAGS.transform, logits_epsilon=FLAGS.logits_epsilon,
      inhibition_epsilon=FLAGS.inhibition_epsilon, dataset=FLAGS.dataset,
      test_limit=FLAGS.test_limit, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
      export_dir=FLAGS.export_dir, export_version=FLAGS.export_version)
