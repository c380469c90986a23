"""The machinery the three Carlini & Wagner attacks share.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017, https://arxiv.org/abs/1608.04644 (reference code:
https://github.com/carlini/nn_robust_attacks). All three attacks (L2 in
``l2.py``, L-inf in ``linf.py``, L0 in ``l0.py``) re-parametrise images in
tanh space, ``x' = tanh(w) * (clip_max - clip_min) / 2 + (clip_max + clip_min) / 2``,
and optimise ``w`` with Adam written out on tensors inside a
``tf.while_loop``; every constant, bound and search state is per image (shape
(N,)), unlike cleverhans #1205 whose constant had the image's shape. L-inf
and L0 also share the "round" loop: an inner Adam run until each image
reaches its goal, then a per-image update (shrink tau / remove pixels on
success, double c on failure). Images that are finished (L2: aborted early;
L-inf/L0: goal reached this round, or out of the search) leave the batch at
the next compaction point, so they stop costing forward/backward passes; per
image, the iterations are those it would see alone. Under bfloat16, the
attacks aim slightly past the boundary (``_BF16_SLACK``) and successes are
confirmed in float32. Here: tanh space, Adam, the objective's f and goal test,
the compacting loop, the round loop with L-inf's and L0's schedule of c, their
compiled signature, batched run and shared docstring blocks, and the
validation and compiled-attack cache the three public functions share.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

DEFAULT_BATCH_SIZE = 1000
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8   # tf.train.AdamOptimizer defaults
_TANH_SHRINK = 0.999999                          # C&W: arctanh(x * 1.999999)
_COMPACT_EVERY = 10   # L-inf/L0: drop finished images from the batch this often
# Under bfloat16 the attacks aim this fraction of the image's largest |logit|
# past the decision boundary (in f and in the in-loop success test); float32
# then confirms with kappa alone. The bf16 logit margin of M0's C&W examples
# was off by 0.5-0.8% of max|Z| (95th percentile), at most 2%; without the
# slack, the smallest-L2 bf16 success of a step was often not adversarial in
# float32 (warm-started C&W-L2 5x200: 86.7% in bf16 vs 100% in float32).
_BF16_SLACK = 0.01

# The Args and Returns that L-inf's and L0's docstrings share (docstrings.fill):
# their options but the one that shrinks the search (decrease_factor for L-inf).
_ROUNDS_ARGS = """\
model: Keras model or callable, images -> logits (N, K).
x: float32 (N, H, W, C) in [clip_min, clip_max].
y: int (N,) true labels (untargeted) or target labels (targeted).
targeted: reach ``y`` instead of leaving it.
confidence: kappa >= 0.
max_iterations: Adam steps per round, >= 1.
learning_rate: Adam step size > 0.
initial_const: first c > 0.
largest_const: give up once c reaches this (> initial_const).
const_factor: c multiplier after a failure (> 1)."""
_ROUNDS_TAIL = """\
  clip_min: lowest pixel value.
  clip_max: highest pixel value.
  compute_dtype: "float32" or "bfloat16" (successes are confirmed on the
    float32 model; L0 ranks pixels by the float32 gradient).
  batch_size: images optimised together (finished ones leave the batch).

