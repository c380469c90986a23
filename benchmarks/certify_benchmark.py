"""Certification throughput (images/s) and certified accuracy of IBP and CROWN-IBP (not a test).

Loads a shipped model (default the plain C&W MNIST net M0), the first
``--num_images`` MNIST test images, and for each method and ε times
``certify.certify`` over all images (best of ``--repeats``, after one untimed
batch that compiles the graph), printing images/s and the certified accuracy.
Full CROWN on M0 is refused (its intermediate bounds need one backward pass
per conv neuron); the script prints the refusal.

Usage:
  python benchmarks/certify_benchmark.py [--model_path saved_models/mnist_m0/1]
      [--num_images 1000] [--epsilons 0.1,0.3] [--batch_size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import keras_defense
from keras_defense import certify
from keras_defense.certify import bounds
from keras_defense.util.errors import UserError


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model_path", default="saved_models/mnist_m0/1")
  p.add_argument("--num_images", type=int, default=1000)
  p.add_argument("--epsilons", default="0.1,0.3")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--methods", default="ibp,crown_ibp")
  args = p.parse_args(argv)
  model = keras_defense.load_model(args.model_path)
  x, y = keras_defense.load_arrays("mnist", "test", limit=args.num_images)
  clean = np.mean(np.argmax(model.predict(x, batch_size=500, verbose=0), 1) == y)
  print(f"model {args.model_path}: clean accuracy {100 * clean:.2f}% on {len(y)} images")
  rows = []
  for method in args.methods.split(","):
    for eps in (float(e) for e in args.epsilons.split(",")):
      certify.certify(model, x[:args.batch_size], y[:args.batch_size], eps, method=method,
                      batch_size=args.batch_size)  # compile
      best = float("inf")
      for _ in range(args.repeats):
        start = time.perf_counter()
        ok = certify.certify(model, x, y, eps, method=method, batch_size=args.batch_size)
        best = min(best, time.perf_counter() - start)
      row = {"method": method, "epsilon": eps, "images": len(y), "seconds": round(best, 2),
             "images_per_s": round(len(y) / best, 1), "certified": int(ok.sum()),
             "certified_acc": float(ok.mean())}
      rows.append(row)
      print(json.dumps(row), flush=True)
  try:
    bounds.bounded(model).check("crown", "linf", "adaptive")
  except UserError as e:
    print(f"crown: {e}")
  return rows


if __name__ == "__main__":
  main()
