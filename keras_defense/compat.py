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
