"""absl flags of every binary, defined once; flags -> config dataclasses.
"""

from keras_defense.flags.definitions import augment_config
from keras_defense.flags.definitions import comparison_config
from keras_defense.flags.definitions import dataset_name
from keras_defense.flags.definitions import DEFAULT_EPSILONS
from keras_defense.flags.definitions import evaluate_config
from keras_defense.flags.definitions import evaluate_flags
from keras_defense.flags.definitions import experiment_config
from keras_defense.flags.definitions import FLAGS
from keras_defense.flags.definitions import prune_config
from keras_defense.flags.definitions import RUN_DATA_FLAGS
from keras_defense.flags.definitions import STAGE_DEFAULTS
from keras_defense.flags.definitions import sweep_config
from keras_defense.flags.definitions import train_config
