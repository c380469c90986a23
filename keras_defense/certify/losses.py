"""The IBP certified-training loss of Gowal et al. 2018 (https://arxiv.org/abs/1810.12715).

``L = κ · CE(z(x), y) + (1 - κ) · CE(ẑ(x, ε), y)``, where ``ẑ`` are the
worst-case logits of the ε-ball: ``ẑ_j = -m_j`` with ``m_j`` the certified
lower bound of ``z_y - z_j`` (``ẑ_y = 0``; with the last layer elided, as
``bounds`` computes margins; Gowal et al. use the logit interval, which is
looser). Their schedule ramps ε from 0 to the training ε and κ from 1 to 0.5
(``ramp``, ``CertifiedSchedule``; CROWN-IBP training, Zhang et al. 2020, also
ramps β, the weight of the CROWN-IBP bound against IBP's, from 1 to 0). A pure
function of the model's current weights, differentiable, for a training step
to call inside its ``tf.GradientTape`` (``defenses.trainer``).
"""

from __future__ import annotations

import functools

from keras_defense.certify.bounds import bounded
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


def worst_case_logits(model: keras.Model, x: tf.Tensor, y: tf.Tensor,
                      epsilon: float | tf.Tensor, *, method: str = "ibp",
                      beta: float | tf.Tensor = 1.0, norm: str = "linf",
                      clip_min: float = 0.0, clip_max: float = 1.0) -> tf.Tensor:
  """``ẑ = -m``: minus the certified lower bounds ``m_j`` of ``z_y - z_j``, (N, K).

  ``argmax ẑ == y`` exactly when the image is certified (up to ties).

  Args:
    model, x, y, epsilon, norm, clip_min, clip_max: as ``ibp_loss``.
    method: "ibp" or "crown_ibp".
    beta: "crown_ibp" only: the bound is β·CROWN-IBP + (1-β)·IBP (Zhang et al.
      2020 ramp β from 1 to 0 with ε); at β = 0 the CROWN pass is skipped.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  y = tf.cast(y, tf.int32)
  net = bounded(model)
  eps = tf.fill(tf.shape(x)[:1], tf.cast(epsilon, tf.float32))
  kwargs = dict(norm=norm, clip_min=clip_min, clip_max=clip_max)
  ibp = net.margins(x, y, eps, method="ibp", **kwargs)
  if method == "ibp":
    return -ibp
  net.check(method, norm, "adaptive")
  beta = tf.cast(beta, tf.float32)
  crown = tf.cond(beta > 0, lambda: net.margins(x, y, eps, method=method, **kwargs),
                  lambda: ibp)
  return -(beta * crown + (1 - beta) * ibp)


def certified_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor,
                   epsilon: float | tf.Tensor, kappa: float | tf.Tensor, *,
                   method: str = "ibp", beta: float | tf.Tensor = 1.0, norm: str = "linf",
                   clip_min: float = 0.0, clip_max: float = 1.0,
                   clean_logits: tf.Tensor | None = None
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-example κ · CE(clean logits) + (1 - κ) · CE(worst-case logits), and ``ẑ``.

  Args: as ``ibp_loss`` and ``worst_case_logits``; ``clean_logits``: the
    model's logits on ``x`` if the caller has them (default: ``model(x,
    training=True)``).

  Returns:
    (float32 (N,) losses, the worst-case logits (N, K)).
  """
  y = tf.cast(y, tf.int32)
  if clean_logits is None:
    clean_logits = model(tf.convert_to_tensor(x, tf.float32), training=True)
  clean_logits = tf.cast(clean_logits, tf.float32)
  kappa = tf.cast(kappa, tf.float32)
  # κ = 1 (warm-up): the bound has no weight; skip it and return the clean
  # margins' logits (the bound at ε = 0 when the clean pass is deterministic).
  worst = tf.cond(
      kappa < 1,
      lambda: worst_case_logits(model, x, y, epsilon, method=method, beta=beta, norm=norm,
                                clip_min=clip_min, clip_max=clip_max),
      lambda: clean_logits - tf.gather(clean_logits, y, batch_dims=1)[:, None])
  ce = keras.losses.sparse_categorical_crossentropy
  per_example = (kappa * ce(y, clean_logits, from_logits=True)
                 + (1 - kappa) * ce(y, worst, from_logits=True))
  return per_example, worst


