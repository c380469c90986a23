"""keras-defense: pruning + logits augmentation against adversarial examples.

Importing the package first chooses Keras 2 (see ``compat``). The public API,
one name per line; the attacks live in ``keras_defense.attacks``.
"""

from keras_defense.util import compat  # noqa: F401  (must stay first)
from keras_defense import attacks  # noqa: F401
from keras_defense.data.datasets import load_arrays
from keras_defense.data.datasets import load_split
from keras_defense.training.distribution import make_strategy
from keras_defense.training.distribution import STRATEGIES
from keras_defense.util.errors import UserError
from keras_defense.pipelines.experiment import ExperimentConfig
from keras_defense.pipelines.experiment import run as run_experiment
from keras_defense.models.export import export_saved_model
from keras_defense.models.export import load_model
from keras_defense.defenses.logits_augmentation import augment_logits
from keras_defense.defenses.logits_augmentation import gradient_inhibition
from keras_defense.models.architectures import build_model
from keras_defense.models.architectures import MODEL_NAMES
from keras_defense.defenses.pruning import prune_model
from keras_defense.defenses.pruning import sparsity_report
from keras_defense.defenses.pruning import strip_pruning
from keras_defense.defenses.trainer import train
from keras_defense.training.config import AdversarialSpec
from keras_defense.training.config import TrainConfig

__version__ = "0.1.0"
