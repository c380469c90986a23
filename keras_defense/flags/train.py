"""kd-train's own flags: adversarial and certified training, defensive distillation; TrainConfig."""

from __future__ import annotations

from absl import flags

from keras_defense import data
from keras_defense import training
from keras_defense.flags import common

FLAGS = flags.FLAGS

# --- adversarial training (kd-train; kd-prune: robust pruning; kd-quantize: robust QAT)
flags.DEFINE_enum("adversarial", None, list(training.ADVERSARIAL_METHODS),
                  "Train (kd-train), fine-tune while pruning (kd-prune: robust pruning) or "
                  "under fake quantization (kd-quantize --method=qat_int8: robust QAT) on "
                  "adversarial examples crafted in every step: pgd (Madry et al. 2018), "
                  "fgsm_rs (FGSM from a random start, Wong et al. 2020) or trades (Zhang et "
                  "al. 2019). Default: standard training.")
flags.DEFINE_float("adv_epsilon", 0.3, "L-inf radius of the training attack (MNIST papers: 0.3).")
common.define_count("adv_steps", None,
                    "Steps of the training attack (default: 40 for pgd/trades, Madry's MNIST, "
                    "10 in kd-quantize's fine-tuning; fgsm_rs takes 1).")
flags.DEFINE_float("adv_step_size", None,
                   "Step of the training attack (default: 2.5 * eps / steps for pgd/trades; "
                   "1.25 * eps for fgsm_rs, Wong et al.).")
common.define_nonnegative("trades_beta", 6.0,
                          "TRADES beta, the weight of the KL term (TRADES: 6).")
common.define_nonnegative("robust_val_size", 1000,
                          "Held-out validation images of the per-epoch PGD-10 robust-accuracy check"
                          " that keeps the best epoch (0: no check).")
flags.register_validator("adv_epsilon", lambda v: 0 < v <= 1, "--adv_epsilon must be in (0, 1].")
flags.register_validator("adv_step_size", lambda v: v is None or v > 0,
                         "--adv_step_size must be > 0.")
# --- certified training (kd-train; keras_defense.defenses.trainer, certify.losses)
flags.DEFINE_enum("certified", None, list(training.CERTIFIED_METHODS),
                  "Certified training: minimise k*CE(clean) + (1-k)*CE(worst-case logits over "
                  "the eps-ball) with bounds from ibp (interval bound propagation, Gowal et al. "
                  "2018) or crown_ibp (Zhang et al. 2020: beta*CROWN-IBP + (1-beta)*IBP, beta "
                  "ramped 1 -> 0 with eps; ~8x IBP's step time on the C&W MNIST net while "
                  "beta > 0). Default: standard training.")
flags.DEFINE_float("cert_epsilon", 0.4,
                   "L-inf training radius of certified training (Gowal et al. MNIST: 0.4 to "
                   "certify at 0.3).")
common.define_nonnegative("cert_warmup_epochs", 1.0,
                          "Epochs of clean training before eps ramps (Gowal et al. MNIST: 2k steps "
                          "at batch 100, ~3.6 epochs).")
common.define_nonnegative("cert_ramp_epochs", 5.0,
                          "Epochs over which eps ramps linearly from 0 to --cert_epsilon and kappa "
                          "from 1 to --cert_kappa_final (Gowal et al. MNIST: 10k steps, ~18 epochs,"
                          " of 60k). Counted in optimizer steps, so a resumed run continues the "
                          "ramp.")
flags.DEFINE_float("cert_kappa_final", 0.5,
                   "Weight of the clean loss after the ramp (Gowal et al.: 0.5).")
flags.DEFINE_float("cert_val_epsilon", None,
                   "Radius of the per-epoch IBP-certified-accuracy check that keeps the best "
                   "epoch (default: --cert_epsilon; MNIST: 0.3, the test radius).")
common.define_nonnegative("cert_val_size", 1000,
                          "Held-out validation images of the per-epoch IBP-certified-accuracy check"
                          " (0: no check).")
flags.register_validator("cert_epsilon", lambda v: 0 < v <= 1,
                         "--cert_epsilon must be in (0, 1].")
flags.register_validator("cert_kappa_final", lambda v: 0 <= v <= 1,
                         "--cert_kappa_final must be in [0, 1].")
flags.register_validator("cert_val_epsilon", lambda v: v is None or 0 < v <= 1,
                         "--cert_val_epsilon must be in (0, 1].")