Returns:
  Adversarial images, same shape/dtype/kind as ``x``; unchanged where
  nothing was found."""
ROUNDS_DOCS = {"rounds_args": _ROUNDS_ARGS, "rounds_tail": _ROUNDS_TAIL}


def expand(v: tf.Tensor) -> tf.Tensor:
  """(N,) -> (N, 1, 1, 1) for broadcasting against images."""
  return tf.reshape(v, [-1, 1, 1, 1])


def sum_per_image(t: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(t, axis=[1, 2, 3])


def compacting_loop(iterations, chunk, carry: dict, consts: dict, step):
  """``carry = step(i, carry, consts)`` for i < iterations, only on live images.

  ``carry["live"]`` (bool (N,)) says which images still take part; ``step``
  may clear it. Every ``chunk`` iterations the images that are no longer live
  are dropped from the batch (gather, run, scatter back), so images that
  finished early stop costing forward/backward passes; within a chunk ``step``
  must itself leave non-live images unchanged. Stops early once no image is
  live. Each image sees exactly the iterations it would see unbatched.
  """
  def chunk_body(i0, carry):
    def run(sub):
      c = {k: sub[k] for k in carry}
      k = {n: sub["const/" + n] for n in consts}
      n = tf.minimum(chunk, iterations - i0)
      _, c = tf.while_loop(
          lambda j, c: (j < n) & tf.reduce_any(c["live"]),
          lambda j, c: (j + 1, step(i0 + j, c, k)), (0, c))
      return c
    both = dict(carry, **{"const/" + n: v for n, v in consts.items()})
    out = runtime.on_subset(carry["live"], both, run)
    return i0 + chunk, {k: out[k] for k in carry}

  _, carry = tf.while_loop(
      lambda i0, c: (i0 < iterations) & tf.reduce_any(c["live"]),
      chunk_body, (0, carry))
  return carry


class Machinery:
  """What all C&W variants share: tanh space, Adam, the objective's f, goal test."""

  def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *,
               targeted: bool, confidence: float, clip_min: float,
               clip_max: float,
               exact_logits: Callable[[tf.Tensor], tf.Tensor] | None = None):
    self.logits = logits_fn
    # bfloat16: the float32 model, which decides success and ranks pixels.
    self.exact_logits = exact_logits
    self.targeted = targeted
    self.confidence = confidence
    self._half = (clip_max - clip_min) / 2.0
    self._mid = (clip_max + clip_min) / 2.0

  def compile_run(self, image_shape, **hyperparameters: tf.DType):
    """``self._run`` compiled once for images, labels and scalar hyperparameters.

    ``hyperparameters`` name each scalar argument after the labels, in order,
    with its dtype; as tensors they change without a retrace.
    """
    return tf.function(self._run, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32),
        tf.TensorSpec([None], tf.int64),
        *(tf.TensorSpec([], dtype) for dtype in hyperparameters.values())])

  def compile_rounds(self, image_shape, *shrink: str):
    """``compile_run`` for L-inf/L0 (``run_rounds``'s order).

    ``shrink`` names the variant's own float hyperparameters, which come
    after ``const_factor``.
    """
    return self.compile_run(
        image_shape, initial_const=tf.float32, largest_const=tf.float32,
        const_factor=tf.float32, **{name: tf.float32 for name in shrink},
        max_iterations=tf.int32, learning_rate=tf.float32, abort_early=tf.bool,
        max_rounds=tf.int32)

  def to_tanh(self, x: tf.Tensor) -> tf.Tensor:
    unit = tf.clip_by_value((x - self._mid) / self._half, -1.0, 1.0)
    return tf.atanh(unit * _TANH_SHRINK)

  def from_tanh(self, w: tf.Tensor) -> tf.Tensor:
    return tf.tanh(w) * self._half + self._mid

  @staticmethod
  def adam(w, grad, m, v, t, lr):
    """One Adam step; ``t`` (N,) is each image's step count after this step."""
    m = _BETA1 * m + (1.0 - _BETA1) * grad
    v = _BETA2 * v + (1.0 - _BETA2) * tf.square(grad)
    t = expand(tf.cast(t, tf.float32))
    rate = lr * tf.sqrt(1.0 - _BETA2**t) / (1.0 - _BETA1**t)
    return w - rate * m / (tf.sqrt(v) + _ADAM_EPS), m, v

  def _kappa(self, logits, exact):
    """Per-image margin to aim for: kappa, plus the slack on bfloat16 logits (see top).

    ``exact``: the logits are the float32 model's, which need no slack.
    """
    kappa = tf.fill(tf.shape(logits)[:1], tf.constant(self.confidence, tf.float32))
    if self.exact_logits is None or exact:
      return kappa
    return kappa + _BF16_SLACK * tf.stop_gradient(
        tf.reduce_max(tf.abs(logits), axis=-1))

  def f(self, logits, y, exact=False):
    """C&W f6 shifted to be >= 0: ``max(margin + kappa, 0)`` per image."""
    kappa = self._kappa(logits, exact)
    return losses.carlini_wagner_f(logits, y, targeted=self.targeted,
                                   confidence=kappa) + kappa

  def reached(self, logits, y, exact=False):
    """The goal holds on these logits (compute-dtype ones with the bf16 slack)."""
    return losses.reached(logits, y, targeted=self.targeted,
                          confidence=self._kappa(logits, exact)[:, None])

  def confirm(self, mask, images, y):
    """``mask`` where the goal also holds on the float32 model.

    Under bfloat16 the optimisation runs on coarse logits (8-bit mantissa),
    and C&W examples sit right at the decision boundary, so a bfloat16
    "success" is often not one in float32 (C&W-L0: 65% vs 100%). Candidates
    are therefore confirmed with one float32 forward pass of just the masked
    images; in float32 this is ``mask`` itself.
    """
    if self.exact_logits is None:
      return mask
    out = runtime.on_subset(mask, {"x": images, "y": y, "ok": mask}, lambda sub: {
        "ok": self.reached(self.exact_logits(sub["x"]), sub["y"], exact=True)})
    return mask & out["ok"]

  @staticmethod
  def double_on_failure(state, ok, const_factor, largest_const, *, going):
    """L-inf's/L0's schedule of c after a round; returns ``state``, updated.

    Where an active image failed, c is multiplied by ``const_factor``; an
    image stays active while c < ``largest_const`` (checked after a failure)
    and ``going`` (bool (N,), the variant's own condition) holds.
    """
    failed = state["active"] & ~ok
    state["const"] = tf.where(failed, state["const"] * const_factor,
                              state["const"])
    state["active"] = (state["active"]
                       & ~(failed & (state["const"] >= largest_const))
                       & going)
    return state

  def rounds(self, x, y, state, *, make_image, objective, after_round,
             max_iterations, lr, abort_early, max_rounds):
    """The round loop shared by L-inf and L0.

    ``state`` is a dict of per-image tensors holding at least ``const``,
    ``prev`` (last success, initially x), ``active`` and ``found``; ``x`` and
    ``y`` are added to it, and ``make_image(state, w)``, ``objective(state,
    x_new, logits)`` read them from there (they may see only a subset of the
    images). Each round runs Adam from ``to_tanh(prev)`` until every active
    image reaches its goal (``objective`` says which) or ``max_iterations``;
    images that reached it, or are no longer active, leave the batch every
    ``_COMPACT_EVERY`` iterations instead of being carried along.
    ``after_round(state, ok, result)`` then updates the per-image state. Adam
    state carries over a failed round (C&W keep optimising while they double
    c) and restarts after a success.
    """
    zeros = tf.zeros_like(x)
    b = tf.shape(x)[0]
    state = dict(state, x=x, y=y)
    per_round = ("prev", "found", "active")

    def step(i, c, k):
      with tf.GradientTape() as tape:
        tape.watch(c["mod"])
        x_new = make_image(k, k["w_start"] + c["mod"])
        logits = self.logits(x_new)
        loss_i, works = objective(k, x_new, logits)
        loss = tf.reduce_sum(loss_i)
      grad = tape.gradient(loss, c["mod"])
      allowed = abort_early | (i == max_iterations - 1)
      new = self.confirm(works & allowed & c["live"], x_new, k["y"])
      t = c["t"] + 1
      mod, m, v = self.adam(c["mod"], grad, c["m"], c["v"], t, lr)
      return {"mod": mod, "m": m, "v": v, "t": t, "live": c["live"] & ~new,
              "worked": c["worked"] | new,
              "result": tf.where(expand(new), x_new, c["result"])}

    def body(r, state, w_start, mod, m, v, t):
      carry = {"mod": mod, "m": m, "v": v, "t": t, "live": state["active"],
               "worked": tf.zeros([b], tf.bool), "result": x}
      consts = {k: v for k, v in state.items() if k not in per_round}
      carry = compacting_loop(max_iterations, _COMPACT_EVERY, carry,
                               dict(consts, w_start=w_start), step)
      ok, result = carry["worked"] & state["active"], carry["result"]
      state = after_round(dict(state), ok, result)
      state["prev"] = tf.where(expand(ok), result, state["prev"])
      state["found"] = state["found"] | ok
      keep = expand(~ok)
      w_start = tf.where(keep, w_start, self.to_tanh(result))
      mod, m, v = (tf.where(keep, a, zeros) for a in
                   (carry["mod"], carry["m"], carry["v"]))
      t = tf.where(ok, tf.zeros_like(t), carry["t"])
      return r + 1, state, w_start, mod, m, v, t

    def cond(r, state, *_):
      return (r < max_rounds) & tf.reduce_any(state["active"])

    _, state, *_ = tf.while_loop(cond, body, (
        0, state, self.to_tanh(x), zeros, zeros, zeros, tf.zeros([b], tf.int32)))
    return tf.where(expand(state["found"]), state["prev"], x)


