"""Builds the Keras 3 models of README's "Evaluate your model" the way a user would.

  python examples/keras3_models.py OUT_DIR

Plain TensorFlow >= 2.16 with Keras 3 (``import keras``); keras-defense is
used only for MNIST's shipped files (``keras_defense.load_arrays``). Writes to
OUT_DIR:

* ``cnn.keras``: Conv2D/MaxPooling2D/Flatten/Dense on [0, 1] pixels, logits;
  1 epoch on 2,000 MNIST training images.
* ``cnn_255.keras``: the same network behind ``Rescaling(1/255)`` (0-255 pixels).
* ``cnn_softmax.keras``: the same network ending in ``Softmax``.
* ``cnn_normalized.keras``: the same network taking ``(x - 0.1307) / 0.3081``.
* ``cnn_export/``: ``model.export()`` of cnn (a SavedModel, endpoint ``serve``).
* ``m64.keras`` + ``test64.npz``: a 64x64x3, 5-class model (random weights) and
  200 uint8 test images with labels.
* ``mobilenet.keras`` + ``test96.npz``: MobileNetV2 (alpha 0.35, 96x96x3, 10
  classes, ``weights=None``), which takes ``preprocess_input``'s [-1, 1]
  pixels, and 100 uint8 test images.
"""

import os
import pathlib
import sys

import numpy as np

from keras_defense import load_arrays  # noqa: F401  (also picks tf_keras for keras_defense)

import keras  # Keras 3


def main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  x, y = load_arrays("mnist", "train", limit=2000)
  keras.utils.set_random_seed(0)
  layers = [keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(10)]
  cnn = keras.Sequential([keras.Input((28, 28, 1)), *layers])
  cnn.compile(keras.optimizers.Adam(3e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  cnn.fit(x, y, epochs=1, batch_size=32, verbose=0)
  cnn.save(out / "cnn.keras")
  cnn.export(str(out / "cnn_export"))

  def behind(first):
    inputs = keras.Input((28, 28, 1))
    t = first(inputs)
    for layer in layers:
      t = layer(t)
    return keras.Model(inputs, t)

  behind(keras.layers.Rescaling(1 / 255)).save(out / "cnn_255.keras")
  behind(keras.layers.Rescaling(scale=0.3081, offset=0.1307)).save(out / "cnn_normalized.keras")
  inputs = keras.Input((28, 28, 1))
  keras.Model(inputs, keras.layers.Softmax()(cnn(inputs))).save(out / "cnn_softmax.keras")

  rng = np.random.default_rng(0)
  m64 = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(8, 5, strides=4),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
  m64.save(out / "m64.keras")
  np.savez(out / "test64.npz", x=rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8),
           y=rng.integers(0, 5, 200), class_names=np.array(list("abcde")))
  mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3),
                                             classes=10, alpha=0.35)
  mobilenet.save(out / "mobilenet.keras")
  np.savez(out / "test96.npz", x=rng.integers(0, 256, (100, 96, 96, 3), dtype=np.uint8),
           y=rng.integers(0, 10, 100))
  print("\n".join(sorted(os.listdir(out))))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/keras3_models"))
