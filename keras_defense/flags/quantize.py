"""kd-quantize's flags: QuantizeConfig.

Reuses ``common``'s data and training flags (--dataset, --data_dir,
--manual_dir, --validation_size, --train_limit, --seed, --batch_size,
--epochs, --learning_rate) and ``train``'s --adversarial (pgd, fgsm_rs, trades:
robust QAT) and --adv_*/--trades_beta flags, with fine-tuning defaults of its own
when those flags are not given: --epochs 2 and Adam at 1e-4, since the model is
already trained (the shared defaults, 10 epochs of SGD at 0.05, are for training
from scratch), and 10 attack steps (``compression.qat.FINE_TUNE_STEPS``) instead
of adversarial training's 40.
"""

from __future__ import annotations

from absl import flags

from keras_defense.flags import common

FLAGS = flags.FLAGS

_METHODS = ("ptq_dynamic", "ptq_int8", "ptq_float16", "qat_int8")  # compression.METHODS

# --base_model_path is defined by the pruning flags (kd-prune, kd-augment); --method
# by quantize_flags() (kd-certify has a --method of its own).
common.define_nonnegative("clusters", 0,
                          "Weight clustering before quantization: centroids per kernel (tfmot "
                          "cluster_weights; 16 in tfmot's examples), fine-tuned --epochs; 0: none.")
common.define_count("representative_size", 500,
                    "Training images that calibrate int8 activation ranges (TFLite's guide: "
                    "~100-500); qat_int8 starts its fine-tuning from these ranges.")
flags.DEFINE_bool("int8_io", False,
                  "int8 input and output tensors (ptq_int8/qat_int8); default float32 in/out.")
flags.DEFINE_string("export_path", None, "The .tflite to write; its provenance goes to "
                    "<export_path>.json.")
common.define_nonnegative("agreement_size", 1000,
                          "Test images on which the .tflite's top-1 agreement with the float model "
                          "is measured (0: skip).")
flags.DEFINE_string("qat_twin_path", None,
                    "--method=qat_int8: also export the fine-tuned fake-quantized model (the QAT "
                    "twin) as a SavedModel <qat_twin_path>/1, for kd-evaluate --qat_twin (BPDA "
                    "through its fake quantization).")
flags.register_validator("clusters", lambda v: v == 0 or v >= 2,
                         "--clusters must be 0 (none) or >= 2.")


def quantize_flags(fv=None) -> None:
  """Gives --method kd-quantize's meaning (called by kd-quantize before parsing)."""
  fv = FLAGS if fv is None else fv
  flags.DEFINE_enum("method", "ptq_int8", list(_METHODS),
                    "ptq_dynamic: int8 weights, float activations; ptq_int8: full-integer "
                    "int8, calibrated on --representative_size training images; ptq_float16: "
                    "float16 weights; qat_int8: tfmot quantization-aware fine-tuning from "
                    "PTQ's ranges (--epochs, default 2; prune-preserving for a pruned model, "
                    "cluster-preserving with --clusters), then int8.",
                    flag_values=fv, allow_override=True)


def quantize_config(fv=None):
  """The QuantizeConfig kd-quantize's flags describe."""
  fv = FLAGS if fv is None else fv
  from keras_defense import compression  # pylint: disable=g-import-not-at-top  (imports tfmot)
  from keras_defense.util.errors import UserError  # pylint: disable=g-import-not-at-top
  if not fv.base_model_path:
    raise UserError("--base_model_path is required (e.g. saved_models/mnist_m1_at_pgd/1).")
  if not fv.export_path:
    raise UserError("--export_path is required (e.g. /tmp/m.tflite).")
  tuned = {}
  if fv["epochs"].present:
    tuned["epochs"] = fv.epochs
  if fv["learning_rate"].present:
    tuned["learning_rate"] = fv.learning_rate
  attack = None if fv.adversarial is None else compression.fine_tuning_attack(
      fv.adversarial, epsilon=fv.adv_epsilon, steps=fv.adv_steps, step_size=fv.adv_step_size,
      trades_beta=fv.trades_beta)
  return compression.QuantizeConfig(
      base_model_path=fv.base_model_path, export_path=fv.export_path,
      dataset=common.dataset_name(fv), method=fv.method, clusters=fv.clusters,
      representative_size=fv.representative_size, int8_io=fv.int8_io,
      batch_size=fv.batch_size, train_limit=fv.train_limit, adversarial=attack,
      agreement_size=fv.agreement_size, seed=fv.seed,
      qat_twin_path=fv.qat_twin_path,
      data_dir=fv.data_dir, manual_dir=fv.manual_dir, validation_size=fv.validation_size,
      **tuned)
