"""Models: the C&W architectures, SavedModel export and loading, the any-model adapter.

The package face re-exports ``architectures``; ``export`` writes and loads
SavedModels, ``classifier`` adapts any model a user brings.
"""

from keras_defense.models.architectures import build_model
from keras_defense.models.architectures import count_weights
from keras_defense.models.architectures import LOGITS_LAYER_NAME
from keras_defense.models.architectures import MODEL_FOR_SHAPE
from keras_defense.models.architectures import model_for_shape
from keras_defense.models.architectures import MODEL_NAMES
