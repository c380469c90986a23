"""Trains Carlini & Wagner's MNIST model with their recipe, outside keras_defense.

An "outside" model for checking the attacks on a model this project's
training code never touched: the architecture, data split, scaling and
optimiser of ``train_models.py`` in https://github.com/carlini/nn_robust_attacks
(55,000 training images, pixels in [-0.5, 0.5], SGD lr 0.01 with decay 1e-6,
Nesterov momentum 0.9, batch 128, 50 epochs, dropout 0.5), written in plain
tf_keras. Only the MNIST arrays come from keras_defense. A first layer maps
[0, 1] inputs to their [-0.5, 0.5], so the saved model takes the same images
as the project's models.

Usage:
  python benchmarks/train_cw_reference_model.py --out /tmp/cw_reference.keras [--epochs 50]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmark_args import parse_trainer_args  # pylint: disable=g-bad-import-order
from benchmark_args import trainer_parser
from keras_defense.util.compat import keras  # tf_keras (Keras 2), as tfmot needs
from keras_defense.data.datasets import load_arrays


def build() -> keras.Model:
  layers = keras.layers
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      layers.Rescaling(1.0, offset=-0.5),   # [0, 1] -> C&W's [-0.5, 0.5]
      layers.Conv2D(32, 3), layers.Activation("relu"),
      layers.Conv2D(32, 3), layers.Activation("relu"),
      layers.MaxPooling2D(2),
      layers.Conv2D(64, 3), layers.Activation("relu"),
      layers.Conv2D(64, 3), layers.Activation("relu"),
      layers.MaxPooling2D(2),
      layers.Flatten(),
      layers.Dense(200), layers.Activation("relu"),
      layers.Dropout(0.5),
      layers.Dense(200), layers.Activation("relu"),
      layers.Dense(10),
  ])


def main(argv=None) -> int:
  p = trainer_parser(__doc__)
  p.add_argument("--epochs", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  args = parse_trainer_args(p, argv)
  x, y = load_arrays("mnist", "train", validation_size=0)   # all 60,000
  x_test, y_test = load_arrays("mnist", "test")
  # C&W: the first 5,000 training images are the validation set.
  x_val, y_val, x, y = x[:5000], y[:5000], x[5000:], y[5000:]
  model = build()
  lr = keras.optimizers.schedules.InverseTimeDecay(0.01, decay_steps=1, decay_rate=1e-6)
  model.compile(keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  start = time.perf_counter()
  model.fit(x, y, batch_size=128, epochs=args.epochs, shuffle=True,
            validation_data=(x_val, y_val), verbose=2)
  acc = model.evaluate(x_test, y_test, verbose=0)[1]
  # Saved uncompiled (no optimizer or schedule objects): kd.load_model accepts it.
  inference = build()
  inference.set_weights(model.get_weights())
  inference.save(args.out)
  print(f"test accuracy {100 * acc:.2f}% after {args.epochs} epochs, "
        f"{time.perf_counter() - start:.0f} s; saved {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
