"""The one iterative gradient core behind FGSM, BIM and PGD, and its per-norm math.

random start -> gradient of the loss -> normalised step -> project into the
epsilon-ball -> clip to [clip_min, clip_max], repeated ``steps`` times inside
one ``tf.function`` (a ``tf.while_loop`` whose body runs ``UNROLL`` steps;
no numpy round trip per step).
FGSM is one step of size epsilon without random start (its graph holds that
one step and no loop); BIM is PGD without random start (Kurakin et al. 2016,
https://arxiv.org/abs/1607.02533; Madry et al. 2018,
https://arxiv.org/abs/1706.06083).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

_TINY = 1e-12

# Steps per tf.while_loop iteration. On CPU one loop iteration costs about a
# fifth of a gradient step of the C&W MNIST model at batch 1,000 (fp32: a
# one-step loop ran BIM at 0.84-0.88x the compiled input-gradient ceiling,
# unrolled chunks of 8 at 0.96-1.01x; benchmarks/README.md, run 5), so the
# loop body runs UNROLL steps; the graph holds UNROLL + 2 copies of the step
# (a single-step core, FGSM's, one).
UNROLL = 8


def _per_image_l2(t: tf.Tensor) -> tf.Tensor:
  """L2 norm over all but the batch axis, shaped (N, 1, 1, 1) for broadcasting."""
  return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2, 3], keepdims=True))


def normalized_step(grad: tf.Tensor, step_size: tf.Tensor, norm: str) -> tf.Tensor:
  """Steepest-ascent step of length ``step_size`` in ``norm`` (cleverhans' optimize_linear).

  L-inf: ``step_size * sign(grad)``; L2: ``step_size * grad / ||grad||_2``.
  A zero gradient gives a zero step in both norms.
  """
  if norm == "linf":
    return step_size * tf.sign(grad)
  return step_size * grad / tf.maximum(_per_image_l2(grad), _TINY)


def project(x_adv: tf.Tensor, x: tf.Tensor, epsilon: tf.Tensor, norm: str) -> tf.Tensor:
  """Projects ``x_adv`` into the ``norm`` ball of radius ``epsilon`` around ``x``.

  The L-inf projection clips to ``[x - eps, x + eps]`` so that one FGSM step
  of exactly epsilon is left bit-identical to the closed form.
  """
  if norm == "linf":
    return tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
  delta = x_adv - x
  scale = tf.minimum(1.0, epsilon / tf.maximum(_per_image_l2(delta), _TINY))
  return x + delta * scale


def random_start(x: tf.Tensor, epsilon: tf.Tensor, norm: str,
                 seed: tf.Tensor) -> tf.Tensor:
  """A point drawn uniformly from the ``norm`` ball of radius ``epsilon``."""
  shape = tf.shape(x)
  if norm == "linf":
    return x + tf.random.stateless_uniform(shape, seed, -1.0, 1.0) * epsilon
  direction = tf.random.stateless_normal(shape, seed)
  direction /= tf.maximum(_per_image_l2(direction), _TINY)
  dims = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
  u = tf.random.stateless_uniform([shape[0], 1, 1, 1], seed + 1)
  return x + direction * epsilon * u ** (1.0 / dims)


class IterativeAttack:
  """Compiled ``x -> x_adv`` for one (model, loss, norm, start, clip).

  Epsilon, step size, steps, the seed and ``targeted`` (descend the loss
  towards ``y`` instead of ascending it away from ``y``) are tensor arguments,
  so changing them never retraces; the batch dimension is ``None`` in the
  signature.

  ``single_step=True`` (FGSM) builds only the first step: no unrolled chunk
  and no loop, which a one-step attack never runs (one copy of the step to
  trace instead of ``UNROLL + 2``); ``steps`` must then be 1. The step is the
  same ops either way, so FGSM's images are those of the multi-step graph run
  with ``steps=1``.
  """

  def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *,
               image_shape: tuple[int, ...], loss: str, norm: str,
               random_start: bool, clip_min: float, clip_max: float,
               single_step: bool = False):
    self._logits = logits_fn
    self._loss = losses.LOSSES[loss]
    self._norm = norm
    self._random_start = random_start
    self._clip = (clip_min, clip_max)
    self._single_step = single_step
    self.run = tf.function(self._run, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([2], tf.int64),
        tf.TensorSpec([], tf.bool),
    ])

  def _run(self, x, y, epsilon, step_size, steps, seed, targeted):
    x_adv = x
    if self._random_start:
      x_adv = tf.clip_by_value(random_start(x, epsilon, self._norm, seed),
                               *self._clip)

    signed_step = tf.where(targeted, -step_size, step_size)
    if self._norm == "linf":
      # The ball and the pixel box intersect (x is inside both), so clipping
      # to the intersection equals project-then-clip; computed once.
      lower = tf.maximum(x - epsilon, self._clip[0])
      upper = tf.minimum(x + epsilon, self._clip[1])

    def step(x_adv):
      with tf.GradientTape() as tape:
        tape.watch(x_adv)
        loss = tf.reduce_sum(self._loss(self._logits(x_adv), y))
      grad = tape.gradient(loss, x_adv)
      x_adv = x_adv + normalized_step(grad, signed_step, self._norm)
      if self._norm == "linf":
        return tf.clip_by_value(x_adv, lower, upper)
      x_adv = project(x_adv, x, epsilon, self._norm)
      return tf.clip_by_value(x_adv, *self._clip)

    def chunk(i, x_adv):
      for _ in range(UNROLL):
        x_adv = step(x_adv)
      return i + 1, x_adv

    # steps = 1 + UNROLL * chunks + rest: the first step outside any loop, then
    # chunks of UNROLL unrolled steps, then the rest one per iteration; a
    # single-step core (FGSM) stops after the first.
    if self._single_step:
      with tf.control_dependencies([tf.debugging.assert_equal(
          steps, 1, message="a single-step core runs steps = 1")]):
        return step(x_adv)
    with tf.control_dependencies([tf.debugging.assert_positive(
        steps, message="steps must be >= 1")]):
      x_adv = step(x_adv)
    chunks, rest = (steps - 1) // UNROLL, (steps - 1) % UNROLL
    _, x_adv = tf.while_loop(lambda i, _: i < chunks, chunk, (0, x_adv))
    _, x_adv = tf.while_loop(lambda i, _: i < rest,
                             lambda i, x_adv: (i + 1, step(x_adv)), (0, x_adv))
    return x_adv


def cached_attack(model: Any, logits_fn: Callable[[tf.Tensor], tf.Tensor], *,
                  image_shape: tuple[int, ...], loss: str, norm: str, random_start: bool,
                  clip_min: float, clip_max: float, compute_dtype: str,
                  single_step: bool = False) -> IterativeAttack:
  """``model``'s compiled core for these options, built on first use and kept with it.

  BIM, PGD and the distributed grid's BIM share the entry, FGSM and the
  distributed grid's FGSM the single-step one (``single_step``); targeted and
  untargeted runs share its one trace (``targeted`` is a tensor argument).
  """
  key = ("iterative", image_shape, loss, norm, bool(random_start), clip_min, clip_max,
         compute_dtype, bool(single_step))
  return runtime.cached(model, key, lambda: IterativeAttack(
      logits_fn, image_shape=image_shape, loss=loss, norm=norm,
      random_start=bool(random_start), clip_min=clip_min, clip_max=clip_max,
      single_step=bool(single_step)))


def check_step_args(epsilon: Any, step_size: Any, steps: Any
                    ) -> tuple[float, float, int]:
  """Validated ``(epsilon, step_size, steps)``; ``step_size=None``: FGSM's one step of epsilon."""
  epsilon = validation.check_number("epsilon", epsilon, minimum=0.0)
  if step_size is None:
    return epsilon, epsilon, 1
  return (epsilon,
          validation.check_number("step_size", step_size, strictly_positive=True),
          validation.check_int("steps", steps, minimum=1))


def iterative_attack(model: Any, x: Any, y: Any, epsilon: float, *,
                     step_size: float | None, steps: int, norm: str, random_start: bool,
                     targeted: bool, clip_min: float, clip_max: float, loss: str,
                     compute_dtype: str, batch_size: int, seed: int | None) -> Any:
  """Validates the arguments and runs the compiled core in batches.

  ``step_size=None`` means one step of exactly ``epsilon`` (FGSM), on the
  single-step core.
  """
  fgsm = step_size is None
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  epsilon, step_size, steps = check_step_args(epsilon, step_size, steps)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  validation.check_choice("norm", norm, validation.NORMS)
  validation.check_choice("loss", loss, validation.LOSSES)
  if seed is not None:
    seed = validation.check_int("seed", seed, minimum=0)
  logits_fn = runtime.logits_function(model, compute_dtype)
  inputs = runtime.prepare(x, y, clip_min, clip_max, logits_fn)
  attack = cached_attack(model, logits_fn, image_shape=tuple(inputs.x.shape[1:]), loss=loss,
                         norm=norm, random_start=random_start, clip_min=clip_min,
                         clip_max=clip_max, compute_dtype=compute_dtype,
                         single_step=fgsm)
  if seed is None:
    seed = int(np.random.default_rng().integers(2**31))
  seeds = iter(range(10**9))

  def run_batch(xb, yb):
    s = tf.constant([seed, next(seeds)], tf.int64)
    return attack.run(xb, yb, tf.constant(epsilon, tf.float32),
                      tf.constant(step_size, tf.float32),
                      tf.constant(steps, tf.int32), s, tf.constant(bool(targeted)))

  x_adv = runtime.in_batches(run_batch, batch_size, inputs.x, inputs.y)
  return inputs.restore(x_adv)