def setup(model, x, y, *, variant, targeted, confidence, clip_min, clip_max,
          compute_dtype, batch_size, learning_rate, max_iterations,
          initial_const):
  """Validation and the cached compiled attack, shared by the three variants."""
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  confidence = validation.check_number("confidence", confidence, minimum=0.0)
  validation.check_number("learning_rate", learning_rate, strictly_positive=True)
  validation.check_number("initial_const", initial_const, strictly_positive=True)
  validation.check_int("max_iterations", max_iterations, minimum=1)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  logits_fn = runtime.logits_function(model, compute_dtype)
  inputs = runtime.prepare(x, y, clip_min, clip_max, logits_fn)
  image_shape = tuple(inputs.x.shape[1:])
  key = (variant.__name__, image_shape, bool(targeted), confidence, clip_min,
         clip_max, compute_dtype)
  exact = (runtime.logits_function(model, "float32")
           if compute_dtype == "bfloat16" else None)
  attack = runtime.cached(model, key, lambda: variant(
      logits_fn, image_shape=image_shape, targeted=bool(targeted),
      confidence=confidence, clip_min=clip_min, clip_max=clip_max,
      exact_logits=exact))
  return attack, inputs, batch_size


def run_in_batches(attack, inputs: runtime.Inputs, batch_size: int,
                   *hyperparameters: tf.Tensor) -> Any:
  """``attack.run(x, y, *hyperparameters)`` batch by batch, returned as ``x`` came."""
  return inputs.restore(runtime.in_batches(
      lambda xb, yb: attack.run(xb, yb, *hyperparameters), batch_size,
      inputs.x, inputs.y))


