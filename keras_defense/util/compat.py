"""The one place that chooses Keras 2 (``tf_keras``) for keras-defense.

tensorflow-model-optimization only works with Keras 2. ``TF_USE_LEGACY_KERAS``
must be set before TensorFlow is first imported, so ``keras_defense/__init__``
imports this module before anything else. Every other module takes ``tf`` and
``keras`` from here and never touches ``tf.keras``.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
import tf_keras as keras  # noqa: E402  pylint: disable=g-import-not-at-top

__all__ = ["tf", "keras"]

# Dropout and other random layers draw from a tf.random.Generator whose state is
# a variable: it is saved in every epoch checkpoint, so a run resumed after a
# crash continues the same random stream (the legacy stateful ops restart it).
keras.backend.experimental.enable_tf_random_generator()
