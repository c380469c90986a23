"""The attack inside adversarial training's step: the inner maximisation on tensors.

``craft`` makes a training batch's adversarial images for PGD-AT, FGSM-RS or
TRADES (``adversarial_training`` has the papers); ``linf_ascent`` is their one
loop of signed-gradient steps kept in the eps-ball and the box, a
``tf.while_loop`` with no numpy round trip, run inside the compiled train step
(``trainer.DefenseTrainer``). ``cross_entropy`` and ``kl_divergence`` are the
per-example losses it ascends and the step minimises; ``step_loss`` is the
step's loss on the crafted batch. Robust QAT
(``compression.qat.fine_tune``) runs the same inner maximisation on the
fake-quantized model, which is why it lives in ``training`` (below both).
"""

from __future__ import annotations

from typing import Callable

from keras_defense.attacks import core
from keras_defense.util.compat import tf

TRADES_START_STD = 0.001  # TRADES code: x + 0.001 * randn before the KL ascent


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Per-example softmax cross-entropy; labels (N,) int, logits (N, K) float32."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def kl_divergence(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
  """Per-example KL(softmax(p_logits) || softmax(q_logits)), from log-softmaxes."""
  log_p = tf.nn.log_softmax(p_logits, axis=-1)
  log_q = tf.nn.log_softmax(q_logits, axis=-1)
  return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def step_loss(logits_fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, x_adv: tf.Tensor,
              y: tf.Tensor, *, method: str, trades_beta: float) -> tuple[tf.Tensor, tf.Tensor]:
  """(per-example loss, adversarial logits) of adversarial training's step.

  PGD-AT and FGSM-RS: CE on the adversarial batch; TRADES: CE(clean) +
  β·KL(clean || adversarial), the clean batch scored first.

  Args:
    logits_fn: images -> float32 logits, the model in training mode.
    x: the clean batch; x_adv: ``craft``'s images for it; y: int64 labels.
    method: "pgd", "fgsm_rs" or "trades".
    trades_beta: TRADES' β.
  """
  if method == "trades":
    clean = logits_fn(x)
    scored = logits_fn(x_adv)
    return cross_entropy(y, clean) + trades_beta * kl_divergence(clean, scored), scored
  scored = logits_fn(x_adv)
  return cross_entropy(y, scored), scored


def linf_ascent(loss_fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, start: tf.Tensor,
                *, epsilon: float, step_size: float, steps: int,
                clip_min: float = 0.0, clip_max: float = 1.0) -> tf.Tensor:
  """``steps`` signed-gradient steps on ``loss_fn`` from ``start``, kept in the eps-ball and box.

  Each step: ``x' <- clip_[max(x - eps, lo), min(x + eps, hi)](x' + step * sign(grad))``
  (``core.normalized_step``; the ball and the box intersect, so clipping to
  the intersection is project-then-clip). A ``tf.while_loop``: graph size
  does not grow with ``steps``; no numpy round trip.

  Args:
    loss_fn: images (N, H, W, C) -> per-example loss (N,) to ascend.
    x: float32 (N, H, W, C) clean images in [clip_min, clip_max].
    start: float32, the first iterate (e.g. a random point in the ball).
    epsilon: L-inf radius > 0.
    step_size: step > 0.
    steps: number of steps >= 1.
    clip_min: lowest pixel value.
    clip_max: highest pixel value.

  Returns:
    float32 (N, H, W, C) images in the eps-ball around ``x`` and the box,
    without gradient history (``stop_gradient``).
  """
  lower = tf.maximum(x - epsilon, clip_min)
  upper = tf.minimum(x + epsilon, clip_max)
  step = tf.constant(step_size, tf.float32)

  def body(i, x_adv):
    with tf.GradientTape() as tape:
      tape.watch(x_adv)
      loss = tf.reduce_sum(loss_fn(x_adv))
    grad = tape.gradient(loss, x_adv)
    x_adv = tf.clip_by_value(x_adv + core.normalized_step(grad, step, "linf"), lower, upper)
    return i + 1, tf.stop_gradient(x_adv)

  start = tf.clip_by_value(start, lower, upper)
  _, x_adv = tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), start))
  return tf.stop_gradient(x_adv)


def craft(logits_fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, y: tf.Tensor, *,
          method: str, epsilon: float, step_size: float, steps: int,
          seed: tf.Tensor) -> tf.Tensor:
  """The training batch's adversarial images for ``method``.

  Args:
    logits_fn: images -> float32 logits (N, K), the model in inference mode.
    x: float32 (N, H, W, C) images in [0, 1].
    y: int64 (N,) labels.
    method: "pgd", "fgsm_rs" (PGD with one step of ``step_size`` = 1.25 eps)
      or "trades" (ascends KL(f(x) || f(x')) from x + 0.001 N(0, 1)).
    epsilon: L-inf radius.
    step_size: step per iteration.
    steps: iterations.
    seed: int64 [2], the stateless seed of the random start.

  Returns:
    float32 (N, H, W, C) in the eps-ball around ``x`` and in [0, 1].
  """
  if method == "trades":
    clean = tf.stop_gradient(logits_fn(x))
    start = x + TRADES_START_STD * tf.random.stateless_normal(tf.shape(x), seed)
    return linf_ascent(lambda xa: kl_divergence(clean, logits_fn(xa)), x, start,
                       epsilon=epsilon, step_size=step_size, steps=steps)
  start = core.random_start(x, tf.constant(epsilon, tf.float32), "linf", seed)
  return linf_ascent(lambda xa: cross_entropy(y, logits_fn(xa)), x, start,
                     epsilon=epsilon, step_size=step_size, steps=steps)
