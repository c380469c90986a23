"""Flags every binary shares: data, the model and its training, tf.distribute.

Every flag is optional (has a default) so tests can import this module; range
checks are absl validators, so a bad value stops the binary with one line
naming the flag. A flag is named like the config field it fills. Library code
never reads FLAGS: binaries turn flags into a config with the ``*_config()``
functions of this package (one module per binary).
"""

from __future__ import annotations

import sys

from absl import flags

from keras_defense import data
from keras_defense import models
from keras_defense import training
from keras_defense.training import distribution as _dist

FLAGS = flags.FLAGS


def define_count(name: str, default: int | None, help_text: str) -> flags.FlagHolder:
  """An integer flag >= 1 (images, steps, queries, shards...): ``DEFINE_integer``, lower_bound=1.

  The flag is listed (``--helpfull``, key flags) under the module that calls
  this, as if that module had called ``DEFINE_integer`` itself.
  """
  return flags.DEFINE_integer(name, default, help_text, lower_bound=1,
                              module_name=sys._getframe(1).f_globals["__name__"])  # pylint: disable=protected-access


def define_nonnegative(name: str, default: int | float | None, help_text: str, *,
                       kind: type | None = None) -> flags.FlagHolder:
  """A number flag >= 0 (sizes where 0 means skip, epochs, rates): lower_bound=0.

  ``DEFINE_integer`` for ``kind=int`` (the default's type when not given),
  ``DEFINE_float`` for ``kind=float``; listed under the calling module, as
  ``define_count``.
  """
  kind = kind or type(default)
  if kind not in (int, float):
    raise TypeError(f"define_nonnegative({name!r}): kind must be int or float; got {kind!r}.")
  define = flags.DEFINE_integer if kind is int else flags.DEFINE_float
  return define(name, default, help_text, lower_bound=kind(0),
                module_name=sys._getframe(1).f_globals["__name__"])  # pylint: disable=protected-access

# --- data -------------------------------------------------------------------
flags.DEFINE_string("dataset", "mnist",
                    "tfds image-classification dataset with 28x28x1 or 32x32x3 uint8 images and "
                    "a label (mnist, fashion_mnist, kmnist, cifar10, ...), or folder:PATH for "
                    "PATH/train/<class>/*.png|jpg and PATH/test/<class>/... (tfds ImageFolder). "
                    "kd-experiment uses it for every stage.")
flags.DEFINE_string("image_size", None,
                    "Convert and resize every image to 28x28x1 or 32x32x3 (default: the images "
                    "must already have one of those shapes).")
flags.DEFINE_string("data_dir", None, "tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", None,
                    "Folder with the dataset's official files (e.g. cifar-10-binary.tar.gz). "
                    "MNIST needs none: the package carries its files.")
define_nonnegative("validation_size", None,
                   "Training examples held out for validation (default min(5000, n_train/10); C&W: "
                   "5000).", kind=int)
define_count("train_limit", None, "Use only this many training examples.")
define_count("test_limit", None, "Use only this many test/validation examples.")
flags.DEFINE_integer("seed", 0, "Random seed for data order, weights and attacks.")
flags.DEFINE_bool("deterministic", False,
                  "Enable TensorFlow op determinism: same seed and flags give identical "
                  "numbers. Off by default for kd-train/kd-prune; flags/mnist.flags turns "
                  "it on for kd-experiment (ExperimentConfig defaults to on); no measurable "
                  "cost on CPU.")

# --- model and training -----------------------------------------------------
flags.DEFINE_enum("model", None, list(models.MODEL_NAMES),
                  "Architecture; default: the paper's model for --dataset.")
flags.DEFINE_string("run_dir", None, "Run directory: checkpoints, TensorBoard, results.")
define_count("epochs", 10, "Training epochs.")
define_count("batch_size", 128, "Batch size (C&W: 128).")
flags.DEFINE_enum("optimizer", "sgd", list(training.OPTIMIZERS), "Optimizer.")
define_nonnegative("learning_rate", 0.05,
                   "Initial learning rate.")
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
define_count("export_version", None, "SavedModel version (default: next free).")

# --- distribution (kd-train, kd-prune, kd-experiment; kd-evaluate: default|mirrored) ---

flags.DEFINE_enum("strategy", "default", list(_dist.STRATEGIES),
                  "tf.distribute strategy: default (one device), mirrored (all local GPUs, "
                  "or --num_cpu_devices logical CPUs), multi_worker (TF_CONFIG cluster). "
                  "See docs/DISTRIBUTED.md.")
define_count("num_cpu_devices", None,
             "With --strategy=mirrored and no GPU: logical CPU devices (default 2).")
flags.register_multi_flags_validator(
    ["strategy", "num_cpu_devices"],
    lambda d: d["num_cpu_devices"] is None or d["strategy"] == "mirrored",
    "--num_cpu_devices only goes with --strategy=mirrored.")

flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator(
    "image_size", lambda v: v is None or v.lower() in ("28x28x1", "32x32x3"),
    "--image_size must be 28x28x1 or 32x32x3.")


def dataset_name(fv=None) -> str:
  """--dataset with --image_size folded in (``data.with_image_size``)."""
  fv = FLAGS if fv is None else fv
  return data.with_image_size(fv.dataset, fv.image_size)
flags.register_validator("lr_decay_factor", lambda v: 0 < v <= 1,
                         "--lr_decay_factor must be in (0, 1].")
flags.register_validator("dropout", lambda v: 0 <= v < 1, "--dropout must be in [0, 1).")
flags.register_validator(
    "lr_decay_epochs", lambda v: all(s.strip().isdigit() and int(s) >= 1 for s in v),
    "--lr_decay_epochs must be a comma-separated list of epochs >= 1.")


def parse_epsilon(text: str) -> float:
  text = text.strip()
  try:
    if "/" in text:
      num, den = text.split("/")
      return float(num) / float(den)
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise flags.ValidationError(
        f"--epsilons: {text!r} is not a number or a fraction like 8/255.") from None


def check_epsilons(values):
  eps = [parse_epsilon(v) for v in values]
  if not eps:
    raise flags.ValidationError("--epsilons must list at least one epsilon.")
  if any(not 0 < e <= 1 for e in eps):
    raise flags.ValidationError(f"--epsilons must all be in (0, 1]; got {values}.")
  return True


def check_choices(name, choices):
  def check(values):
    bad = [v for v in values if v not in choices]
    if bad:
      raise flags.ValidationError(
          f"--{name} must be from {', '.join(choices)}; got {', '.join(bad)}.")
    return True
  return check
