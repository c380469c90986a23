"""Per-image attack losses on float32 logits.

Both losses are what an untargeted attacker *ascends* at the true label and a
targeted attacker *descends* at the target label.

- ``cross_entropy``: the plain softmax cross-entropy
  ``tf.nn.sparse_softmax_cross_entropy_with_logits`` (Goodfellow et al. 2015,
  https://arxiv.org/abs/1412.6572). Deliberately nothing more: on a model
  whose logits are scaled up (logits augmentation) its input gradient
  underflows to exactly zero in float32, and the attacks must reproduce that
  gradient masking faithfully.
- ``margin``: the logit margin ``max_{i != label} Z_i - Z_label``, C&W's f6
  (Carlini & Wagner 2017, https://arxiv.org/abs/1608.04644), whose gradient is
  a difference of logit gradients and does not saturate: the defense-aware
  (adaptive) attacker.
"""

from __future__ import annotations

from keras_defense.util.compat import tf


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Softmax cross-entropy per image; logits (N, K) float32, labels (N,) int."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def label_and_best_other(logits: tf.Tensor, labels: tf.Tensor
                         ) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns ``(Z_label, max_{i != label} Z_i)``, each of shape (N,)."""
  onehot = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True,
                      off_value=False)
  label_logit = tf.reduce_sum(tf.where(onehot, logits, tf.zeros_like(logits)), -1)
  others = tf.where(onehot, tf.fill(tf.shape(logits), -float("inf")), logits)
  return label_logit, tf.reduce_max(others, axis=-1)


def margin(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """C&W f6 without clamping: ``max_{i != label} Z_i - Z_label`` per image."""
  label_logit, best_other = label_and_best_other(logits, labels)
  return best_other - label_logit


def dlr(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Difference of Logits Ratio (Croce & Hein 2020, https://arxiv.org/abs/2003.01690).

  ``-(Z_y - max_{i != y} Z_i) / (Z_pi1 - Z_pi3 + 1e-12)`` per image, with
  ``Z_pi1 >= Z_pi2 >= ...`` the sorted logits: invariant to shifting and
  (positive) scaling of the logits, so a model whose logits are multiplied
  up cannot saturate it as it saturates the cross-entropy. Needs K >= 3.
  """
  label_logit, best_other = label_and_best_other(logits, labels)
  top = tf.math.top_k(logits, k=3).values
  return -(label_logit - best_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(logits: tf.Tensor, labels: tf.Tensor,
                 targets: tf.Tensor) -> tf.Tensor:
  """Targeted DLR of APGD-T: ``-(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2 + 1e-12)``.

  Ascended by the attacker (it grows as ``Z_t`` overtakes ``Z_y``); needs K >= 4.
  """
  label_logit = tf.gather(logits, labels, axis=1, batch_dims=1)
  target_logit = tf.gather(logits, targets, axis=1, batch_dims=1)
  top = tf.math.top_k(logits, k=4).values
  return -(label_logit - target_logit) / (
      top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def carlini_wagner_f(logits: tf.Tensor, labels: tf.Tensor, *, targeted: bool,
                     confidence: float) -> tf.Tensor:
  """C&W f6 as their attacks minimise it, clamped at ``-confidence``.

  Targeted (labels = targets): ``max(max_{i!=t} Z_i - Z_t, -kappa)``;
  untargeted (labels = true classes): ``max(Z_y - max_{i!=y} Z_i, -kappa)``.
  """
  m = margin(logits, labels)
  return tf.maximum(m if targeted else -m, -confidence)


def reached(logits: tf.Tensor, labels: tf.Tensor, *, targeted: bool,
            confidence: float = 0.0) -> tf.Tensor:
  """Bool (N,): the attack goal holds with margin ``confidence`` (C&W compare)."""
  onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
  if targeted:
    return tf.argmax(logits - confidence * onehot, -1) == tf.cast(labels, tf.int64)
  return tf.argmax(logits + confidence * onehot, -1) != tf.cast(labels, tf.int64)


LOSSES = {"cross_entropy": cross_entropy, "margin": margin}
