"""APGD and Square on a 96x96x3 MobileNet-sized model: pass rates vs the compiled ceilings.

Not a test. Issue 25 item 5: the attacks on bigger inputs than MNIST/CIFAR.
The model is ``keras.applications.MobileNetV2(weights=None, input_shape=(96,
96, 3), classes=10, alpha=0.35, classifier_activation=None)`` (tf_keras,
random weights: the speed of a pass does not depend on them); the images are
uniform noise and the labels the model's own predictions, so every image
starts out "correct". Measured, each best of ``--repeats``:

  ceiling grad   compiled softmax cross-entropy input gradients per second
                 (``attacks_benchmark.ceiling_fn``: what APGD computes per step)
  ceiling fwd    compiled logits per second (what Square computes per query)
  APGD-CE        input-gradient passes per second: the sum over images of the
                 iterations it ran (``return_iterations``) over its seconds
  Square         forward passes per second: queries used (``return_queries``)
                 plus one start per image, over its seconds

and the batch size ``kd-evaluate`` would choose without ``--batch_size``
(``attacks.memory.choose_batch_size``) for this model and for a 224x224x3
MobileNetV2 (alpha 1.0), with the per-image estimate behind it.

Usage:
  PYTHONPATH=$PWD .venv/bin/python benchmarks/bigger_inputs_benchmark.py \\
      --n 64 --batch_size 32 --apgd_steps 20 --square_queries 100 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from attacks_benchmark import ceiling_fn  # pylint: disable=g-bad-import-order

from keras_defense import attacks
from keras_defense.attacks import memory
from keras_defense.attacks import runtime
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


def mobilenet(size: int, alpha: float) -> keras.Model:
  return keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3),
                                        classes=10, alpha=alpha,
                                        classifier_activation=None)


def _rate(fn, passes: int, repeats: int) -> tuple[float, float]:
  """(passes per second, seconds), best of ``repeats`` after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return passes / best, best


def run(args) -> dict:
  keras.utils.set_random_seed(0)
  model = mobilenet(96, 0.35)
  rng = np.random.default_rng(0)
  x = rng.random((args.n, 96, 96, 3), dtype=np.float32)
  logits_fn = runtime.logits_function(model, "float32")
  y = np.concatenate([np.argmax(logits_fn(tf.constant(x[i:i + args.batch_size])), -1)
                      for i in range(0, args.n, args.batch_size)]).astype(np.int64)
  batches = [(tf.constant(x[i:i + args.batch_size]), tf.constant(y[i:i + args.batch_size]))
             for i in range(0, args.n, args.batch_size)]

  grad = ceiling_fn(logits_fn)
  fwd = tf.function(logits_fn)
  rows = {}
  rows["ceiling_grad"], _ = _rate(
      lambda: [grad(xb, yb).numpy() for xb, yb in batches], args.n, args.repeats)
  rows["ceiling_fwd"], _ = _rate(
      lambda: [fwd(xb).numpy() for xb, _ in batches], args.n, args.repeats)
  eps = args.epsilon
  out = {}

  def apgd():
    out["apgd"] = attacks.apgd(model, x, y, eps, steps=args.apgd_steps,
                               batch_size=args.batch_size, return_iterations=True)
  apgd()
  iterations = int(out["apgd"][1].sum())
  rows["apgd_grad_passes_per_s"], rows["apgd_seconds"] = _rate(apgd, iterations,
                                                               args.repeats)
  rows["apgd_passes"] = iterations

  def square():
    out["square"] = attacks.square(model, x, y, eps, queries=args.square_queries,
                                   batch_size=args.batch_size, return_queries=True)
  square()
  queries = int(out["square"][1].sum()) + args.n
  rows["square_fwd_passes_per_s"], rows["square_seconds"] = _rate(square, queries,
                                                                  args.repeats)
  rows["square_passes"] = queries
  rows["apgd_over_ceiling"] = rows["apgd_grad_passes_per_s"] / rows["ceiling_grad"]
  rows["square_over_ceiling"] = rows["square_fwd_passes_per_s"] / rows["ceiling_fwd"]
  chosen = {}
  for size, alpha, m in ((96, 0.35, model), (224, 1.0, None)):
    m = m if m is not None else mobilenet(size, alpha)
    batch, details = memory.choose_batch_size(m, (size, size, 3))
    chosen[f"mobilenetv2_{size}_alpha{alpha}"] = details
  return {"rates": rows, "auto_batch_size": chosen,
          "settings": vars(args), "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--apgd_steps", type=int, default=20)
  p.add_argument("--square_queries", type=int, default=100)
  p.add_argument("--epsilon", type=float, default=1 / 255)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)
  result = run(args)
  text = json.dumps(result, indent=1, default=float)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
