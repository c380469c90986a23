"""Certified bounds on a network's logits and margins: IBP, CROWN-IBP and CROWN.

The input set is the ε-ball around each image intersected with the pixel
range, ``{x' : ||x' - x|| <= ε, clip_min <= x' <= clip_max}``, for the L∞ or
the L2 norm. Three methods bound what a network (see ``network.parse``) can
output on it:

* ``"ibp"``, interval bound propagation (Gowal et al. 2018,
  https://arxiv.org/abs/1810.12715): each node's output is bounded by a box,
  pushed forward in center/radius form (``μ' = Lμ + b``, ``r' = |L| r``),
  ReLU and max pooling monotonically. For L2 the first Dense/Conv2D uses the
  exact dual-norm bound ``ε ||row||₂`` (intersected with the box).
* ``"crown_ibp"`` (Zhang et al., ICLR 2020, https://arxiv.org/abs/1906.06316):
  IBP bounds for every intermediate node, then one CROWN backward pass from
  the margin specification: each ReLU is bounded by two lines (the triangle's
  upper chord and a lower line of slope 0 or 1), each max pool by its input
  with the largest lower bound (below) and the largest upper bound (above),
  and the linear bound on the margin, a function of the input, is minimised
  exactly over the input set.
* ``"crown"`` (Zhang et al., NeurIPS 2018, https://arxiv.org/abs/1811.00866):
  the bounds of every node feeding a ReLU or max pool are themselves computed
  by a CROWN backward pass (one specification per neuron, so cost grows with
  neurons × input size: fine for small dense and conv nets, refused with a
  ``UserError`` when a node would need more than ``CROWN_MAX_ELEMENTS``
  floats per image), intersected with the interval bounds from the layer
  below; then the margin pass as in CROWN-IBP.

Margins: the specification "the true class y beats every class j", ``z_y -
z_j > 0``, is folded into the last linear layer (elision, as both papers do:
``(e_y - e_j)ᵀ (W h + b)`` is bounded as one linear function of ``h``), for
IBP too. An image is certified when every lower bound for ``j ≠ y`` is > 0.

Which is tighter. A CROWN bound is not always above the IBP bound: the lower
line of slope 1 that CROWN picks for a ReLU with ``u > -l`` goes below 0 on
``[l, 0]``, and where IBP's box is exact that can lose. What holds (and
``tests/test_certify.py`` checks): with ``lower_slope="zero"``, CROWN-IBP's
margin bound is >= IBP's on every image and class (each relaxed ReLU is then
exact at the box level, and minimising a sum jointly is >= minimising each
term). ``certify`` therefore takes, for the CROWN methods, the better of the
CROWN and the IBP bound per class (both are sound), so an image certified by
IBP is certified by every method.

Example:
  >>> margins = margin_bounds(model, x, y, 0.1, method="crown_ibp")
  >>> ok = certify(model, x, y, 0.1, method="crown_ibp")   # bool (N,)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_defense.attacks import runtime
from keras_defense.certify import network as net_lib
from keras_defense.models import pixels as pixels_lib
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

METHODS = ("ibp", "crown_ibp", "crown")


def check_methods(methods: Any, what: str = "methods") -> tuple[str, ...]:
  """``methods`` as a tuple; UserError naming ``what`` unless each is in METHODS, none twice."""
  methods = tuple(methods)
  if not all(m in METHODS for m in methods) or len(set(methods)) != len(methods):
    raise UserError(f"`{what}` must list distinct methods among {', '.join(METHODS)}; got "
                    f"{list(methods)}.")
  return methods
NORMS = ("linf", "l2")
LOWER_SLOPES = ("adaptive", "zero")
# Full CROWN refuses a network whose intermediate bounds would need a backward
# pass holding more than this many floats per image (400 MB).
CROWN_MAX_ELEMENTS = 100_000_000
DEFAULT_BATCH_SIZE = 256


# --- the input set ------------------------------------------------------------

class _InputSet:
  """The ε-ball around x intersected with [clip_min, clip_max]; a box plus, for L2, the ball."""

  def __init__(self, x: tf.Tensor, epsilon: tf.Tensor, norm: str, clip_min: float,
               clip_max: float):
    self.x = x
    eps = tf.reshape(tf.cast(epsilon, tf.float32), (-1,) + (1,) * (x.shape.rank - 1))
    self.eps = eps
    self.norm = norm
    self.lower = tf.clip_by_value(x - eps, clip_min, clip_max)
    self.upper = tf.clip_by_value(x + eps, clip_min, clip_max)

  def minimum(self, a: tf.Tensor) -> tf.Tensor:
    """min over the set of <a, x'>, for a of shape (B, S, *image): (B, S)."""
    axes = list(range(2, a.shape.rank))
    mid = tf.expand_dims((self.lower + self.upper) / 2, 1)
    rad = tf.expand_dims((self.upper - self.lower) / 2, 1)
    box = tf.reduce_sum(a * mid, axes) - tf.reduce_sum(tf.abs(a) * rad, axes)
    if self.norm == "linf":
      return box
    eps = tf.reshape(self.eps, (-1, 1))
    ball = tf.reduce_sum(a * tf.expand_dims(self.x, 1), axes) - eps * tf.norm(
        tf.reshape(a, tf.concat([tf.shape(a)[:2], [-1]], 0)), axis=-1)
    return tf.maximum(box, ball)


