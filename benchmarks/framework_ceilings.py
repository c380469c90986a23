"""TensorFlow vs PyTorch: input-gradient and forward throughput of one network, same CPU.

Issue 13's speed target (the standard AutoAttack ensemble >= 2x faster than the
reference PyTorch implementation) depends on what each framework can do per
pass where the attacks cannot skip work: on an adversarially trained model
almost every image survives every attack, so per-image early stopping saves
nothing and each attack's time is (passes) / (pass rate). This script measures
the two pass rates on the same weights and images, in the same run, one
framework after the other (never concurrently):

  grad   softmax cross-entropy input gradient of a batch (what APGD and FAB
         compute per iteration), a compiled ``tf.function`` vs eager PyTorch
         autograd (what the reference runs);
  fwd    logits of a batch (what Square computes per query), compiled
         ``tf.function`` vs ``torch.no_grad`` eager.

Each is timed as ``--calls`` calls on the same batch, best of ``--rounds``.

The network is ``autoattack_reference.py``'s PyTorch port of the Keras model,
read from the ``model.npz`` that script's ``export`` stage writes (port
checked there). The PyTorch half runs under ``--bench_python`` (the benchmark
venv with torch; never the project's venv).

Usage:
  .venv/bin/python benchmarks/autoattack_reference.py export \\
      --model_path saved_models/mnist_m0_at_pgd/1 --npz /tmp/m0at.npz --num_images 250
  .venv/bin/python benchmarks/framework_ceilings.py run --model_path saved_models/mnist_m0_at_pgd/1 \\
      --npz /tmp/m0at.npz --batches 238,500 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def _best_rate(fn, batch: int, calls: int, rounds: int, sync=lambda out: None) -> int:
  sync(fn())  # warm-up (and tracing)
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    sync(out)
    best = min(best, time.perf_counter() - start)
  return round(calls * batch / best)


def measure_tf(model_path: str, npz: pathlib.Path, batches: list[int], calls: int,
               rounds: int) -> dict:
  import keras_defense as kd
  from keras_defense.util.compat import tf

  model = kd.load_model(model_path)
  data = np.load(npz)
  out = {}
  for batch in batches:
    x = tf.constant(np.resize(data["x"], (batch, *data["x"].shape[1:])))
    y = tf.constant(np.resize(data["y"], batch).astype(np.int64))

    @tf.function
    def grad(x=x, y=y):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, model(x, training=False)))
      return tape.gradient(loss, x)

    fwd = tf.function(lambda x=x: model(x, training=False))
    sync = lambda t: t.numpy()
    out[str(batch)] = {"grad": _best_rate(grad, batch, calls, rounds, sync),
                       "fwd": _best_rate(fwd, batch, calls, rounds, sync)}
  return out


def measure_torch(npz: pathlib.Path, batches: list[int], calls: int, rounds: int,
                  threads: int) -> dict:
  import torch
  sys.path.insert(0, str(HERE))
  from autoattack_reference import build_torch_model  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  data = np.load(npz)
  net = build_torch_model(data)
  out = {"torch": torch.__version__, "threads": threads}
  for batch in batches:
    x = torch.from_numpy(np.resize(data["x"], (batch, *data["x"].shape[1:]))).permute(
        0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.resize(data["y"], batch).astype(np.int64))

    def grad(x=x, y=y):
      xx = x.clone().requires_grad_(True)
      loss = torch.nn.functional.cross_entropy(net(xx), y, reduction="sum")
      return torch.autograd.grad(loss, xx)[0]

    def fwd(x=x):
      with torch.no_grad():
        return net(x)

    out[str(batch)] = {"grad": _best_rate(grad, batch, calls, rounds),
                       "fwd": _best_rate(fwd, batch, calls, rounds)}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("stage", choices=["run", "tf", "torch"])
  p.add_argument("--model_path", help="the Keras model (run, tf)")
  p.add_argument("--npz", required=True, help="autoattack_reference.py export's model.npz")
  p.add_argument("--batches", default="238,500", help="batch sizes, comma-separated")
  p.add_argument("--calls", type=int, default=40)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=2, help="run: alternate tf/torch this often")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--bench_python", default="/work/bench-venv/bin/python")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  batches = [int(b) for b in args.batches.split(",")]
  npz = pathlib.Path(args.npz)
  if not npz.is_file():
    p.error(f"--npz {npz}: no such file; write it with autoattack_reference.py export.")
  if args.stage == "tf":
    print(json.dumps(measure_tf(args.model_path, npz, batches, args.calls, args.rounds)))
    return 0
  if args.stage == "torch":
    print(json.dumps(measure_torch(npz, batches, args.calls, args.rounds, args.threads)))
    return 0
  if not args.model_path:
    p.error("run needs --model_path")
  common = ["--npz", str(npz), "--batches", args.batches, "--calls", str(args.calls),
            "--rounds", str(args.rounds)]
  runs = []
  for _ in range(args.repeats):
    tf_out = subprocess.run(
        [sys.executable, __file__, "tf", "--model_path", args.model_path, *common],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    torch_out = subprocess.run(
        [args.bench_python, __file__, "torch", "--threads", str(args.threads), *common],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    runs.append({"tf": json.loads(tf_out), "torch": json.loads(torch_out)})
  print("| repeat | batch | TF grad/s | torch grad/s | grad ratio | TF fwd/s | torch fwd/s | fwd ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for i, r in enumerate(runs, 1):
    for b in batches:
      t, q = r["tf"][str(b)], r["torch"][str(b)]
      print(f"| {i} | {b} | {t['grad']:,} | {q['grad']:,} | {t['grad'] / q['grad']:.2f} "
            f"| {t['fwd']:,} | {q['fwd']:,} | {t['fwd'] / q['fwd']:.2f} |")
  print(json.dumps({"model_path": args.model_path, "runs": runs}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
