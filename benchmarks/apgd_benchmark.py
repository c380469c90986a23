"""APGD-CE then APGD-T (AutoAttack's first two stages): strength, time, gradients/s vs the ceiling (not a test).

Runs AutoAttack's standard settings for its first two attacks (APGD-CE: 100
iterations, 1 restart; then APGD-T: 9 targets x 100 iterations on the images
still robust) and reports robust accuracy after each, the seconds, the input
gradients the attack needed (per image, up to the one that broke it; see
``apgd(return_iterations=True)``) per second, and that rate over the compiled
input-gradient ceiling of ``attacks_benchmark.py`` (full batches), measured
right after each attack over as many gradient passes. A third row runs
APGD-CE at epsilon 0, where no image ever breaks: the loop's own throughput
with the batch never shrinking.

Usage:
  python benchmarks/apgd_benchmark.py [--model_path saved_models/mnist_m0/1]
      [--num_images 1000] [--epsilon 0.3] [--dtype float32]
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from attacks_benchmark import ceiling_fn  # pylint: disable=g-bad-import-order
from attacks_benchmark import measure_ceiling
from benchmark_args import model_parser
from keras_defense.models import export
from keras_defense.attacks import metrics
from keras_defense.attacks import runtime
from keras_defense.data.datasets import load_arrays

apgd = importlib.import_module("keras_defense.attacks.apgd").apgd


def parse_args(argv=None):
  p = model_parser(__doc__, num_images=1000)
  p.add_argument("--batch_size", type=int, default=1000)
  p.add_argument("--epsilon", type=float, default=0.3)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--ceiling_repeats", type=int, default=3)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  model = export.load_model(args.model_path)
  x, y = load_arrays("mnist", "test", limit=args.num_images)
  grad = ceiling_fn(runtime.logits_function(model, args.dtype))
  common = dict(steps=args.steps, compute_dtype=args.dtype,
                batch_size=args.batch_size, seed=0, return_iterations=True)
  for kwargs in ({}, {"loss": "dlr", "targeted": True}):   # trace outside timing
    apgd(model, x[:8], y[:8], args.epsilon, **common, **kwargs)
  clean = metrics.predict_classes(model, x) == y
  robust = clean.copy()
  print(f"{args.model_path}: {len(x)} images, eps {args.epsilon}, "
        f"{args.dtype}, clean accuracy {clean.mean():.1%}", flush=True)
  print("| attack | robust acc. after | seconds | gradients | gradients/s | "
        "ceiling/s | ratio |")
  print("|---|---|---|---|---|---|---|")
  stages = [("APGD-CE", args.epsilon, {}),
            ("APGD-T (9 targets)", args.epsilon, {"loss": "dlr", "targeted": True}),
            ("APGD-CE at eps 0 (nothing breaks)", 0.0, {})]
  for name, eps, kwargs in stages:
    todo = np.flatnonzero(robust if eps > 0 else clean)
    if not todo.size:
      print(f"| {name} | {robust.mean():.1%} | 0 | 0 | - | - | - |")
      continue
    start = time.perf_counter()
    x_adv, iterations = apgd(model, x[todo], y[todo], eps, **common, **kwargs)
    seconds = time.perf_counter() - start
    # Right after, over as many gradient passes as the attack needed (at
    # least --ceiling_repeats): shorter ceiling timings flatter the ceiling.
    passes = max(args.ceiling_repeats, int(np.ceil(iterations.sum() / len(x))))
    ceiling = measure_ceiling(grad, x, y, args.batch_size, passes)
    if eps > 0:
      robust[todo[metrics.predict_classes(model, x_adv) != y[todo]]] = False
    rate = iterations.sum() / seconds
    print(f"| {name} | {robust.mean():.1%} | {seconds:.2f} | "
          f"{iterations.sum()} | {rate:.0f} | {ceiling:.0f} | "
          f"{rate / ceiling:.2f} |", flush=True)


if __name__ == "__main__":
  main()
