"""Square and FAB-T (AutoAttack's last two stages): strength, time, rate vs the ceilings (not a test).

Square (AutoAttack's settings: 5,000 queries, p_init 0.8, L-inf) runs on all
images; the table gives its success rate on the clean-correct images, the
median queries of the images it fooled, the queries it made (exact per image,
``square(return_queries=True)``) per second, and that rate over the compiled
forward ceiling: a plain ``tf.function`` forward pass of full batches of
``--batch_size`` images, measured right after the attack over as many
passes as the attack made queries per image (at least ``--ceiling_repeats``).
A second Square row runs at a tiny epsilon where almost nothing breaks, so
the batch never shrinks: the query loop's own throughput. FAB-T (9 targets x
100 iterations, each target only on the images still robust) reports its
success rate and seconds on the first ``--fab_images`` images, and a second
FAB row (1 target x ``--fab_loop_steps`` iterations at epsilon 1e-3, where
nothing breaks) its iterations/s over the compiled input-gradient ceiling of
``attacks_benchmark.py`` (each FAB iteration is one input gradient, one
forward pass and two projections).

Usage:
  python benchmarks/square_fab_benchmark.py [--model_path saved_models/mnist_m0/1]
      [--num_images 1000] [--epsilon 0.3] [--queries 5000] [--skip_square]
      [--fab_images 1000] [--skip_fab]
"""

from __future__ import annotations

import time

import numpy as np

from attacks_benchmark import ceiling_fn  # pylint: disable=g-bad-import-order
from attacks_benchmark import measure_ceiling
from benchmark_args import model_parser
from keras_defense import attacks
from keras_defense.models import export
from keras_defense.attacks import metrics
from keras_defense.attacks import runtime
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays


def parse_args(argv=None):
  p = model_parser(__doc__, num_images=1000)
  p.add_argument("--batch_size", type=int, default=1000)
  p.add_argument("--epsilon", type=float, default=0.3)
  p.add_argument("--queries", type=int, default=5000)
  p.add_argument("--loop_queries", type=int, default=200,
                 help="queries of the tiny-epsilon row (the loop's throughput)")
  p.add_argument("--ceiling_repeats", type=int, default=20)
  p.add_argument("--fab_images", type=int, default=1000)
  p.add_argument("--fab_loop_steps", type=int, default=20)
  p.add_argument("--skip_square", action="store_true")
  p.add_argument("--skip_fab", action="store_true")
  return p.parse_args(argv)


def measure_forward_ceiling(model, x, batch_size, passes):
  """Images/s of a compiled forward pass over full batches (best of 2 rounds)."""
  logits = runtime.logits_function(model, "float32")
  fn = tf.function(lambda xb: tf.reduce_sum(logits(xb)))
  xb = tf.constant(np.resize(x, (batch_size, *x.shape[1:])))
  fn(xb).numpy()
  best = 0.0
  for _ in range(2):
    start = time.perf_counter()
    for _ in range(passes):
      fn(xb).numpy()
    best = max(best, passes * batch_size / (time.perf_counter() - start))
  return best


def main(argv=None):
  args = parse_args(argv)
  model = export.load_model(args.model_path)
  x, y = load_arrays("mnist", "test", limit=args.num_images)
  attacks.square(model, x[:8], y[:8], args.epsilon, queries=10)   # trace
  clean = metrics.predict_classes(model, x) == y
  print(f"{args.model_path}: {len(x)} images, eps {args.epsilon}, clean "
        f"accuracy {clean.mean():.1%}, batch {args.batch_size}", flush=True)
  print("| attack | success (of clean-correct) | robust acc. | median queries "
        "(fooled) | seconds | queries | queries/s | forward ceiling/s | ratio |")
  print("|---|---|---|---|---|---|---|---|---|")
  robust = clean.copy()
  stages = () if args.skip_square else (
      (f"Square {args.queries}", args.epsilon, args.queries),
      (f"Square {args.loop_queries} at eps 1e-3 (batch never shrinks)", 1e-3,
       args.loop_queries))
  for name, eps, queries in stages:
    start = time.perf_counter()
    x_adv, n_queries = attacks.square(model, x, y, eps, queries=queries, seed=0,
                                      batch_size=args.batch_size,
                                      return_queries=True)
    seconds = time.perf_counter() - start
    passes = max(args.ceiling_repeats, int(np.ceil(n_queries.sum() / len(x))))
    ceiling = measure_forward_ceiling(model, x, args.batch_size, passes)
    fooled = clean & (metrics.predict_classes(model, x_adv) != y)
    if eps == args.epsilon:
      robust &= ~fooled
    rate = n_queries.sum() / seconds
    median = np.median(n_queries[fooled]) if fooled.any() else float("nan")
    print(f"| {name} | {fooled.sum() / clean.sum():.1%} | "
          f"{(clean & ~fooled).mean():.1%} | {median:.0f} | {seconds:.1f} | "
          f"{n_queries.sum()} | {rate:.0f} | {ceiling:.0f} | "
          f"{rate / ceiling:.2f} |", flush=True)
  if args.skip_fab:
    return
  attacks.fab(model, x[:8], y[:8], args.epsilon, steps=2)   # trace
  n = min(args.fab_images, len(x))
  start = time.perf_counter()
  x_adv = attacks.fab(model, x[:n], y[:n], args.epsilon,
                      batch_size=args.batch_size)
  seconds = time.perf_counter() - start
  fooled = clean[:n] & (metrics.predict_classes(model, x_adv) != y[:n])
  print(f"| FAB-T (9 x 100), first {n} images | {fooled.sum() / clean[:n].sum():.1%} | "
        f"{(clean[:n] & ~fooled).mean():.1%} | - | {seconds:.1f} | - | - | - | - |")
  start = time.perf_counter()
  attacks.fab(model, x, y, 1e-3, n_target_classes=1, steps=args.fab_loop_steps,
              batch_size=args.batch_size)
  seconds = time.perf_counter() - start
  iterations = clean.sum() * args.fab_loop_steps
  grad = ceiling_fn(runtime.logits_function(model, "float32"))
  ceiling = measure_ceiling(grad, x, y, args.batch_size, args.fab_loop_steps)
  print(f"| FAB-T 1 x {args.fab_loop_steps} at eps 1e-3 (batch never shrinks) | "
        f"- | - | - | {seconds:.1f} | {iterations} iterations | "
        f"{iterations / seconds:.0f} it/s | {ceiling:.0f} gradients/s | "
        f"{iterations / seconds / ceiling:.2f} |")
  if not args.skip_square and n == len(x):
    print(f"worst case of Square and FAB-T: robust accuracy "
          f"{(robust & ~fooled).mean():.1%}")


if __name__ == "__main__":
  main()
