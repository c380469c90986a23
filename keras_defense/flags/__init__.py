"""absl flags of every binary, each defined once; flags -> config dataclasses.

One module per binary (``train``, ``prune`` for kd-prune and kd-augment,
``experiment``, ``evaluate``, ``sweep``, ``comparison`` for kd-experiment
--defense, ``quantize`` for kd-quantize, ``certify`` for kd-certify) over the flags
they share (``common``). Importing the package
defines every flag, in the order the single flags module defined them, so
each binary's --helpfull lists the same flags as before the split.
"""

from keras_defense.flags import common
from keras_defense.flags import train
from keras_defense.flags import prune
from keras_defense.flags import experiment
from keras_defense.flags import evaluate
from keras_defense.flags import sweep
from keras_defense.flags import comparison
from keras_defense.flags import quantize
from keras_defense.flags import certify
from keras_defense.flags import deployment
from keras_defense.flags.common import dataset_name
from keras_defense.flags.common import FLAGS
from keras_defense.flags.certify import certify_config
from keras_defense.flags.certify import certify_flags
from keras_defense.flags.comparison import comparison_config
from keras_defense.flags.deployment import deployment_config
from keras_defense.flags.evaluate import evaluate_config
from keras_defense.flags.evaluate import evaluate_flags
from keras_defense.flags.experiment import DEFAULT_EPSILONS
from keras_defense.flags.experiment import experiment_config
from keras_defense.flags.experiment import RUN_DATA_FLAGS
from keras_defense.flags.experiment import STAGE_DEFAULTS
from keras_defense.flags.prune import augment_config
from keras_defense.flags.prune import prune_config
from keras_defense.flags.quantize import quantize_flags
from keras_defense.flags.quantize import quantize_config
from keras_defense.flags.sweep import sweep_config
from keras_defense.flags.train import train_config
