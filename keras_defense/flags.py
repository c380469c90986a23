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
