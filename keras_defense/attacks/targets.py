"""Target labels for targeted attacks: random other class, least likely, next class.

The random and next-class targets follow Carlini & Wagner 2017
(https://arxiv.org/abs/1608.04644); least likely is Kurakin et al. 2016's
"iterative least-likely class" target (https://arxiv.org/abs/1607.02533).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf


def _labels(y: Any, num_classes: Any) -> tuple[np.ndarray, int]:
  num_classes = validation.check_int("num_classes", num_classes, minimum=2)
  arr = validation.to_numpy("y", y)
  labels = validation.check_labels(arr, arr.shape[0] if arr.ndim else -1,
                                   num_classes)
  return labels, num_classes


def random_targets(y: Any, num_classes: int, seed: int | None = None) -> np.ndarray:
  """A uniformly random class other than ``y`` for each image.

  Args:
    y: int (N,) true labels in [0, num_classes).
    num_classes: number of classes K >= 2.
    seed: numpy seed for reproducible targets; None = fresh randomness.

  Returns:
    int64 (N,) targets, each != the corresponding ``y``.

  Raises:
    ValueError: labels not of shape (N,) or outside [0, num_classes).
    TypeError: non-integer labels or ``num_classes``.
  """
  labels, k = _labels(y, num_classes)
  offset = np.random.default_rng(seed).integers(1, k, size=labels.shape)
  return (labels + offset) % k


def next_class_targets(y: Any, num_classes: int) -> np.ndarray:
  """``(y + 1) mod num_classes`` for each image, int64 (N,).

  Raises:
    ValueError: labels not of shape (N,) or outside [0, num_classes).
    TypeError: non-integer labels or ``num_classes``.
  """
  labels, k = _labels(y, num_classes)
  return (labels + 1) % k


def least_likely_targets(model: Any, x: Any, *, clip_min: float = 0.0,
                         clip_max: float = 1.0, compute_dtype: str = "float32",
                         batch_size: int = 1000) -> np.ndarray:
  """The class with the lowest logit (= lowest probability) for each image.

  Args:
    model: Keras model or callable, images -> logits (N, K).
    x: float32 (N, H, W, C) in [clip_min, clip_max].
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    compute_dtype: "float32" or "bfloat16".
    batch_size: images per call.

  Returns:
    int64 (N,) least-likely classes.

  Raises:
    ValueError: bad images (see ``validation.check_images``).
    TypeError: a model that is not callable.
  """
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  logits_fn = runtime.logits_function(model, compute_dtype)
  arr = validation.check_images(x, clip_min, clip_max).astype(np.float32)
  fn = runtime.cached(model, ("argmin", arr.shape[1:], compute_dtype),
                      lambda: tf.function(lambda xb: tf.argmin(logits_fn(xb), -1)))
  return runtime.in_batches(fn, batch_size, arr).astype(np.int64)
