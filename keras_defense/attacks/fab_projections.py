"""FAB's projections onto a hyperplane intersected with the box [0, 1]^D, batched.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020, https://arxiv.org/abs/1907.02044; a port of
``projection_linf`` and ``projection_l2`` of the AutoAttack reference
(fra31/auto-attack, ``autoattack/fab_projections.py``) to TensorFlow: the
rows the reference treats by boolean indexing are computed for every row and
selected with ``tf.where``, and the per-row binary search runs
``ceil(log2(D))`` fixed steps like the reference's. The only departure: where
the reference divides by zero (an all-zero normal ``w``), these return a zero
step instead of NaN.

Each function takes points ``t`` (M, D) in [0, 1], normals ``w`` (M, D) and
offsets ``b`` (M,), and returns ``d`` (M, D), the smallest step (in L-inf,
resp. L2) with ``w . (t + d) = b`` and ``t + d`` in the box; where the
hyperplane cannot be reached inside the box, the step towards the box corner
that gets closest.
"""

from __future__ import annotations

import math

from keras_defense.util.compat import tf

_BIG = 1e12


def _gather(params: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
  """Row-wise gather: ``params[i, indices[i, ...]]``."""
  return tf.gather(params, indices, batch_dims=1)


def _binary_search(dim: int, rows: int, holds) -> tf.Tensor:
  """The reference's search: the last index ``k`` in [0, dim - 1] where ``holds(k)``.

  ``holds`` maps int32 (M,) candidate indices to bool (M,).
  """
  lb = tf.zeros([rows], tf.float32)
  ub = tf.fill([rows], tf.constant(dim - 1, tf.float32))
  for _ in range(math.ceil(math.log2(dim))):
    mid = tf.floor((lb + ub) / 2.0)
    c = holds(tf.cast(mid, tf.int32))
    lb = tf.where(c, mid, lb)
    ub = tf.where(c, ub, mid)
  return tf.cast(lb, tf.int32)


def projection_linf(t: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """L-inf projection of ``t`` onto ``{z : w . z = b} cap [0, 1]^D`` (as a step)."""
  rows, dim = tf.shape(t)[0], int(t.shape[1])
  sign = tf.where(tf.reduce_sum(w * t, 1) - b >= 0, 1.0, -1.0)
  w = w * sign[:, None]
  b = b * sign
  nonzero = tf.cast(tf.not_equal(w, 0.0), tf.float32)
  a = tf.cast(w < 0, tf.float32)
  d = (a - t) * nonzero
  p = a - t * (2.0 * a - 1.0)
  indp = tf.argsort(p, axis=1)
  b = b - tf.reduce_sum(w * t, 1)
  b0 = tf.reduce_sum(w * d, 1)
  indp2 = tf.reverse(indp, axis=[1])
  ws = _gather(w, indp2)
  bs2 = -ws * _gather(d, indp2)
  s = tf.cumsum(tf.abs(ws), axis=1)
  sb = tf.cumsum(bs2, axis=1) + b0[:, None]
  b2 = sb[:, -1] - s[:, -1] * _gather(p, indp[:, :1])[:, 0]
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & (b - b2 <= 0)

  def holds(k):
    indcurr = _gather(indp, (dim - 1 - k)[:, None])
    b2 = (_gather(sb, k[:, None]) - _gather(s, k[:, None])
          * _gather(p, indcurr))[:, 0]
    return b - b2 > 0

  lb = _binary_search(dim, rows, holds)[:, None]
  lmbd_l = tf.maximum(tf.math.divide_no_nan(b - sb[:, -1], -s[:, -1]), 0.0)
  d_l = (2.0 * a - 1.0) * lmbd_l[:, None]
  lmbd_2 = tf.maximum(tf.math.divide_no_nan(
      b - _gather(sb, lb)[:, 0], -_gather(s, lb)[:, 0]), 0.0)[:, None]
  d_2 = tf.minimum(lmbd_2, d) * a + tf.maximum(-lmbd_2, d) * (1.0 - a)
  d = tf.where(c_l[:, None], d_l, tf.where(c2[:, None], d_2, d))
  return d * nonzero


def projection_l2(t: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """L2 projection of ``t`` onto ``{z : w . z = b} cap [0, 1]^D`` (as a step)."""
  rows, dim = tf.shape(t)[0], int(t.shape[1])
  c = tf.reduce_sum(w * t, 1) - b
  flip = c < 0
  w = tf.where(flip[:, None], -w, w)
  c = tf.where(flip, -c, c)
  small = tf.abs(w) < 1e-8
  w_safe = tf.where(small, tf.ones_like(w), w)
  r = tf.clip_by_value(tf.maximum(t / w_safe, (t - 1.0) / w_safe), -_BIG, _BIG)
  r = tf.where(small, _BIG, r)
  r = tf.where(tf.equal(r, -_BIG), _BIG, r)
  indr = tf.argsort(r, axis=1)
  rs = _gather(r, indr)
  rs2 = tf.pad(rs[:, 1:], [[0, 0], [0, 1]])
  rs = tf.where(tf.equal(rs, _BIG), 0.0, rs)
  rs2 = tf.where(tf.equal(rs2, _BIG), 0.0, rs2)
  w3s = _gather(tf.square(w), indr)
  w5 = tf.reduce_sum(w3s, 1, keepdims=True)
  ws = w5 - tf.cumsum(w3s, axis=1)
  big = tf.cast(tf.logical_not(small), tf.float32)
  d = -(r * w) * big
  s = tf.concat([-w5 * rs[:, :1],
                 tf.cumsum((-rs2 + rs) * ws, axis=1) - w5 * rs[:, :1]], 1)
  c4 = s[:, 0] + c < 0
  c3 = tf.reduce_sum(d * w, 1) + c > 0
  c2 = tf.logical_not(c4) & tf.logical_not(c3)
  lb = _binary_search(
      dim, rows, lambda k: _gather(s, k[:, None])[:, 0] + c > 0)[:, None]
  d_4 = -tf.math.divide_no_nan(c, w5[:, 0])[:, None] * w
  ws_lb = _gather(ws, lb)[:, 0]
  alpha = tf.math.divide_no_nan(_gather(s, lb)[:, 0] + c, ws_lb) + _gather(rs, lb)[:, 0]
  alpha = tf.where(tf.equal(ws_lb, 0.0), 0.0, alpha)[:, None]
  c5 = tf.cast(alpha > r, tf.float32)
  d_2 = d * c5 - alpha * w * (1.0 - c5)
  d = tf.where(c4[:, None], d_4, tf.where(c2[:, None], d_2, d))
  return d * big
