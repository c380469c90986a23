"""keras-defense: pruning + logits augmentation against adversarial examples.

Importing the package first chooses Keras 2 (see ``compat``).
"""

from keras_defense import compat  # noqa: F401  (must stay first)
from keras_defense.models import build_model
from keras_defense.models import MODEL_NAMES

__version__ = "0.1.0"
