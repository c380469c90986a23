"""Square Attack: score-based random search on the margin, L-inf and L2, compiled.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020,
https://arxiv.org/abs/1912.00049; as in AutoAttack's reference implementation
(fra31/auto-attack, ``autoattack/square.py``), which this follows step for
step: margin loss ``Z_y - max_{i != y} Z_i``; L-inf start from vertical
stripes of +-epsilon; each query changes one square window (side
``sqrt(p * H * W)``) to +-epsilon per channel around the best point so far and
keeps it if the margin drops; ``p`` halves after iterations 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 from ``p_init`` (AutoAttack does not rescale
this schedule for its 5,000 queries); the L2 version moves mass between two
windows with the paper's centred "eta" pattern. As in the reference, the
window position, the L-inf signs and the pattern's orientation of an iteration
are shared by every image of the batch; here they come from a stateless RNG
keyed on (seed, iteration), so a run is reproducible and each image's search
does not depend on which other images are still being attacked.

Score-based: the model is only ever called forward, never differentiated.
The query loop runs inside one ``tf.function``: a ``tf.while_loop`` whose body
runs ``UNROLL`` queries, and at every such chunk boundary the images already
fooled leave the batch (gather, run, scatter back), so they stop costing
forward passes; within a chunk they are masked and not counted. Steps past
the budget (when ``queries - 1`` is not a multiple of ``UNROLL``) are skipped,
so a batch costs exactly ``queries + 2`` model calls while nothing is fooled
(the clean prediction, the start, ``queries - 1`` candidates, the final
check; ``runtime.prepare`` adds one single-image call per attack).

Query counts are exact per image and include the initial (stripes) query:
an image fooled by its k-th model call reports k; one never fooled reports
``queries``; one misclassified from the start reports 0 and is returned
unchanged. (The reference runs ``n_queries`` iterations after its initial
query, i.e. up to ``n_queries + 1`` calls; here ``queries`` is the total
budget.)

Example:
  >>> x_adv, n_queries = square(model, x, y, 0.3, return_queries=True)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

DEFAULT_BATCH_SIZE = 1000
_TINY = 1e-12
# Queries per tf.while_loop iteration; fooled images leave the batch between
# chunks (see the module docstring).
UNROLL = 8
# p_selection of the reference: p = p_init / 2**k after the k-th of these
# iterations (0-based iteration index, strictly greater).
_P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_sides(p_init: float, height: int, width: int, norm: str) -> list[int]:
  """The square's side for each stage of the p schedule, as the reference rounds it.

  The reference computes ``max(int(round(sqrt(p * n_features / c))), 1)``
  (L-inf) or ``max(..., 3)`` made odd (L2), with Python's ``round``.
  """
  sides = []
  for k in range(len(_P_SCHEDULE) + 1):
    p = p_init / 2**k
    s = int(round(math.sqrt(p * height * width)))
    if norm == "linf":
      s = max(s, 1)
    else:
      s = max(s, 3)
      if s % 2 == 0:
        s += 1
    sides.append(min(s, height, width))
  return sides


def _eta_rectangle(rows: int, cols: int) -> np.ndarray:
  """The reference's ``eta_rectangles``: nested rectangles weighted 1/(k+1)^2."""
  delta = np.zeros([rows, cols], np.float64)
  xc, yc = rows // 2 + 1, cols // 2 + 1
  r0, c0 = xc - 1, yc - 1
  for k in range(max(xc, yc)):
    delta[max(r0, 0):min(r0 + 2 * k + 1, rows),
          max(0, c0):min(c0 + 2 * k + 1, cols)] += 1.0 / (k + 1)**2
    r0 -= 1
    c0 -= 1
  return delta / np.sqrt(np.sum(delta**2))