def _l2_first_layer(node: net_lib.Node, inputs: _InputSet, lower, upper):
  """IBP's first Dense/Conv2D under L2: intersect the box bound with ±ε||row||₂."""
  if inputs.norm != "l2" or node.inputs != [net_lib.INPUT] or node.kind != "linear":
    return lower, upper
  if node.kernel is None:
    return lower, upper
  k = node.kernel()
  row_norm = tf.norm(tf.reshape(k, (-1, k.shape[-1])), axis=0)  # per output channel
  center = node.apply(inputs.x)
  if node.bias is not None:
    center = center + node.bias()
  eps = tf.reshape(inputs.eps, (-1,) + (1,) * len(node.out_shape))
  return tf.maximum(lower, center - eps * row_norm), tf.minimum(upper, center + eps * row_norm)


# --- IBP ------------------------------------------------------------------------

def _interval(node: net_lib.Node, bounds: dict, inputs: _InputSet):
  """The box of ``node``'s output from the boxes of its inputs."""
  ins = [bounds[i] for i in node.inputs]
  if node.kind == "linear":
    lo, hi = ins[0]
    mid, rad = node.apply((lo + hi) / 2), node.apply_abs((hi - lo) / 2)
    if node.bias is not None:
      mid = mid + node.bias()
    return _l2_first_layer(node, inputs, mid - rad, mid + rad)
  if node.kind == "relu":
    return tf.nn.relu(ins[0][0]), tf.nn.relu(ins[0][1])
  if node.kind == "maxpool":
    size, strides, padding = node.pool
    return (tf.nn.max_pool2d(ins[0][0], size, strides, padding),
            tf.nn.max_pool2d(ins[0][1], size, strides, padding))
  if node.kind == "add":
    return tf.add_n([b[0] for b in ins]), tf.add_n([b[1] for b in ins])
  raise ValueError(f"unknown node kind {node.kind!r}")


def _ibp_bounds(network: net_lib.Network, inputs: _InputSet) -> dict:
  bounds = {net_lib.INPUT: (inputs.lower, inputs.upper)}
  for i, node in enumerate(network.nodes):
    bounds[i] = _interval(node, bounds, inputs)
  return bounds


# --- CROWN backward pass ----------------------------------------------------------

def _relu_relaxation(lower, upper, lower_slope: str):
  """Slopes and intercept of the two lines bounding relu on [lower, upper]."""
  active, unstable = lower >= 0, tf.logical_and(lower < 0, upper > 0)
  width = tf.where(unstable, upper - lower, tf.ones_like(upper))
  up_slope = tf.where(unstable, upper / width, tf.cast(active, upper.dtype))
  up_intercept = tf.where(unstable, -lower * upper / width, tf.zeros_like(upper))
  if lower_slope == "adaptive":
    low_unstable = tf.cast(upper > -lower, upper.dtype)
  else:
    low_unstable = tf.zeros_like(upper)
  low_slope = tf.where(unstable, low_unstable, tf.cast(active, upper.dtype))
  return low_slope, up_slope, up_intercept


