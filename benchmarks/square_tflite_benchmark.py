"""Square on the LiteRT interpreter vs the interpreter's own forward throughput (not a test).

Issue 27's target: Square on the interpreter at >= 0.8x of the interpreter's
own batched forward throughput. Measured in one process, on the first --n test
images of --dataset, with one ``TFLiteModel`` (--num_threads, 1 by default:
what ``kd-evaluate --model=m.tflite`` runs), alternating --repeats times:

* **forward**: images/s of ``model(xb)`` on a batch of --batch_size images
  (Square's batch; kd-evaluate uses 500 for Square alone), --passes calls per
  repeat, the same call ``util.numpy_model`` makes;
* **Square**: ``attacks.square(model, x, y, --epsilon, queries=--queries,
  batch_size=--batch_size, return_queries=True)`` (L-inf, --seed, traced
  beforehand); its rate is the sum of the per-image query counts over the wall
  seconds of the call.

The ratio Square/forward (median over median, best over best) is the target.
Images fooled leave Square's batch, so later queries run on smaller batches;
on a robust model (M1-AT at eps 0.3) most images stay, and the table also
gives the ratio against the forward throughput *at the batch sizes Square
actually used* (each distinct size timed, best of 3). Every interpreter call
Square makes is timed (a thin wrapper, no copy), so the loss splits into
three factors whose product is that ratio:

* counted / scored: queries counted over images the interpreter scored (the
  clean-prediction and final checks and the images fooled mid-chunk are
  scored but not counted);
* interpreter share: seconds inside the interpreter calls over the wall
  seconds (the rest: TensorFlow's loop, candidates, gather/scatter,
  ``tf.numpy_function``);
* in-call speed: images/s inside Square's interpreter calls over the forward
  throughput at the same batch sizes.

What costs the time outside the interpreter: Square on the batch of
--batch_size images is also run (same budget, nothing ever fooled) on a
zero-cost NumPy model (each repeat: the loop's own compute per call) and once
on a model that sleeps per call as long as the interpreter computes (the
loop's cost when TensorFlow's threads idle between calls, as they do around
the interpreter).

  PYTHONPATH=$PWD python benchmarks/square_tflite_benchmark.py /tmp/m1_at_int8.tflite \
      [--n 500] [--queries 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time

import numpy as np

import keras_defense as kd
from keras_defense import attacks
from keras_defense.evaluation import robustness_config
from keras_defense.models import tflite


class TimedModel:
  """``model`` as ``util.numpy_model`` sees it, recording each call's batch and seconds."""

  runs_on_numpy = True

  def __init__(self, model: tflite.TFLiteModel):
    self.model = model
    self.num_classes = model.num_classes
    self.path = model.path
    self.calls: list[tuple[int, float]] = []

  def __call__(self, x: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    out = self.model(x)
    self.calls.append((len(x), time.perf_counter() - start))
    return out


class NullModel:
  """A zero-cost NumPy model that is never fooled (class 0 by 5): Square's own loop cost."""

  runs_on_numpy = True

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def __call__(self, x: np.ndarray) -> np.ndarray:
    logits = np.zeros((len(x), self.num_classes), np.float32)
    logits[:, 0] = 5.0
    return logits


class SleepingModel(NullModel):
  """``NullModel`` that sleeps ``seconds_per_image`` x batch per call: the interpreter's
  wait without its CPU work (so TensorFlow's threads idle as they do around it)."""

  def __init__(self, num_classes: int, seconds_per_image: float):
    super().__init__(num_classes)
    self.seconds_per_image = seconds_per_image
    self.inside = 0.0

  def __call__(self, x: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    time.sleep(self.seconds_per_image * len(x))
    out = super().__call__(x)
    self.inside += time.perf_counter() - start
    return out


def loop_seconds_per_call(null: NullModel, xb: np.ndarray, args, queries: int) -> float:
  """Wall seconds per model call of Square on ``null`` (full batch, nothing fooled)."""
  start = time.perf_counter()
  attacks.square(null, xb, np.zeros(len(xb), np.int64), args.epsilon, queries=queries,
                 seed=args.seed, batch_size=args.batch_size)
  return (time.perf_counter() - start) / (queries + 2)  # calls: see attacks/square.py


def forward_rate(model: tflite.TFLiteModel, xb: np.ndarray, passes: int) -> float:
  """Images/s of ``passes`` calls ``model(xb)``."""
  start = time.perf_counter()
  for _ in range(passes):
    model(xb)
  return passes * len(xb) / (time.perf_counter() - start)


def forward_seconds(model: tflite.TFLiteModel, x: np.ndarray, sizes, tries: int = 3) -> dict:
  """Best-of-``tries`` seconds of one ``model(x[:n])`` call for each n in ``sizes``."""
  out = {}
  for n in sorted(set(sizes)):
    xb = x[:n]
    model(xb)
    best = float("inf")
    for _ in range(tries):
      start = time.perf_counter()
      model(xb)
      best = min(best, time.perf_counter() - start)
    out[n] = best
  return out


def square_run(timed: TimedModel, x, y, args) -> dict:
  """One timed Square run and what its interpreter calls cost."""
  timed.calls.clear()
  start = time.perf_counter()
  x_adv, counts = attacks.square(timed, x, y, args.epsilon, queries=args.queries, seed=args.seed,
                             batch_size=args.batch_size, return_queries=True)
  wall = time.perf_counter() - start
  sizes = [n for n, _ in timed.calls]
  return {"wall_seconds": wall, "x_adv": x_adv, "counts": counts, "counted": int(counts.sum()),
          "scored": int(sum(sizes)), "calls": len(sizes),
          "in_call_seconds": float(sum(s for _, s in timed.calls)), "sizes": sizes}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("tflite", help="the .tflite (e.g. kd-quantize --method=ptq_int8)")
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--n", type=int, default=500, help="test images")
  p.add_argument("--epsilon", type=float, default=0.3, help="L-inf radius")
  p.add_argument("--queries", type=int, default=300, help="Square's budget per image")
  p.add_argument("--batch_size", type=int, default=robustness_config.DEFAULT_BATCH_SIZE,
                 help="Square's batch and the forward batch (kd-evaluate's cap for "
                      "Square alone)")
  p.add_argument("--num_threads", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--passes", type=int, default=30, help="forward calls per repeat")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("n", "queries", "batch_size", "num_threads", "repeats", "passes"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  x, y = kd.load_arrays(args.dataset, "test", limit=args.n)
  model = tflite.TFLiteModel(args.tflite, num_threads=args.num_threads)
  timed = TimedModel(model)
  xb = x[:min(args.batch_size, len(x))]
  clean = model.predict_classes(x) == y
  attacks.square(timed, x[:8], y[:8], args.epsilon, queries=10, seed=args.seed)  # trace
  null = NullModel(model.num_classes)
  loop_seconds_per_call(null, xb[:8], args, 10)  # trace
  forward_rate(model, xb, 3)  # warm up
  forward, runs, loop = [], [], []
  for _ in range(args.repeats):   # alternating, so all see the same load
    forward.append(forward_rate(model, xb, args.passes))
    runs.append(square_run(timed, x, y, args))
    loop.append(loop_seconds_per_call(null, xb, args, args.queries))
  sleeping = SleepingModel(model.num_classes, 1.0 / float(np.median(forward)))
  loop_seconds_per_call(sleeping, xb[:8], args, 10)  # trace
  sleeping.inside = 0.0
  start = time.perf_counter()
  attacks.square(sleeping, xb, np.zeros(len(xb), np.int64), args.epsilon, queries=args.queries,
                 seed=args.seed, batch_size=args.batch_size)
  outside_sleeping = (time.perf_counter() - start - sleeping.inside) / (args.queries + 2)
  identical = all(np.array_equal(r["counts"], runs[0]["counts"]) for r in runs)
  at_sizes = forward_seconds(model, x, runs[0]["sizes"])
  rows = []
  for r in runs:
    rate = r["counted"] / r["wall_seconds"]
    fwd_same = r["scored"] / sum(at_sizes[n] for n in r["sizes"])
    rows.append({"square_qps": rate, "fwd_same_sizes": fwd_same,
                 "ratio_same_sizes": rate / fwd_same,
                 "counted_over_scored": r["counted"] / r["scored"],
                 "interpreter_share": r["in_call_seconds"] / r["wall_seconds"],
                 "in_call_speed": r["scored"] / r["in_call_seconds"] / fwd_same,
                 **{k: r[k] for k in ("wall_seconds", "counted", "scored", "calls",
                                      "in_call_seconds")}})
  fooled = clean & (model.predict_classes(runs[0]["x_adv"]) != y)
  sizes = runs[0]["sizes"]
  fwd_med, fwd_best = float(np.median(forward)), max(forward)
  sq = [r["square_qps"] for r in rows]
  sq_med, sq_best = float(np.median(sq)), max(sq)
  print(f"machine {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; {args.tflite} ({model.input_dtype} in, "
        f"{model.output_dtype} out), {args.num_threads} thread(s); {len(x)} {args.dataset} "
        f"test images, clean accuracy {clean.mean():.1%}; Square L-inf eps {args.epsilon}, "
        f"{args.queries} queries, batch {args.batch_size}: fooled {fooled.sum()} of "
        f"{clean.sum()} clean-correct; {len(sizes)} interpreter calls, mean batch "
        f"{np.mean(sizes):.0f} (min {min(sizes)}); query counts identical across "
        f"repeats: {identical}")
  print("| repeat | forward img/s (batch %d) | Square queries/s | ratio | forward img/s at "
        "Square's sizes | ratio at those sizes | counted / scored | interpreter share "
        "| in-call speed | loop alone ms/call |" % len(xb))
  print("|---|---|---|---|---|---|---|---|---|---|")
  for i, (f, r, l) in enumerate(zip(forward, rows, loop)):
    print(f"| {i + 1} | {f:,.0f} | {r['square_qps']:,.0f} | {r['square_qps'] / f:.2f} | "
          f"{r['fwd_same_sizes']:,.0f} | {r['ratio_same_sizes']:.2f} | "
          f"{r['counted_over_scored']:.3f} | {r['interpreter_share']:.3f} | "
          f"{r['in_call_speed']:.3f} | {1e3 * l:.2f} |")
  print(f"| median | {fwd_med:,.0f} | {sq_med:,.0f} | **{sq_med / fwd_med:.2f}** | | "
        f"{float(np.median([r['ratio_same_sizes'] for r in rows])):.2f} | | | | "
        f"{1e3 * float(np.median(loop)):.2f} |")
  print(f"| best | {fwd_best:,.0f} | {sq_best:,.0f} | {sq_best / fwd_best:.2f} | | | | | | "
        f"{1e3 * min(loop):.2f} |")
  per_batch = len(xb) / fwd_med
  bound = rows[0]["counted_over_scored"] * per_batch / (per_batch + float(np.median(loop)))
  print(f"Square's loop alone (a zero-cost NumPy model, batch {len(xb)}, nothing fooled): "
        f"{1e3 * float(np.median(loop)):.2f} ms per call vs the interpreter's "
        f"{1e3 * per_batch:.2f} ms per batch: ratio bound counted/scored x "
        f"forward/(forward + loop) = {bound:.2f}")
  outside = [(r["wall_seconds"] - r["in_call_seconds"]) / r["calls"] for r in rows]
  print(f"outside the interpreter per call: {1e3 * float(np.median(outside)):.2f} ms in Square "
        f"on the interpreter, {1e3 * outside_sleeping:.2f} ms with a model that sleeps as "
        f"long as the interpreter computes (batch {len(xb)}, nothing fooled), "
        f"{1e3 * float(np.median(loop)):.2f} ms with a zero-cost model")
  verdict = "met" if sq_med / fwd_med >= 0.8 else "NOT met"
  print(f"target Square >= 0.8x forward: {verdict} (median ratio {sq_med / fwd_med:.2f})")
  print(json.dumps({"args": vars(args), "load_average": os.getloadavg()[0],
                    "forward_ips": forward, "runs": rows, "loop_seconds_per_call": loop,
                    "outside_seconds_per_call": outside,
                    "outside_seconds_per_call_sleeping": outside_sleeping,
                    "identical_counts": identical,
                    "fooled": int(fooled.sum()), "clean_correct": int(clean.sum()),
                    "batch_sizes": dict(collections.Counter(sizes)),
                    "ratio_median": sq_med / fwd_med, "ratio_best": sq_best / fwd_best}))


if __name__ == "__main__":
  main()
