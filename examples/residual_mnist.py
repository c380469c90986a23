"""A small residual Keras 3 classifier trained naturally on MNIST: the model a user brings.

The starting point of docs/HARDEN.md ("Harden your model"): a plain Keras 3
model (``import keras``, saved with ``model.save("m.keras")``) with the layers
real models have and the C&W networks lack: BatchNormalization, residual
``Add`` connections and global average pooling. It outputs logits (no final
softmax), as keras-defense's training needs.

  python examples/residual_mnist.py --out=m.keras --epochs=2

MNIST comes from keras_defense's shipped, checksummed copy (no network): the
train split minus the 5,000-image validation hold-out that kd-train and
kd-prune keep for their checks, and the 10,000-image test split.
"""

from __future__ import annotations

import argparse
import time

import keras_defense  # noqa: F401  (sets TF_USE_LEGACY_KERAS for its own models first)
from keras_defense import data
import keras  # Keras 3: what users save their models with


def residual_block(x, filters: int, *, stride: int = 1, name: str):
  """conv-BN-ReLU-conv-BN + shortcut (1x1 conv when the shape changes), then ReLU."""
  y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                          name=f"{name}_conv1")(x)
  y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
  y = keras.layers.ReLU(name=f"{name}_relu1")(y)
  y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
  y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
  shortcut = x
  if stride != 1 or x.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                   name=f"{name}_proj")(x)
    shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
  y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def build(input_shape=(28, 28, 1), num_classes: int = 10, width: int = 32) -> keras.Model:
  """The residual net: stem, three residual blocks (28 -> 14 -> 7), GAP, Dense logits."""
  inputs = keras.Input(input_shape, name="images")
  x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
  x = keras.layers.BatchNormalization(name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  x = residual_block(x, width, stride=2, name="block1")
  x = residual_block(x, 2 * width, stride=2, name="block2")
  x = residual_block(x, 2 * width, name="block3")
  x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
  x = keras.layers.Dense(128, activation="relu", name="fc")(x)
  logits = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, logits, name="residual_mnist")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="m.keras", help="where to save the Keras 3 model")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--width", type=int, default=32, help="channels of the first block")
  parser.add_argument("--train_limit", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  keras.utils.set_random_seed(args.seed)
  x_train, y_train = data.load_arrays("mnist", "train", limit=args.train_limit)
  x_test, y_test = data.load_arrays("mnist", "test")
  model = build(x_train.shape[1:], width=args.width)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  start = time.time()
  model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=2)
  _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
  model.save(args.out)
  print(f"test_accuracy={accuracy:.4f} params={model.count_params()} "
        f"wall_seconds={time.time() - start:.0f} saved={args.out}")


if __name__ == "__main__":
  main()
