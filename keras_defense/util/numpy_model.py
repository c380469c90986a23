"""A model that runs outside TensorFlow (NumPy in, NumPy out) called from TF code.

A LiteRT interpreter (``models.tflite.TFLiteModel``) maps float32 NumPy images
to float32 NumPy logits. Attacks and the evaluation runner call models on
tensors, eagerly and inside ``tf.function`` loops (Square's ``tf.while_loop``);
``call`` bridges the two with ``tf.numpy_function`` (runs in graphs too),
serialized by a lock per model (the interpreter is not re-entrant, and a
compiled graph may run two independent calls at once).

Such a model has **no gradients**: differentiating through ``call`` raises
``NoGradientError`` (when the gradient is built: at trace time inside a
``tf.function``), so a white-box attack on it fails loudly instead of
silently using zero gradients (the masking Athalye et al. 2018 warn about).

A model declares itself with a true ``runs_on_numpy`` attribute and a
``num_classes`` attribute; ``is_numpy_model`` tells.

Example:
  >>> logits = call(tflite_model, tf.zeros([4, 28, 28, 1]))   # tf.Tensor (4, 10)
"""

from __future__ import annotations

import threading
from typing import Any
import weakref

import numpy as np

from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class NoGradientError(UserError):
  """A gradient was asked of a model that has none (an interpreter)."""


def is_numpy_model(model: Any) -> bool:
  """True for a model that runs on NumPy arrays outside TensorFlow (``runs_on_numpy``)."""
  return bool(getattr(model, "runs_on_numpy", False))


def _lock(model: Any) -> threading.Lock:
  with _LOCKS_GUARD:
    lock = _LOCKS.get(model)
    if lock is None:
      lock = _LOCKS[model] = threading.Lock()
    return lock


def call(model: Any, x: Any) -> tf.Tensor:
  """``model(x)`` for a NumPy model, as a float32 tensor (N, K); no gradient.

  Args:
    model: callable float32 NumPy (N, H, W, C) -> float32 (N, K), with a
      ``num_classes`` attribute (K).
    x: float32 images (a tensor, eager or symbolic).

  Returns:
    float32 (N, K) logits.

  Raises:
    NoGradientError: when a gradient through this call is computed.
  """
  lock = _lock(model)
  name = getattr(model, "path", None) or type(model).__name__

  def forward(a: np.ndarray) -> np.ndarray:
    with lock:
      return np.asarray(model(a), np.float32)

  @tf.custom_gradient
  def run(xt):
    out = tf.numpy_function(forward, [xt], tf.float32, stateful=True)
    out.set_shape([xt.shape[0], int(model.num_classes)])

    @tf.autograph.experimental.do_not_convert  # raise as is, not as a StagingError
    def grad(dy):  # pylint: disable=unused-argument
      raise NoGradientError(
          f"model {name!r} runs outside TensorFlow (a TFLite/LiteRT interpreter) and has "
          f"no gradients; attack it with Square (score-based) or transfer examples from "
          f"a differentiable twin (kd-evaluate --surrogate=PATH).")
    return out, grad

  return run(tf.convert_to_tensor(x, tf.float32))
