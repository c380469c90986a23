"""Training: the config, the fit loop with resume and export, tf.distribute.

The package face re-exports ``config`` (``TrainConfig``, ``AdversarialSpec``, ``CertifiedSpec``,
the checks, the run-dir claim) and ``loop`` (``train`` and its parts);
``distribution`` makes the strategies; ``attack`` is adversarial training's inner
maximisation (``craft``), shared by the defenses' step and robust QAT. A trained
defense's training step is not here: ``train`` takes it from its caller
(``keras_defense.defenses``).
"""

from keras_defense.training.config import ADVERSARIAL_FLAGS
from keras_defense.training.config import ADVERSARIAL_METHODS
from keras_defense.training.config import adversarial_flags
from keras_defense.training.config import AdversarialSpec
from keras_defense.training.config import CERTIFIED_METHODS
from keras_defense.training.config import CertifiedSpec
from keras_defense.training.config import check_adversarial
from keras_defense.training.config import check_certified
from keras_defense.training.config import check_fit_fields
from keras_defense.training.config import check_output_dir
from keras_defense.training.config import check_strategy
from keras_defense.training.config import claim_run_dir
from keras_defense.training.config import COMPUTE_DTYPES
from keras_defense.training.config import config_dict
from keras_defense.training.config import ConfigError
from keras_defense.training.config import OPTIMIZERS
from keras_defense.training.config import RUN_FILE
from keras_defense.training.config import TrainConfig
from keras_defense.training.loop import build_for_training
from keras_defense.training.loop import compile_classifier
from keras_defense.training.loop import Defense
from keras_defense.training.loop import DefenseFactory
from keras_defense.training.loop import EpochSeeder
from keras_defense.training.loop import fit_datasets
from keras_defense.training.loop import make_optimizer
from keras_defense.training.loop import resume_epoch
from keras_defense.training.loop import setup_determinism
from keras_defense.training.loop import step_schedule
from keras_defense.training.loop import to_float32
from keras_defense.training.loop import train
from keras_defense.training.loop import TrainResult
