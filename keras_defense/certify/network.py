"""A tf_keras model as a graph of operations that bounds can be pushed through.

``parse(model)`` reads a Sequential or Functional tf_keras model and returns a
``Network``: nodes in topological order, each one of four kinds.

* ``linear``: an affine map ``x -> L(x) + b`` with its transpose ``L^T`` and
  ``|L|`` (the map with absolute weights): Dense, Conv2D, AveragePooling2D,
  GlobalAveragePooling2D, Flatten/Reshape, BatchNormalization (inference: a
  per-channel scale and shift) and Rescaling. A Dense or Conv2D with ``activation="relu"`` becomes a
  linear node followed by a relu node.
* ``relu``: ReLU (layer, ``Activation("relu")`` or a layer's activation).
* ``maxpool``: MaxPooling2D.
* ``add``: Add (residual connections).

InputLayer and Dropout are the identity at inference and disappear. A model
that takes another pixel convention than [0, 1] (``models.pixels``) gets that
map as a first linear node, ``x -> x * scale + shift`` per channel, so the
input set stays the ε-ball of [0, 1] pixels the attacks use. tfmot's
``PruneLowMagnitude`` wrapper is read as the Dense/Conv2D it wraps (its kernel
variable, which the wrapper's call masks in place), so a model being pruned
can be bounded and certifiably trained. Any other
layer, activation or layer option raises a ``UserError`` naming it. The
weights are read from the layers' variables when the bounds run, so a model
trained further is bounded with its current weights and the bounds can be
differentiated (certified training).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from keras_defense.models import pixels as pixels_lib
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

INPUT = -1  # the node id of the model input
SUPPORTED_LAYERS = ("InputLayer", "Dense", "Conv2D", "ReLU", "Activation", "MaxPooling2D",
                    "AveragePooling2D", "GlobalAveragePooling2D", "Flatten", "Reshape",
                    "BatchNormalization", "Add", "Dropout", "Rescaling")


@dataclasses.dataclass
class Node:
  """One operation of a ``Network``.

  Attributes:
    name: the Keras layer it comes from.
    kind: "linear", "relu", "maxpool" or "add".
    inputs: ids of the nodes it reads (``INPUT`` for the model input).
    in_shape: shape of its (first) input without the batch axis.
    out_shape: shape of its output without the batch axis.
    apply: linear nodes: ``x -> L(x)`` (no bias), batched.
    apply_abs: linear nodes: ``r -> |L|(r)``, batched (r >= 0).
    transpose: linear nodes: ``a -> L^T(a)``, batched over a leading axis.
    bias: linear nodes: a callable returning the bias, broadcastable to the
      output (None: no bias).
    pool: maxpool nodes: (pool_size, strides, padding) for ``tf.nn``.
    kernel: Dense/Conv2D nodes: a callable returning the kernel (for the L2
      dual-norm bound of a first layer).
  """
  name: str
  kind: str
  inputs: list[int]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  apply: Callable[[tf.Tensor], tf.Tensor] | None = None
  apply_abs: Callable[[tf.Tensor], tf.Tensor] | None = None
  transpose: Callable[[tf.Tensor], tf.Tensor] | None = None
  bias: Callable[[], tf.Tensor] | None = None
  pool: tuple[Any, Any, str] | None = None
  kernel: Callable[[], tf.Tensor] | None = None


@dataclasses.dataclass
class Network:
  """A parsed model: ``nodes`` in topological order, the last one the output."""
  nodes: list[Node]
  input_shape: tuple[int, ...]

  @property
  def output_shape(self) -> tuple[int, ...]:
    return self.nodes[-1].out_shape


def _shape(s) -> tuple[int, ...]:
  dims = tuple(s)[1:]
  if any(d is None for d in dims):
    raise UserError(f"bounds need fully known image shapes; got {tuple(s)}.")
  return tuple(int(d) for d in dims)


def _unsupported(layer, what: str = "") -> UserError:
  return UserError(
      f"layer {layer.name!r} ({type(layer).__name__}{what}) is not supported by the "
      f"certification bounds; supported: {', '.join(SUPPORTED_LAYERS)} (Dense/Conv2D with "
      f"activation linear or relu). Fix: use randomized smoothing (method 'smoothing'), "
      f"which takes any model.")


def _batched(fn, shape_in, shape_out):
  """Applies ``fn`` to a tensor of shape (..., *shape_in) by folding the leading axes."""
  def run(x):
    lead = tf.shape(x)[:tf.rank(x) - len(shape_in)]
    out = fn(tf.reshape(x, (-1,) + tuple(shape_in)))
    return tf.reshape(out, tf.concat([lead, tf.constant(shape_out, tf.int32)], 0))
  return run


def _pad(padding: str) -> str:
  return padding.upper()


def _dense(layer, in_shape, out_shape) -> Node:
  k = layer.kernel
  return Node(layer.name, "linear", [], in_shape, out_shape,
              apply=lambda x: tf.matmul(x, k), apply_abs=lambda r: tf.matmul(r, tf.abs(k)),
              transpose=lambda a: tf.matmul(a, k, transpose_b=True),
              bias=(lambda: layer.bias) if layer.use_bias else None,
              kernel=lambda: layer.kernel)


def _conv(layer, in_shape, out_shape) -> Node:
  cfg = layer.get_config()
  if cfg.get("data_format", "channels_last") != "channels_last" or cfg.get("groups", 1) != 1:
    raise _unsupported(layer, ", data_format channels_first or groups > 1")
  strides, padding, dilations = tuple(cfg["strides"]), _pad(cfg["padding"]), \
      tuple(cfg["dilation_rate"])
  k = layer.kernel

  def conv(x, kernel):
    return tf.nn.conv2d(x, kernel, strides=strides, padding=padding, dilations=dilations)

  def transpose(a):
    n = tf.shape(a)[0]
    return tf.nn.conv2d_transpose(a, k, tf.stack([n, *in_shape]), strides=strides,
                                  padding=padding, dilations=dilations)
  return Node(layer.name, "linear", [], in_shape, out_shape, apply=lambda x: conv(x, k),
              apply_abs=lambda r: conv(r, tf.abs(k)),
              transpose=_batched(transpose, out_shape, in_shape),
              bias=(lambda: layer.bias) if layer.use_bias else None,
              kernel=lambda: layer.kernel)


def _avg_pool(layer, in_shape, out_shape) -> Node:
  cfg = layer.get_config()
  size, strides, padding = tuple(cfg["pool_size"]), tuple(cfg["strides"]), _pad(cfg["padding"])
  if padding != "VALID":
    # SAME average pooling divides border windows by fewer elements; still linear,
    # but its transpose is not AvgPoolGrad's kernel layout below. Keep it simple.
    raise _unsupported(layer, ", padding 'same'")

  def pool(x):
    return tf.nn.avg_pool2d(x, size, strides, padding)

  def transpose(a):
    n = tf.shape(a)[0]
    return tf.raw_ops.AvgPoolGrad(orig_input_shape=tf.stack([n, *in_shape]), grad=a,
                                  ksize=(1, *size, 1), strides=(1, *strides, 1),
                                  padding=padding)
  return Node(layer.name, "linear", [], in_shape, out_shape, apply=pool, apply_abs=pool,
              transpose=_batched(transpose, out_shape, in_shape))


def _global_avg_pool(layer, in_shape, out_shape) -> Node:
  """GlobalAveragePooling2D: the mean over height and width, (H, W, C) -> (C,) or (1, 1, C)."""
  cfg = layer.get_config()
  if cfg.get("data_format", "channels_last") != "channels_last":
    raise _unsupported(layer, ", data_format channels_first")
  h, w, c = in_shape
  keepdims = bool(cfg.get("keepdims", False))

  def pool(x):
    return tf.reduce_mean(x, axis=[-3, -2], keepdims=keepdims)

  def transpose(a):  # each input pixel gets 1/(H*W) of its channel's coefficient
    if not keepdims:
      a = a[..., tf.newaxis, tf.newaxis, :]
    return a * tf.ones((h, w, c), a.dtype) / float(h * w)
  return Node(layer.name, "linear", [], in_shape, out_shape, apply=pool, apply_abs=pool,
              transpose=transpose)


def _reshape(layer, in_shape, out_shape) -> Node:
  def fwd(x):
    return tf.reshape(x, (-1,) + out_shape)

  return Node(layer.name, "linear", [], in_shape, out_shape, apply=fwd, apply_abs=fwd,
              transpose=_batched(lambda a: tf.reshape(a, (-1,) + in_shape), out_shape,
                                 in_shape))


def _scale_shift(name, in_shape, out_shape, scale_shift) -> Node:
  """An elementwise affine map x * s + t (BatchNormalization, Rescaling, a pixel convention)."""
  def apply(x):
    return x * scale_shift()[0]

  return Node(name, "linear", [], in_shape, out_shape, apply=apply,
              apply_abs=lambda r: r * tf.abs(scale_shift()[0]), transpose=apply,
              bias=lambda: scale_shift()[1])


def _batch_norm(layer, in_shape, out_shape) -> Node:
  axis = layer.axis if isinstance(layer.axis, int) else list(layer.axis)
  if axis not in (-1, len(in_shape), [-1], [len(in_shape)]):
    raise _unsupported(layer, f", axis {layer.axis} (only the channel axis, last)")

  def scale_shift():
    inv = tf.math.rsqrt(layer.moving_variance + layer.epsilon)
    scale = inv * layer.gamma if layer.scale else inv
    shift = -layer.moving_mean * scale
    if layer.center:
      shift = shift + layer.beta
    return scale, shift
  return _scale_shift(layer.name, in_shape, out_shape, scale_shift)


def _rescaling(layer, in_shape, out_shape) -> Node:
  scale = tf.constant(np.asarray(layer.scale, np.float32))
  offset = tf.constant(np.asarray(layer.offset, np.float32))
  return _scale_shift(layer.name, in_shape, out_shape, lambda: (scale, offset))


def _activation_name(layer, activation) -> str:
  name = getattr(activation, "__name__", str(activation))
  if name not in ("linear", "relu"):
    raise _unsupported(layer, f" with activation {name!r}")
  return name


def _layer_nodes(layer, in_shape, out_shape) -> list[Node]:
  """The nodes of one layer (a linear node and maybe a relu), inputs not yet wired."""
  cls = type(layer).__name__
  relu = Node(layer.name + "/relu", "relu", [], out_shape, out_shape)
  if cls == "Dense":
    if len(in_shape) != 1:
      raise _unsupported(layer, " on a non-flat input")
    nodes = [_dense(layer, in_shape, out_shape)]
  elif cls == "Conv2D":
    nodes = [_conv(layer, in_shape, out_shape)]
  elif cls == "AveragePooling2D":
    return [_avg_pool(layer, in_shape, out_shape)]
  elif cls == "GlobalAveragePooling2D":
    return [_global_avg_pool(layer, in_shape, out_shape)]
  elif cls in ("Flatten", "Reshape"):
    return [_reshape(layer, in_shape, out_shape)]
  elif cls == "BatchNormalization":
    return [_batch_norm(layer, in_shape, out_shape)]
  elif cls == "Rescaling":
    return [_rescaling(layer, in_shape, out_shape)]
  elif cls == "MaxPooling2D":
    cfg = layer.get_config()
    return [Node(layer.name, "maxpool", [], in_shape, out_shape,
                 pool=(tuple(cfg["pool_size"]), tuple(cfg["strides"]), _pad(cfg["padding"])))]
  elif cls == "ReLU":
    cfg = layer.get_config()
    if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or \
        cfg.get("threshold", 0):
      raise _unsupported(layer, " with max_value, negative_slope or threshold")
    return [relu]
  elif cls == "Activation":
    return [relu] if _activation_name(layer, layer.activation) == "relu" else []
  else:
    raise _unsupported(layer)
  if _activation_name(layer, layer.activation) == "relu":
    nodes.append(relu)
  return nodes


def _inbound_names(layer_config: dict) -> list[str]:
  """The names of the layers feeding a Functional model's layer (from its config)."""
  names = []
  for node in layer_config.get("inbound_nodes", []):
    for entry in node:
      names.append(entry[0] if isinstance(entry, (list, tuple)) else entry["args"][0])
  return names