def eta_pattern(s: int) -> np.ndarray:
  """The reference's ``eta(s)`` before its random transpose: (s, s), unit L2 norm."""
  delta = np.zeros([s, s], np.float64)
  delta[:s // 2] = _eta_rectangle(s // 2, s)
  delta[s // 2:] = -_eta_rectangle(s - s // 2, s)
  return delta / np.sqrt(np.sum(delta**2))


def _stage(i: tf.Tensor) -> tf.Tensor:
  """Index of iteration ``i``'s stage in the p schedule (0 = p_init)."""
  return tf.reduce_sum(tf.cast(i > tf.constant(_P_SCHEDULE), tf.int32))


def iteration_draws(seed: tf.Tensor, i: tf.Tensor, sides: tf.Tensor, height: int,
                    width: int, channels: int) -> dict:
  """The random choices of iteration ``i`` shared by the whole batch.

  Returns a dict of scalars: ``s`` (the window side), ``vh``/``vw`` and
  ``vh2``/``vw2`` (top-left corners of the first and, for L2, second window,
  drawn as the reference's ``random_int(0, H - s)``, i.e. in [0, H - s - 1]
  or 0), ``flip`` (L2: the eta pattern is transposed), and ``signs``
  (channels,) of +-1 (L-inf: the window's sign per channel).
  """
  key = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64))
  u = tf.random.stateless_uniform([5 + channels], key)
  s = tf.gather(sides, _stage(i))
  def corner(v, size):
    return tf.cast(tf.floor(tf.cast(size - s, tf.float32) * v), tf.int32)
  return {"s": s, "vh": corner(u[0], height), "vw": corner(u[1], width),
          "vh2": corner(u[2], height), "vw2": corner(u[3], width),
          "flip": u[4] > 0.5, "signs": tf.sign(2.0 * u[5:] - 1.0)}


def _window(corner_h, corner_w, s, height, width) -> tf.Tensor:
  """Float mask (1, H, W, 1) of the s x s window at (corner_h, corner_w)."""
  rows = tf.range(height)
  cols = tf.range(width)
  in_rows = (rows >= corner_h) & (rows < corner_h + s)
  in_cols = (cols >= corner_w) & (cols < corner_w + s)
  mask = tf.cast(in_rows[:, None] & in_cols[None, :], tf.float32)
  return mask[None, :, :, None]


def _l2(t: tf.Tensor, axis=(1, 2, 3)) -> tf.Tensor:
  return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axis, keepdims=True))