flags.register_multi_flags_validator(
    ["certified", "adversarial"], lambda d: d["certified"] is None or d["adversarial"] is None,
    "--certified and --adversarial cannot be combined: pick one training loss.")
# --- defensive distillation (kd-train twice; keras_defense.defenses.distillation)
flags.DEFINE_float("temperature", 1.0,
                   "Softmax temperature of the training loss (defensive distillation, Papernot "
                   "et al. 2016: 100 for the teacher and the student; the exported model is "
                   "deployed at T = 1). 1: standard training.")
flags.DEFINE_string("teacher_model_path", None,
                    "Distillation's student: learn this SavedModel's soft labels "
                    "softmax(logits / T) instead of the labels (train the teacher first with "
                    "the same --temperature).")
# --- the user's own model (keras_defense.training.initial_model)
flags.DEFINE_string("init_model", None,
                    "Start from this model instead of a C&W network: a Keras 3 .keras (rebuilt "
                    "in tf_keras, logits checked to 1e-5), a tf_keras .keras/.h5, or a "
                    "SavedModel holding a tf_keras model. Its input must match the dataset's "
                    "images and it must output logits. --model and --dropout do not apply.")
flags.DEFINE_string("export_keras", None,
                    "With --init_model: where the trained model is also written in the user's "
                    "format (a .keras of the Keras major version given). Default: "
                    "<export_dir>/<version>.keras beside the SavedModel.")
flags.register_validator("temperature", lambda v: v > 0, "--temperature must be > 0.")
flags.register_multi_flags_validator(
    ["adversarial", "adv_steps"],
    lambda d: d["adversarial"] != "fgsm_rs" or d["adv_steps"] in (None, 1),
    "--adversarial=fgsm_rs takes one step: leave --adv_steps unset or 1.")


def train_config(fv=None) -> training.TrainConfig:
  """The TrainConfig the training flags describe."""
  fv = FLAGS if fv is None else fv
  return training.TrainConfig(
      dataset=common.dataset_name(fv), model=fv.model,
      run_dir=fv.run_dir or f"runs/{data.slug(common.dataset_name(fv))}_train",
      epochs=fv.epochs, batch_size=fv.batch_size, optimizer=fv.optimizer,
      learning_rate=fv.learning_rate, momentum=fv.momentum,
      nesterov=fv.nesterov,
      lr_decay_epochs=tuple(int(e) for e in fv.lr_decay_epochs),
      lr_decay_factor=fv.lr_decay_factor, dropout=fv.dropout,
      seed=fv.seed, train_limit=fv.train_limit, test_limit=fv.test_limit,
      validation_size=fv.validation_size, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, export_dir=fv.export_dir,
      export_version=fv.export_version, compute_dtype=fv.compute_dtype,
      deterministic=fv.deterministic, strategy=fv.strategy,
      num_cpu_devices=fv.num_cpu_devices, adversarial=adversarial_spec(fv),
      temperature=fv.temperature, teacher_model_path=fv.teacher_model_path,
      certified=certified_spec(fv), init_model=fv.init_model,
      export_keras=fv.export_keras)


def certified_spec(fv=None) -> training.CertifiedSpec | None:
  """The certified-training flags as a spec (None without ``--certified``)."""
  fv = FLAGS if fv is None else fv
  if fv.certified is None:
    return None
  return training.CertifiedSpec(
      method=fv.certified, epsilon=fv.cert_epsilon, warmup_epochs=fv.cert_warmup_epochs,
      ramp_epochs=fv.cert_ramp_epochs, kappa_final=fv.cert_kappa_final,
      val_epsilon=fv.cert_val_epsilon, val_size=fv.cert_val_size)


def adversarial_spec(fv=None, *, method: str | None = None) -> training.AdversarialSpec | None:
  """The adversarial-training flags as a spec, for TrainConfig and PruneConfig (robust pruning).

  Args:
    fv: the flag values (default: ``FLAGS``).
    method: the method to build for (default: ``--adversarial``).

  Returns:
    None when neither ``method`` nor ``--adversarial`` is set (standard training).
  """
  fv = FLAGS if fv is None else fv
  method = method or fv.adversarial
  if method is None:
    return None
  return training.AdversarialSpec(
      method=method, epsilon=fv.adv_epsilon, steps=fv.adv_steps, step_size=fv.adv_step_size,
      trades_beta=fv.trades_beta, robust_val_size=fv.robust_val_size)