def run_rounds(attack, inputs: runtime.Inputs, batch_size: int,
               shrink_rounds: int, *, initial_const: float, largest_const: float,
               const_factor: float, max_iterations: int, learning_rate: float,
               abort_early: bool, **shrink: float) -> Any:
  """``run_in_batches`` for L-inf/L0, in ``compile_rounds``'s order.

  Rounds: ``shrink_rounds`` (the successes the variant can make) plus every
  multiplication of c, plus two. ``shrink`` are the variant's own float
  hyperparameters (``compile_rounds``'s ``shrink``, in order).
  """
  max_rounds = shrink_rounds + doublings(initial_const, largest_const, const_factor) + 2
  return run_in_batches(
      attack, inputs, batch_size, tf.constant(initial_const, tf.float32),
      tf.constant(largest_const, tf.float32), tf.constant(const_factor, tf.float32),
      *(tf.constant(value, tf.float32) for value in shrink.values()),
      tf.constant(max_iterations), tf.constant(learning_rate, tf.float32),
      tf.constant(bool(abort_early)), tf.constant(max_rounds))


def check_const_schedule(initial_const, largest_const, const_factor):
  """Validates L-inf's and L0's schedule of c; returns (largest_const, const_factor)."""
  initial_const = validation.check_number("initial_const", initial_const,
                                          strictly_positive=True)
  largest_const = validation.check_number("largest_const", largest_const,
                                          strictly_positive=True)
  const_factor = validation.check_number("const_factor", const_factor,
                                         strictly_positive=True)
  if largest_const <= initial_const:
    raise ValueError(f"`largest_const` must be > `initial_const` "
                     f"({initial_const!r}); got {largest_const!r}.")
  if const_factor <= 1.0:
    raise ValueError(f"`const_factor` must be > 1; got {const_factor!r}.")
  return largest_const, const_factor


def doublings(initial_const: float, largest_const: float, factor: float) -> int:
  """How many times c is multiplied by ``factor`` on its way to ``largest_const``, plus one."""
  return math.ceil(math.log(largest_const / initial_const) / math.log(factor)) + 1