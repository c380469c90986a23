"""Training: the config, the fit loop with resume and export, tf.distribute.

The package face re-exports ``loop``; ``distribution`` makes the strategies.
"""

from keras_defense.training.loop import ADVERSARIAL_FIELDS
from keras_defense.training.loop import ADVERSARIAL_METHODS
from keras_defense.training.loop import adversarial_steps
from keras_defense.training.loop import build_for_training
from keras_defense.training.loop import check_defense_fields
from keras_defense.training.loop import check_fit_fields
from keras_defense.training.loop import check_output_dir
from keras_defense.training.loop import check_strategy
from keras_defense.training.loop import claim_run_dir
from keras_defense.training.loop import compile_classifier
from keras_defense.training.loop import COMPUTE_DTYPES
from keras_defense.training.loop import ConfigError
from keras_defense.training.loop import EpochSeeder
from keras_defense.training.loop import make_optimizer
from keras_defense.training.loop import OPTIMIZERS
from keras_defense.training.loop import resume_epoch
from keras_defense.training.loop import RUN_FILE
from keras_defense.training.loop import setup_determinism
from keras_defense.training.loop import step_schedule
from keras_defense.training.loop import to_float32
from keras_defense.training.loop import train
from keras_defense.training.loop import TrainConfig
from keras_defense.training.loop import TrainResult