class SquareAttack:
  """Compiled Square Attack for one (model, norm, image shape, p_init, clip).

  ``run(x, y, epsilon, queries, seed)`` -> ``(x_adv, queries, fooled)``: the
  adversarial where the image was fooled (else ``x``), the per-image query
  counts and the fooled mask; ``queries`` is the budget per image.
  """

  def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *,
               image_shape: tuple[int, ...], norm: str, p_init: float,
               clip_min: float, clip_max: float):
    # The model is traced once and called from every unrolled query (tracing
    # a Keras model per copy made the first call several times slower).
    self._logits = tf.function(logits_fn, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32)])
    self._norm = norm
    self._clip = (clip_min, clip_max)
    self._h, self._w, self._c = image_shape
    self._sides = window_sides(p_init, self._h, self._w, norm)
    if norm == "l2":
      # eta(s) for every side of the schedule, at the top-left corner of an
      # H x W canvas; a window is placed by rolling the canvas (never wraps).
      canvases = np.zeros([len(self._sides), self._h, self._w], np.float32)
      for k, s in enumerate(self._sides):
        canvases[k, :s, :s] = eta_pattern(s)
      self._eta = tf.constant(canvases)
      self._tiles = (tf.constant(self._l2_init_tiles(False)),
                     tf.constant(self._l2_init_tiles(True)))
    self.run = tf.function(self._run, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([2], tf.int64),
    ])

  def _l2_init_tiles(self, transpose: bool) -> np.ndarray:
    """The L2 start's tiles: (T, H, W), eta(H // 5) on each cell of the reference's grid.

    ``transpose``: the pattern transposed (the reference flips a coin per tile).
    Where the grid overhangs the image (e.g. 12 x 12: six tiles of 2 from
    pixel 1) the overhang is cut; the reference fails on such sizes.
    """
    h, w = self._h, self._w
    s = h // 5
    start = (h - s * 5) // 2
    patch = eta_pattern(s).T if transpose else eta_pattern(s)
    tiles = []
    for r in range(h // s):
      for q in range(w // s):
        vh, vw = start + r * s, start + q * s
        tile = np.zeros([h, w], np.float32)
        rows, cols = min(s, h - vh), min(s, w - vw)
        tile[vh:vh + rows, vw:vw + cols] = patch[:rows, :cols]
        tiles.append(tile)
    return np.stack(tiles)

  def margin(self, x_adv, y):
    """The reference's margin ``Z_y - max_{i != y} Z_i`` (> 0: still correct)."""
    return -losses.margin(self._logits(x_adv), y)

  def _start(self, x, epsilon, seed):
    """The first point: L-inf vertical stripes, L2 the tiled eta patterns."""
    n = tf.shape(x)[0]
    lo, hi = self._clip
    if self._norm == "linf":
      u = tf.random.stateless_uniform([n, 1, self._w, self._c], seed)
      return tf.clip_by_value(x + epsilon * tf.sign(2.0 * u - 1.0), lo, hi)
    tiles, tiles_t = self._tiles     # (T, H, W) each
    u = tf.random.stateless_uniform([n, tiles.shape[0], self._c], seed)
    # Each tile gets eta(s) (transposed or not: one coin per tile, shared by
    # the batch, like the reference's torch.rand inside eta()) times a random
    # sign per image and channel.
    flips = tf.random.stateless_uniform(
        [tiles.shape[0]], tf.random.experimental.stateless_fold_in(seed, 2)) > 0.5
    tiles = tf.where(flips[:, None, None], tiles_t, tiles)
    delta = tf.einsum("thw,ntc->nhwc", tiles, tf.sign(2.0 * u - 1.0))
    delta = delta / (_l2(delta) + _TINY) * epsilon
    return tf.clip_by_value(x + delta, lo, hi)

  def _candidate_linf(self, c, draws, epsilon):
    mask = _window(draws["vh"], draws["vw"], draws["s"], self._h, self._w)
    x_new = c["best"] + mask * (2.0 * epsilon) * draws["signs"]
    return tf.clip_by_value(x_new, c["lower"], c["upper"])

  def _candidate_l2(self, c, draws, epsilon, seed, n_total):
    x, best = c["x"], c["best"]
    s = draws["s"]
    delta = best - x
    mask1 = _window(draws["vh"], draws["vw"], s, self._h, self._w)
    mask2 = _window(draws["vh2"], draws["vw2"], s, self._h, self._w)
    stage = _stage(c["i"])
    eta = tf.gather(self._eta, stage)
    eta = tf.where(draws["flip"], tf.transpose(eta), eta)
    eta = tf.roll(eta, [draws["vh"], draws["vw"]], axis=[0, 1])[None, :, :, None]
    # Per-image, per-channel signs: drawn for the whole batch and picked by
    # each image's index, so they do not depend on which images are live.
    key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(seed, tf.cast(c["i"], tf.int64)), 1)
    signs = tf.sign(2.0 * tf.random.stateless_uniform([n_total, self._c], key) - 1.0)
    signs = tf.gather(signs, c["index"])[:, None, None, :]

    norms_window_1 = _l2(delta * mask1, axis=(1, 2))        # (n, 1, 1, C)
    norms_image = _l2(delta)                                   # (n, 1, 1, 1)
    norms_windows = _l2(delta * tf.maximum(mask1, mask2))      # (n, 1, 1, 1)
    new = eta * signs + delta * mask1 / (_TINY + norms_window_1)
    budget = tf.sqrt(tf.maximum(tf.square(epsilon) - tf.square(norms_image), 0.0)
                     / self._c + tf.square(norms_windows))
    new = new / (_TINY + _l2(new, axis=(1, 2))) * budget
    delta = delta * (1.0 - mask2)
    delta = delta * (1.0 - mask1) + new * mask1
    x_new = x + delta / (_l2(delta) + _TINY) * epsilon
    return tf.clip_by_value(x_new, *self._clip)

  def _run(self, x, y, epsilon, queries, seed):
    n = tf.shape(x)[0]
    correct = tf.argmax(self._logits(x), -1) == y
    best = self._start(x, epsilon, seed)
    margin_min = self.margin(best, y)
    n_queries = tf.cast(correct, tf.int32)
    iterations = queries - 1
    sides = tf.constant(self._sides, tf.int32)
    lo, hi = self._clip
    carry = {"x": x, "y": y, "best": best, "margin": margin_min,
             "queries": n_queries, "live": correct & (margin_min > 0.0),
             "index": tf.range(n), "lower": tf.maximum(x - epsilon, lo),
             "upper": tf.minimum(x + epsilon, hi)}
    loop_seed = tf.random.experimental.stateless_fold_in(seed, 1)

    def step(i, c):
      """Iteration ``i`` (0-based; query i + 2) on the images in ``c``."""
      active = c["live"] & (i < iterations)
      draws = iteration_draws(loop_seed, i, sides, self._h, self._w, self._c)
      if self._norm == "linf":
        x_new = self._candidate_linf(c, draws, epsilon)
      else:
        x_new = self._candidate_l2(dict(c, i=i), draws, epsilon, loop_seed, n)
      margin = self.margin(x_new, c["y"])
      # Loss = margin: improved iff it dropped (a drop to <= 0 included).
      improved = active & (margin < c["margin"])
      out = dict(c)
      out["best"] = tf.where(improved[:, None, None, None], x_new, c["best"])
      out["margin"] = tf.where(improved, margin, c["margin"])
      out["queries"] = c["queries"] + tf.cast(active, tf.int32)
      out["live"] = c["live"] & (out["margin"] > 0.0)
      return out

    def chunk(i0, c):
      def run(sub):
        for u in range(UNROLL):
          # The last chunk may reach past the budget: such a step would
          # change nothing (no image is active) but still call the model.
          sub = tf.cond(i0 + u < iterations, lambda i=i0 + u, s=sub: step(i, s),
                        lambda s=sub: s)
        return sub
      return i0 + UNROLL, runtime.on_subset(c["live"], c, run)

    _, carry = tf.while_loop(
        lambda i0, c: (i0 < iterations) & tf.reduce_any(c["live"]),
        chunk, (tf.constant(0), carry))
    best = carry["best"]
    # Success as the reference's perturb() scores it: the model's prediction
    # on the returned point (checked once more on the whole batch).
    fooled = correct & (carry["margin"] <= 0.0) & (
        tf.argmax(self._logits(best), -1) != y)
    x_adv = tf.where(fooled[:, None, None, None], best, x)
    return x_adv, carry["queries"], fooled


def square(model: Any, x: Any, y: Any, epsilon: float, *, norm: str = "linf",
           queries: int = 5000, p_init: float = 0.8, clip_min: float = 0.0,
           clip_max: float = 1.0, batch_size: int = DEFAULT_BATCH_SIZE,
           seed: int = 0, return_queries: bool = False) -> Any:
  """Square Attack (Andriushchenko et al. 2020), untargeted, margin loss.

  Defaults are AutoAttack's: 5,000 queries, p_init 0.8, no rescaling of the
  p schedule.

  Args:
    model: a Keras model (called with ``training=False``) or any callable
      mapping images to logits (N, K). Only forward calls are made.
    x: images, float32 (N, H, W, C) in [clip_min, clip_max]; numpy or tensor.
    y: int (N,) true labels.
    epsilon: radius >= 0 of the ``norm`` ball, in pixel units.
    norm: "linf" or "l2".
    queries: model calls per image at most (the initial one included), >= 1.
    p_init: initial fraction of the image a square covers, in (0, 1].
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    batch_size: images per compiled call.
    seed: seed (>= 0) of the stateless random draws; the same seed gives the
      same result.
    return_queries: also return the per-image query counts.

  Returns:
    ``x_adv``: same shape/dtype/kind as ``x``; an image the attack fooled is
    replaced by its adversarial (inside the ball and the box), every other
    image is returned unchanged. With ``return_queries``: ``(x_adv,
    n_queries)``, ``n_queries`` int64 numpy (N,): 0 for an image already
    misclassified, k for one fooled by its k-th query, ``queries`` for one
    never fooled. At epsilon 0 nothing is searched: ``x`` is returned and
    every count is 0.

  Raises:
    ValueError: epsilon < 0, queries < 1, p_init outside (0, 1], an unknown
      norm, labels out of range or not one per image, bad images.
    TypeError: non-numeric arguments, non-integer labels, a model that is not
      callable.
  """
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  epsilon = validation.check_number("epsilon", epsilon, minimum=0.0)
  validation.check_choice("norm", norm, validation.NORMS)
  queries = validation.check_int("queries", queries, minimum=1)
  p_init = validation.check_fraction("p_init", p_init, zero_ok=False)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  seed = validation.check_int("seed", seed, minimum=0)
  logits_fn = runtime.logits_function(model, "float32")
  inputs = runtime.prepare(x, y, clip_min, clip_max, logits_fn)
  if epsilon == 0.0:   # nothing to search: no query is made
    x_adv = inputs.restore(inputs.x.copy())
    counts = np.zeros(inputs.x.shape[0], np.int64)
    return (x_adv, counts) if return_queries else x_adv
  image_shape = tuple(inputs.x.shape[1:])
  key = ("square", image_shape, norm, p_init, clip_min, clip_max)
  attack = runtime.cached(model, key, lambda: SquareAttack(
      logits_fn, image_shape=image_shape, norm=norm, p_init=p_init,
      clip_min=clip_min, clip_max=clip_max))

  advs, counts = [], []
  for b, start in enumerate(range(0, inputs.x.shape[0], batch_size)):
    xb = tf.constant(inputs.x[start:start + batch_size])
    yb = tf.constant(inputs.y[start:start + batch_size])
    x_adv, n_queries, _ = attack.run(xb, yb, tf.constant(epsilon, tf.float32),
                                     tf.constant(queries, tf.int32),
                                     tf.constant([seed, b], tf.int64))
    advs.append(x_adv.numpy())
    counts.append(n_queries.numpy())
  x_adv = inputs.restore(np.concatenate(advs))
  if return_queries:
    return x_adv, np.concatenate(counts).astype(np.int64)
  return x_adv
