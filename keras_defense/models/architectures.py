"""Carlini & Wagner (S&P 2017) CNNs for MNIST and CIFAR-10, built by name.

Both networks output logits (no softmax). Architecture (C&W 2017, Sec. VI):
3x3 valid convolutions, 2x2 max pooling, ReLU, dropout 0.5 after the first
Dense layer.

Example:
  >>> model = build_model("cw_mnist")
  >>> model.output_shape
  (None, 10)
"""

from __future__ import annotations

from typing import Sequence

from keras_defense.util.compat import keras

# name -> (conv filters, dense units, default input shape)
_ARCHITECTURES = {
    "cw_mnist": ((32, 32, 64, 64), (200, 200), (28, 28, 1)),
    "cw_cifar10": ((64, 64, 128, 128), (256, 256), (32, 32, 3)),
}

# Input shape -> the C&W network made for it (any dataset of that shape).
MODEL_FOR_SHAPE = {
    (28, 28, 1): "cw_mnist",
    (32, 32, 3): "cw_cifar10",
}

MODEL_NAMES = tuple(sorted(_ARCHITECTURES))
LOGITS_LAYER_NAME = "logits"


def model_for_shape(image_shape: Sequence[int]) -> str:
  """The C&W network for images of ``image_shape``: 28x28x1 -> cw_mnist, 32x32x3 -> cw_cifar10.

  Raises:
    ValueError: another shape.
  """
  shape = tuple(int(d) for d in image_shape)
  if shape not in MODEL_FOR_SHAPE:
    raise ValueError(
        f"no C&W network for images of shape {shape}; supported: "
        f"{', '.join('x'.join(map(str, s)) for s in MODEL_FOR_SHAPE)}.")
  return MODEL_FOR_SHAPE[shape]


def build_model(
    name: str,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    dropout: float = 0.5,
    seed: int | None = None,
) -> keras.Model:
  """Builds a C&W classifier that maps float32 images in [0, 1] to logits.

  Args:
    name: one of ``MODEL_NAMES`` ("cw_mnist", "cw_cifar10").
    input_shape: (H, W, C); defaults to the dataset the architecture was made
      for (28x28x1 or 32x32x3).
    num_classes: number of logits.
    dropout: dropout rate after the first Dense layer (C&W: 0.5).
    seed: seed for the weight initialisers, for reproducible models.

  Returns:
    An uncompiled ``tf_keras`` functional model whose last layer is a Dense
    layer named ``"logits"`` with linear activation.

  Raises:
    ValueError: unknown ``name``, bad ``input_shape``, ``num_classes`` < 2 or
      ``dropout`` outside [0, 1).
  """
  if name not in _ARCHITECTURES:
    raise ValueError(
        f"`model` must be one of {', '.join(MODEL_NAMES)}; got {name!r}.")
  filters, units, default_shape = _ARCHITECTURES[name]
  shape = tuple(default_shape if input_shape is None else input_shape)
  if len(shape) != 3 or any(int(d) < 1 for d in shape):
    raise ValueError(
        f"`input_shape` must be (height, width, channels) of positive ints; "
        f"got {input_shape!r}.")
  if min(shape[:2]) < 16:
    raise ValueError(
        f"`input_shape` must be at least 16x16 for {name} (four 3x3 valid "
        f"convolutions and two poolings); got {shape!r}.")
  if int(num_classes) < 2:
    raise ValueError(f"`num_classes` must be >= 2; got {num_classes!r}.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")

  def init(offset):
    return keras.initializers.GlorotUniform(
        seed=None if seed is None else seed + offset)

  inputs = keras.Input(shape=shape, name="images")
  x = inputs
  for i, f in enumerate(filters):
    x = keras.layers.Conv2D(f, 3, activation="relu", padding="valid",
                            kernel_initializer=init(i), name=f"conv{i + 1}")(x)
    if i % 2 == 1:
      x = keras.layers.MaxPooling2D(2, name=f"pool{i // 2 + 1}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dense(units[0], activation="relu", kernel_initializer=init(10),
                         name="dense1")(x)
  x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
  x = keras.layers.Dense(units[1], activation="relu", kernel_initializer=init(11),
                         name="dense2")(x)
  logits = keras.layers.Dense(int(num_classes), kernel_initializer=init(12),
                              name=LOGITS_LAYER_NAME)(x)
  return keras.Model(inputs, logits, name=name)


def count_weights(model: keras.Model) -> tuple[int, int]:
  """(all weights, nonzero weights) of ``model``, kernels and biases."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ws = model.get_weights()
  return int(sum(w.size for w in ws)), int(sum(np.count_nonzero(w) for w in ws))