def _pixel_node(pixels: pixels_lib.PixelConvention, shape: tuple[int, ...]) -> Node:
  """The map from [0, 1] pixels to the model's input convention, as a linear node."""
  scale, shift = (tf.constant(v, tf.float32) for v in pixels.scale_shift())
  node = _scale_shift("pixels", shape, shape, lambda: (scale, shift))
  node.inputs = [INPUT]
  return node


def parse(model: keras.Model,
          pixels: pixels_lib.PixelConvention | None = None) -> Network:
  """Reads ``model`` into a ``Network``.

  Args:
    model: a built tf_keras Sequential or Functional model with one image
      input and one output (logits), made of the supported layers.
    pixels: the model's input convention; None or identity: [0, 1] pixels.
      Otherwise the network starts with its map (checked against the
      image's channels), and its input is [0, 1] pixels.

  Returns:
    The model's ``Network``.

  Raises:
    UserError: a layer (or option, or activation) the bounds do not support,
      a nested model, a shared layer, or several inputs/outputs; the message
      names the layer.
    TypeError: ``model`` is not a tf_keras model.
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"`model` must be a tf_keras model; got {type(model).__name__}.")
  if len(model.inputs or []) != 1 or len(model.outputs or []) != 1:
    raise UserError(f"bounds need a model with one input and one output; model "
                    f"{model.name!r} has {len(model.inputs or [])} and "
                    f"{len(model.outputs or [])}.")
  sequential = isinstance(model, keras.Sequential)
  configs = {} if sequential else {c["name"]: c for c in model.get_config()["layers"]}
  nodes: list[Node] = []
  if pixels is not None and not pixels.is_identity:
    shape = _shape(model.input_shape)
    pixels.validate(channels=shape[-1])
    nodes.append(_pixel_node(pixels, shape))
  entry = len(nodes) - 1  # the node the model's input layer reads: INPUT or the pixel map
  prefix = len(nodes)
  out_id: dict[str, int] = {}   # layer name -> id of the node holding its output
  previous = entry
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      raise UserError(f"layer {layer.name!r} is a nested model ({type(layer).__name__}); "
                      f"the bounds need a flat model. Fix: rebuild it without nesting.")
    cls = type(layer).__name__
    inner = layer
    if cls == "PruneLowMagnitude":  # tfmot: bound the wrapped layer (its masked kernel)
      inner = layer.layer
      cls = type(inner).__name__
    if cls == "InputLayer":
      out_id[layer.name] = entry
      continue
    if cls not in SUPPORTED_LAYERS:
      raise _unsupported(inner)
    if not sequential and len(configs[layer.name].get("inbound_nodes", [])) > 1:
      raise UserError(f"layer {layer.name!r} is shared (called more than once); the "
                      f"bounds need each layer called once.")
    if sequential:
      inputs = [previous]
    else:
      inputs = [out_id[n] for n in _inbound_names(configs[layer.name])]
    if cls == "Add":
      shape = _shape(layer.output_shape)
      nodes.append(Node(layer.name, "add", inputs, shape, shape))
    elif cls == "Dropout":
      out_id[layer.name] = previous = inputs[0]
      continue
    else:
      if len(inputs) != 1:
        raise UserError(f"layer {layer.name!r} takes {len(inputs)} inputs; expected 1.")
      in_shape, out_shape = _shape(layer.input_shape), _shape(layer.output_shape)
      first = True
      for node in _layer_nodes(inner, in_shape, out_shape):
        node.inputs = inputs if first else [len(nodes) - 1]
        nodes.append(node)
        first = False
      if first:  # an identity Activation("linear")
        out_id[layer.name] = previous = inputs[0]
        continue
    out_id[layer.name] = previous = len(nodes) - 1
  if len(nodes) == prefix:
    raise UserError(f"model {model.name!r} has no layer to bound.")
  if not sequential:
    last = model.get_config()["output_layers"][0][0]
    if out_id[last] != len(nodes) - 1:
      raise UserError(f"model {model.name!r}: its output layer {last!r} is not its last "
                      f"layer; the bounds need layers in topological order ending at it.")
  return Network(nodes, _shape(model.input_shape))
