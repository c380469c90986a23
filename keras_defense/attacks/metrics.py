"""Scoring attacks: per-image success, perturbation norms, gradient masking.

Success is counted only over images the model classified correctly before
the attack (untargeted: the class changed; targeted: the target was reached).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf


class AttackSuccess(NamedTuple):
  """Per-image masks, bool (N,). ``rate`` is success among initially correct."""
  success: np.ndarray
  initially_correct: np.ndarray

  @property
  def n(self) -> int:
    """Number of images the model classified correctly before the attack."""
    return int(self.initially_correct.sum())

  @property
  def rate(self) -> float:
    """Fraction of initially correct images the attack succeeded on (nan if 0)."""
    return float(self.success.sum() / self.n) if self.n else float("nan")


class PerturbationNorms(NamedTuple):
  """Per-image norms of ``x_adv - x``, float64 (N,) each."""
  l0: np.ndarray    # number of pixel positions (H x W) changed in any channel
  l2: np.ndarray
  linf: np.ndarray


def predict_classes(model: Any, x: Any, *, compute_dtype: str = "float32",
                    batch_size: int = 1000) -> np.ndarray:
  """Argmax of the logits, int64 (N,); x float32 (N, H, W, C)."""
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  logits_fn = runtime.logits_function(model, compute_dtype)
  arr = validation.to_numpy("x", x).astype(np.float32)
  fn = runtime.cached(model, ("argmax", arr.shape[1:], compute_dtype),
                      lambda: tf.function(lambda xb: tf.argmax(logits_fn(xb), -1)))
  return runtime.in_batches(fn, batch_size, arr).astype(np.int64)


def attack_success(model: Any, x_adv: Any, y_true: Any, *, x_clean: Any,
                   targeted: bool = False, y_target: Any = None,
                   compute_dtype: str = "float32",
                   batch_size: int = 1000) -> AttackSuccess:
  """Per-image attack success over the images the model got right before.

  Args:
    model: Keras model or callable, images -> logits (N, K).
    x_adv: adversarial images, float (N, H, W, C).
    y_true: int (N,) true labels.
    x_clean: the clean images, float (N, H, W, C), to find which were
      classified correctly before the attack.
    targeted: score reaching ``y_target`` instead of leaving ``y_true``.
    y_target: int (N,) targets; required when ``targeted``.
    compute_dtype: "float32" or "bfloat16" for the predictions.
    batch_size: images per call.

  Returns:
    ``AttackSuccess(success, initially_correct)``: bool (N,) masks;
    ``success`` is False wherever ``initially_correct`` is False.

  Raises:
    ValueError: shapes of the inputs disagree, or ``targeted`` without
      ``y_target``.
  """
  adv = validation.to_numpy("x_adv", x_adv)
  clean = validation.to_numpy("x_clean", x_clean)
  if adv.shape != clean.shape:
    raise ValueError(f"`x_adv` must have the shape of `x_clean` {clean.shape}; "
                     f"got {adv.shape}.")
  labels = validation.check_labels(y_true, clean.shape[0], None, name="y_true")
  correct = predict_classes(model, clean, compute_dtype=compute_dtype,
                            batch_size=batch_size) == labels
  pred = predict_classes(model, adv, compute_dtype=compute_dtype,
                         batch_size=batch_size)
  if targeted:
    if y_target is None:
      raise ValueError("`y_target` must be given when `targeted=True`; got None.")
    goal = validation.check_labels(y_target, clean.shape[0], None, name="y_target")
    reached = pred == goal
  else:
    reached = pred != labels
  return AttackSuccess(reached & correct, correct)


def perturbation_norms(x: Any, x_adv: Any) -> PerturbationNorms:
  """L0 (changed pixel positions), L2 and L-inf of ``x_adv - x`` per image.

  Args:
    x: clean images (N, H, W, C).
    x_adv: adversarial images, same shape.

  Returns:
    ``PerturbationNorms(l0, l2, linf)``, float64 (N,) each.

  Raises:
    ValueError: the shapes differ or are not rank 4.
  """
  a = validation.to_numpy("x", x).astype(np.float64)
  b = validation.to_numpy("x_adv", x_adv).astype(np.float64)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"`x` and `x_adv` must have the same rank-4 shape; got "
                     f"{a.shape} and {b.shape}.")
  d = (b - a).reshape(a.shape[0], -1)
  l0 = np.any((b - a) != 0, axis=-1).reshape(a.shape[0], -1).sum(-1)
  return PerturbationNorms(l0.astype(np.float64), np.sqrt((d**2).sum(-1)),
                           np.abs(d).max(-1))


def zero_gradient_fraction(model: Any, x: Any, y: Any, *,
                           clip_min: float = 0.0, clip_max: float = 1.0,
                           compute_dtype: str = "float32",
                           batch_size: int = 1000) -> float:
  """Fraction of images whose cross-entropy input gradient is exactly zero.

  The mark of gradient masking: on a model with saturated softmax (e.g. the
  logits scaled x21) ``softmax - onehot`` underflows to 0 in float32, so
  sign-gradient attacks add nothing (Athalye et al. 2018,
  https://arxiv.org/abs/1802.00420).

  Args:
    model: Keras model or callable, images -> logits (N, K).
    x: float32 (N, H, W, C) in [clip_min, clip_max].
    y: int (N,) labels.
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    compute_dtype: "float32" or "bfloat16".
    batch_size: images per call.

  Returns:
    A float in [0, 1].

  Raises:
    ValueError, TypeError: bad images or labels (see ``validation``).
  """
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  logits_fn = runtime.logits_function(model, compute_dtype)
  inputs = runtime.prepare(x, y, clip_min, clip_max, logits_fn)

  def build():
    @tf.function
    def all_zero(xb, yb):
      with tf.GradientTape() as tape:
        tape.watch(xb)
        loss = tf.reduce_sum(losses.cross_entropy(logits_fn(xb), yb))
      grad = tape.gradient(loss, xb)
      return tf.reduce_all(tf.equal(grad, 0.0), axis=[1, 2, 3])
    return all_zero

  fn = runtime.cached(model, ("zero_gradient", inputs.x.shape[1:], compute_dtype),
                      build)
  return float(runtime.in_batches(fn, batch_size, inputs.x, inputs.y).mean())