def _sum_tail(t: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(t, list(range(2, t.shape.rank)))


def _maxpool_backward(node: net_lib.Node, a: tf.Tensor, lower, upper):
  """Lower-bounds <a, maxpool(h)>: h's argmax-of-lower below, max of upper above."""
  size, strides, padding = node.pool
  _, idx = tf.nn.max_pool_with_argmax(lower, size, strides, padding,
                                      include_batch_in_index=False)
  up_max = tf.nn.max_pool2d(upper, size, strides, padding)
  pos, neg = tf.nn.relu(a), tf.minimum(a, 0.0)
  bias = _sum_tail(neg * tf.expand_dims(up_max, 1))
  batch, specs = tf.shape(a)[0], tf.shape(a)[1]
  n_in, n_out = int(np.prod(node.in_shape)), int(np.prod(node.out_shape))
  data = tf.reshape(tf.transpose(tf.reshape(pos, (batch, specs, n_out)), (0, 2, 1)),
                    (-1, specs))
  segment = tf.reshape(tf.cast(idx, tf.int32), (batch, n_out)) + \
      n_in * tf.range(batch)[:, None]
  moved = tf.math.unsorted_segment_sum(data, tf.reshape(segment, (-1,)), batch * n_in)
  moved = tf.transpose(tf.reshape(moved, (batch, n_in, specs)), (0, 2, 1))
  shape = tf.concat([tf.stack([batch, specs]), tf.constant(node.in_shape, tf.int32)], 0)
  return tf.reshape(moved, shape), bias


def _backward(network: net_lib.Network, target: int, spec: tf.Tensor, bounds: dict,
              inputs: _InputSet, lower_slope: str) -> tf.Tensor:
  """Lower bound over the input set of <spec, output of node ``target``>, (B, S).

  ``spec`` is (B, S, *shape of target); ``bounds`` holds the boxes of every
  node feeding a ReLU or max pool below ``target``.
  """
  pending = {target: spec}
  bias = tf.zeros(tf.shape(spec)[:2], spec.dtype)
  for i in range(target, -1, -1):
    if i not in pending:
      continue
    a, node = pending.pop(i), network.nodes[i]
    if node.kind == "linear":
      if node.bias is not None:
        bias += _sum_tail(a * node.bias())
      moved = [node.transpose(a)]
    elif node.kind == "relu":
      lo, hi = bounds[node.inputs[0]]
      low_slope, up_slope, up_intercept = (tf.expand_dims(t, 1) for t in
                                           _relu_relaxation(lo, hi, lower_slope))
      pos, neg = tf.nn.relu(a), tf.minimum(a, 0.0)
      bias += _sum_tail(neg * up_intercept)
      moved = [pos * low_slope + neg * up_slope]
    elif node.kind == "maxpool":
      lo, hi = bounds[node.inputs[0]]
      m, b = _maxpool_backward(node, a, lo, hi)
      bias += b
      moved = [m]
    else:  # add
      moved = [a] * len(node.inputs)
    for j, m in zip(node.inputs, moved):
      pending[j] = pending[j] + m if j in pending else m
  return inputs.minimum(pending[net_lib.INPUT]) + bias


def _identity_spec(shape: tuple[int, ...], batch: tf.Tensor) -> tf.Tensor:
  """[I; -I] over the elements of a node, (B, 2n, *shape)."""
  n = int(np.prod(shape))
  eye = tf.reshape(tf.eye(n), (n,) + shape)
  both = tf.concat([eye, -eye], 0)
  return tf.tile(tf.expand_dims(both, 0), tf.concat([[batch], tf.ones(1 + len(shape),
                                                                     tf.int32)], 0))


def _needed(network: net_lib.Network) -> set[int]:
  """The nodes whose boxes a backward pass uses: inputs of ReLU and max pool nodes."""
  return {n.inputs[0] for n in network.nodes if n.kind in ("relu", "maxpool")}


def crown_cost(network: net_lib.Network) -> int:
  """Floats per image that full CROWN's largest intermediate backward pass holds."""
  sizes = [int(np.prod(network.input_shape))] + [int(np.prod(n.out_shape))
                                                 for n in network.nodes]
  cost = 0
  for i in (i for i in _needed(network) if i >= 0):
    cost = max(cost, 2 * sizes[i + 1] * max(sizes[:i + 2]))
  return cost


def _crown_bounds(network: net_lib.Network, inputs: _InputSet, lower_slope: str) -> dict:
  """Boxes of every node: IBP from the boxes below, tightened by CROWN where needed."""
  bounds = {net_lib.INPUT: (inputs.lower, inputs.upper)}
  needed = _needed(network)
  batch = tf.shape(inputs.x)[0]
  for i, node in enumerate(network.nodes):
    lo, hi = _interval(node, bounds, inputs)
    if i in needed:
      n = int(np.prod(node.out_shape))
      low = _backward(network, i, _identity_spec(node.out_shape, batch), bounds, inputs,
                      lower_slope)
      shape = tf.concat([[batch], tf.constant(node.out_shape, tf.int32)], 0)
      lo = tf.maximum(lo, tf.reshape(low[:, :n], shape))
      hi = tf.minimum(hi, tf.reshape(-low[:, n:], shape))
    bounds[i] = (lo, hi)
  return bounds


# --- margins --------------------------------------------------------------------

def _margin_spec(y: tf.Tensor, num_classes: int) -> tf.Tensor:
  """(B, K, K): row j is e_y - e_j (zero for j = y)."""
  return tf.expand_dims(tf.one_hot(y, num_classes), 1) - tf.eye(num_classes)[None]


def _ibp_margins(network: net_lib.Network, bounds: dict, spec: tf.Tensor) -> tf.Tensor:
  last = network.nodes[-1]
  if last.kind != "linear":
    lo, hi = bounds[len(network.nodes) - 1]
    return _sum_tail(tf.nn.relu(spec) * tf.expand_dims(lo, 1)
                     + tf.minimum(spec, 0.0) * tf.expand_dims(hi, 1))
  lo, hi = bounds[last.inputs[0]]
  a = last.transpose(spec)
  mid, rad = tf.expand_dims((lo + hi) / 2, 1), tf.expand_dims((hi - lo) / 2, 1)
  out = _sum_tail(a * mid) - _sum_tail(tf.abs(a) * rad)
  if last.bias is not None:
    out += _sum_tail(spec * last.bias())
  return out


class BoundedNetwork:
  """A parsed model with its bound computations (uncompiled; see ``bounded``)."""

  def __init__(self, model: keras.Model, pixels: pixels_lib.PixelConvention | None = None):
    self.pixels = pixels  # None: [0, 1] pixels (``bounded`` passes None for the identity)
    self.network = net_lib.parse(model, pixels)
    shape = self.network.output_shape
    if len(shape) != 1:
      raise UserError(f"bounds need a model with logits of shape (N, K); got {shape}.")
    self.num_classes = shape[0]

  def check(self, method: str, norm: str, lower_slope: str) -> None:
    for name, value, choices in (("method", method, METHODS), ("norm", norm, NORMS),
                                 ("lower_slope", lower_slope, LOWER_SLOPES)):
      if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(choices)}; got {value!r}.")
    if method == "crown":
      cost = crown_cost(self.network)
      if cost > CROWN_MAX_ELEMENTS:
        raise UserError(
            f"method 'crown' on this network needs ~{cost * 4 / 1e9:.1f} GB per image for "
            f"its intermediate bounds (one backward pass per neuron; limit "
            f"{CROWN_MAX_ELEMENTS * 4 / 1e9:.1f} GB). Fix: use method 'crown_ibp'.")

  def _bounds(self, inputs: _InputSet, method: str, lower_slope: str) -> dict:
    if method == "crown":
      return _crown_bounds(self.network, inputs, lower_slope)
    return _ibp_bounds(self.network, inputs)

  def logit_bounds(self, x, epsilon, *, method: str = "ibp", norm: str = "linf",
                   lower_slope: str = "adaptive", clip_min: float = 0.0,
                   clip_max: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Lower and upper bounds of every logit over the input set, (B, K) each."""
    self.check(method, norm, lower_slope)
    inputs = _InputSet(tf.convert_to_tensor(x, tf.float32), epsilon, norm, clip_min, clip_max)
    bounds = self._bounds(inputs, method, lower_slope)
    lo, hi = bounds[len(self.network.nodes) - 1]
    if method == "ibp":
      return lo, hi
    k = self.num_classes
    low = _backward(self.network, len(self.network.nodes) - 1,
                    _identity_spec((k,), tf.shape(inputs.x)[0]), bounds, inputs, lower_slope)
    return tf.maximum(lo, low[:, :k]), tf.minimum(hi, -low[:, k:])

  def margins(self, x, y, epsilon, *, method: str = "ibp", norm: str = "linf",
              lower_slope: str = "adaptive", clip_min: float = 0.0,
              clip_max: float = 1.0, with_ibp: bool = False) -> tf.Tensor:
    """Lower bounds of z_y - z_j over the input set, (B, K); 0 at j = y.

    ``with_ibp`` (CROWN methods) returns the better of the CROWN and the IBP
    bound per class.
    """
    self.check(method, norm, lower_slope)
    x = tf.convert_to_tensor(x, tf.float32)
    inputs = _InputSet(x, epsilon, norm, clip_min, clip_max)
    spec = _margin_spec(tf.cast(y, tf.int32), self.num_classes)
    bounds = self._bounds(inputs, method, lower_slope)
    if method == "ibp":
      return _ibp_margins(self.network, bounds, spec)
    out = _backward(self.network, len(self.network.nodes) - 1, spec, bounds, inputs,
                    lower_slope)
    if with_ibp:
      out = tf.maximum(out, _ibp_margins(self.network, bounds, spec))
    return out


def bounded(model: keras.Model,
            pixels: pixels_lib.PixelConvention | None = None) -> BoundedNetwork:
  """The model's ``BoundedNetwork`` for its pixel convention, parsed once (cached).

  ``pixels``: the model's input convention (``models.pixels``); None or the
  identity: [0, 1] pixels. The network's input is [0, 1] pixels either way.
  """
  pixels = None if pixels is None or pixels.is_identity else pixels
  return runtime.cached(model, ("certify", "bounded", pixels),
                        lambda: BoundedNetwork(model, pixels))


def _compiled(model: keras.Model, pixels, key: tuple, fn) -> Any:
  net = bounded(model, pixels)
  shape = (None,) + net.network.input_shape
  return runtime.cached(model, ("certify", net.pixels) + key, lambda: tf.function(
      lambda x, y, eps: fn(net, x, y, eps), input_signature=[
          tf.TensorSpec(shape, tf.float32), tf.TensorSpec((None,), tf.int32),
          tf.TensorSpec((None,), tf.float32)], reduce_retracing=True))


def _prepare(model, x, y, epsilon, batch_size):
  if not isinstance(model, keras.Model):
    raise TypeError(f"`model` must be a tf_keras model; got {type(model).__name__}.")
  x = np.asarray(x, np.float32)
  n = len(x)
  eps = np.broadcast_to(np.asarray(epsilon, np.float32), (n,)).copy()
  if not np.all(np.isfinite(eps)) or np.any(eps < 0):
    raise ValueError(f"`epsilon` must be finite and >= 0; got {epsilon!r}.")
  if batch_size < 1:
    raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
  y = np.zeros(n, np.int32) if y is None else np.asarray(y).astype(np.int32)
  if y.shape != (n,):
    raise ValueError(f"`y` must have shape ({n},); got {y.shape}.")
  return x, y, eps


def margin_bounds(model: keras.Model, x: Any, y: Any, epsilon: Any, *, method: str = "ibp",
                  norm: str = "linf", lower_slope: str = "adaptive", with_ibp: bool = False,
                  clip_min: float = 0.0, clip_max: float = 1.0,
                  pixels: pixels_lib.PixelConvention | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Certified lower bounds of ``z_y - z_j`` over the ε-ball ∩ [clip_min, clip_max].

  Compiled once per (model, method, norm, lower_slope), run in batches.

  Args:
    model: a tf_keras model of supported layers (``network.parse``) giving logits.
    x: float32 images (N, H, W, C) or (N, D), in [clip_min, clip_max].
    y: int labels (N,).
    epsilon: the ball's radius, >= 0: a number or one per image (N,).
    method: "ibp", "crown_ibp" or "crown" (see the module doc).
    norm: "linf" or "l2".
    lower_slope: the lower line of an unstable ReLU in CROWN: "adaptive"
      (slope 1 if u > -l, else 0; CROWN's choice) or "zero".
    with_ibp: CROWN methods: the better of the CROWN and IBP bound per class.
    clip_min, clip_max: the pixel range.
    pixels: the model's input convention (``models.pixels``): ``x``, ε and
      the clip range stay in [0, 1] pixel units, the model reads
      ``pixels.to_model(x)``. None: the model takes [0, 1] pixels.
    batch_size: images per compiled call.

  Returns:
    float32 (N, K): lower bounds of z_y - z_j; 0 in column y.

  Raises:
    ValueError: a bad method, norm, lower_slope, epsilon or label shape.
    TypeError: ``model`` is not a tf_keras model.
    UserError: an unsupported layer (named), or "crown" on a network too large.
  """
  x, y, eps = _prepare(model, x, y, epsilon, batch_size)
  bounded(model, pixels).check(method, norm, lower_slope)
  fn = _compiled(model, pixels,
                 ("margins", method, norm, lower_slope, with_ibp, clip_min, clip_max),
                 lambda net, xb, yb, eb: net.margins(
                     xb, yb, eb, method=method, norm=norm, lower_slope=lower_slope,
                     with_ibp=with_ibp, clip_min=clip_min, clip_max=clip_max))
  out = [fn(x[i:i + batch_size], y[i:i + batch_size], eps[i:i + batch_size]).numpy()
         for i in range(0, len(x), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, bounded(model, pixels).num_classes),
                                                  np.float32)


def logit_bounds(model: keras.Model, x: Any, epsilon: Any, *, method: str = "ibp",
                 norm: str = "linf", lower_slope: str = "adaptive", clip_min: float = 0.0,
                 clip_max: float = 1.0, pixels: pixels_lib.PixelConvention | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Certified lower and upper bounds of every logit, float32 (N, K) each.

  Arguments as ``margin_bounds`` (without labels).
  """
  x, y, eps = _prepare(model, x, None, epsilon, batch_size)
  bounded(model, pixels).check(method, norm, lower_slope)
  fn = _compiled(model, pixels, ("logits", method, norm, lower_slope, clip_min, clip_max),
                 lambda net, xb, yb, eb: tf.stack(net.logit_bounds(
                     xb, eb, method=method, norm=norm, lower_slope=lower_slope,
                     clip_min=clip_min, clip_max=clip_max)))
  out = [fn(x[i:i + batch_size], y[i:i + batch_size], eps[i:i + batch_size]).numpy()
         for i in range(0, len(x), batch_size)]
  both = np.concatenate(out, axis=1)
  return both[0], both[1]


def certify(model: keras.Model, x: Any, y: Any, epsilon: Any, *, method: str = "ibp",
            norm: str = "linf", clip_min: float = 0.0, clip_max: float = 1.0,
            pixels: pixels_lib.PixelConvention | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Which images are provably classified as ``y`` everywhere in the input set.

  CROWN methods use the better of the CROWN and the IBP bound per class, so
  every image IBP certifies is certified by them too. Arguments as
  ``margin_bounds``.

  Returns:
    bool (N,): True where every margin lower bound z_y - z_j (j ≠ y) is > 0.
  """
  margins = margin_bounds(model, x, y, epsilon, method=method, norm=norm,
                          with_ibp=method != "ibp", clip_min=clip_min, clip_max=clip_max,
                          pixels=pixels, batch_size=batch_size)
  y = np.asarray(y).astype(np.int64)
  others = np.ones_like(margins, bool)
  others[np.arange(len(y)), y] = False
  return np.all(np.where(others, margins > 0, True), axis=1)
