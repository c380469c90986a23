"""The IBP certified-training loss of Gowal et al. 2018 (https://arxiv.org/abs/1810.12715).

``L = κ · CE(z(x), y) + (1 - κ) · CE(ẑ(x, ε), y)``, where ``ẑ`` are the
worst-case logits of the ε-ball: ``ẑ_j = -m_j`` with ``m_j`` the certified
lower bound of ``z_y - z_j`` (``ẑ_y = 0``; with the last layer elided, as
``bounds`` computes margins; Gowal et al. use the logit interval, which is
looser). Their schedule ramps ε from 0 to the training ε and κ from 1 to 0.5
(``ramp``). A pure function of the model's current weights, differentiable,
for a training step to call inside its ``tf.GradientTape``.
"""

from __future__ import annotations

from keras_defense.certify import bounds
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


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
    method: "ibp" or "crown_ibp" (Zhang et al. 2020 mix both; pass one here).
    norm: "linf" or "l2".
    clip_min, clip_max: the pixel range.

  Returns:
    A float32 scalar.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  y = tf.cast(y, tf.int32)
  net = bounds.bounded(model)
  eps = tf.fill(tf.shape(x)[:1], tf.cast(epsilon, tf.float32))
  worst = -net.margins(x, y, eps, method=method, norm=norm, clip_min=clip_min,
                       clip_max=clip_max)
  ce = keras.losses.sparse_categorical_crossentropy
  kappa = tf.cast(kappa, tf.float32)
  clean = ce(y, model(x, training=True), from_logits=True)
  return tf.reduce_mean(kappa * clean + (1 - kappa) * ce(y, worst, from_logits=True))


def ramp(step: int, *, start: int, length: int, final: float, initial: float = 0.0) -> float:
  """Linear ramp from ``initial`` (before ``start``) to ``final`` (after ``start + length``).

  Gowal et al. (MNIST): ε from 0 over 10k steps after 2k warm-up steps; κ from 1 to 0.5
  over the same steps.
  """
  if length <= 0:
    return final if step >= start else initial
  t = min(max((step - start) / length, 0.0), 1.0)
  return initial + t * (final - initial)