def ibp_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor, epsilon: float | tf.Tensor,
             kappa: float | tf.Tensor, *, method: str = "ibp", norm: str = "linf",
             clip_min: float = 0.0, clip_max: float = 1.0) -> tf.Tensor:
  """Mean of κ · CE(clean logits) + (1 - κ) · CE(worst-case logits) over the batch.

  Args:
    model: a tf_keras model of the layers ``network.parse`` reads, giving logits.
    x: float32 images (N, ...) in [clip_min, clip_max].
    y: int labels (N,).
    epsilon: the training radius (scalar, >= 0).
    kappa: weight of the clean loss in [0, 1] (Gowal et al.: 1 -> 0.5).
    method: "ibp" or "crown_ibp" (the CROWN-IBP bound alone; ``certified_loss``
      mixes it with IBP's).
    norm: "linf" or "l2".
    clip_min, clip_max: the pixel range.

  Returns:
    A float32 scalar.
  """
  per_example, _ = certified_loss(model, x, y, epsilon, kappa, method=method, norm=norm,
                                  clip_min=clip_min, clip_max=clip_max)
  return tf.reduce_mean(per_example)


def ramp(step, *, start, length, final: float, initial: float = 0.0):
  """Linear ramp from ``initial`` (before ``start``) to ``final`` (after ``start + length``).

  Gowal et al. (MNIST): ε from 0 over 10k steps after 2k warm-up steps; κ from 1 to 0.5
  over the same steps. Python numbers give a float; a tensor ``step`` (e.g. the
  optimizer's step counter inside a compiled train step) gives a float32 tensor.
  """
  if not isinstance(step, (tf.Tensor, tf.Variable)):
    if length <= 0:
      return final if step >= start else initial
    t = min(max((step - start) / length, 0.0), 1.0)
    return initial + t * (final - initial)
  step = tf.cast(step, tf.float32)
  length = tf.cast(length, tf.float32)
  t = tf.where(length > 0, tf.clip_by_value((step - tf.cast(start, tf.float32))
                                            / tf.maximum(length, 1.0), 0.0, 1.0),
               tf.cast(step >= tf.cast(start, tf.float32), tf.float32))
  return initial + t * (final - initial)


class CertifiedSchedule:
  """ε, κ and β as functions of the optimizer step (Gowal et al. 2018; Zhang et al. 2020).

  ``warmup_steps`` of clean training (ε 0, κ 1, β 1), then over ``ramp_steps``
  ε goes linearly from 0 to ``epsilon``, κ from 1 to ``kappa_final`` and β
  (CROWN-IBP's weight) from 1 to 0; constant afterwards. A pure function of
  the step, so a resumed run (whose optimizer restores its step counter)
  continues every ramp where it stopped.

  Example:
    >>> eps, kappa, beta = CertifiedSchedule(0.4, 100, 1000, 0.5)(600)  # 0.2, 0.75, 0.5
  """

  def __init__(self, epsilon: float, warmup_steps: int, ramp_steps: int,
               kappa_final: float = 0.5):
    self.epsilon = float(epsilon)
    self.warmup_steps = int(warmup_steps)
    self.ramp_steps = int(ramp_steps)
    self.kappa_final = float(kappa_final)

  def __call__(self, step):
    """(ε, κ, β) at ``step`` (a Python int or a tensor)."""
    at = functools.partial(ramp, step, start=self.warmup_steps, length=self.ramp_steps)
    return (at(final=self.epsilon), at(final=self.kappa_final, initial=1.0),
            at(final=0.0, initial=1.0))
