"""IBM ART's APGD-CE + APGD-DLR + Square, chained the AutoAttack way, on our MNIST weights and images.

The speed target of issue 13 ("the full standard ensemble >= 2.5x faster than
ART's APGD-CE + APGD-DLR + Square run on the same images, at equal or lower
robust accuracy", L-inf, eps 0.3, MNIST) needs ART timed on the same network
and images as ``keras_defense.attacks.auto_attack``. ART (PyPI
``adversarial-robustness-toolbox``) lives only in the separate benchmark venv,
never in setup.py, .venv or CI. Built on ``autoattack_reference.py``: its
``export_model`` writes ``model.npz`` (layer spec, Keras weights, first N MNIST
test images, Keras logits) and its ``build_torch_model`` ports the network to
PyTorch; both are imported from there, not copied.

Stages:
  export   project venv: a Keras model -> ``model.npz`` (autoattack_reference's export).
  art      bench venv: ``model.npz`` -> PyTorch port (checked against the Keras
           logits) -> ART ``PyTorchClassifier`` -> APGD-CE, then APGD-DLR on the
           images APGD-CE left robust, then Square on those APGD-DLR left
           robust -> ``art.json`` + ``art_masks.npz``.
  run      project venv: export + ``art`` (as a subprocess of ``--bench_python``)
           for every model, one after the other, plus ``--summary``.

Setup and usage (see benchmarks/README.md, "ART (art_reference.py)"):
  /work/bench-venv/bin/pip install adversarial-robustness-toolbox==1.20.1 packaging
  nice -n 19 .venv/bin/python benchmarks/art_reference.py run \\
      --models m0=saved_models/mnist_m0/1,m2=saved_models/mnist_m2/1 --num_images 1000 \\
      --out_dir /work/bench-out/art --summary /work/bench-out/art/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autoattack_reference as aar  # noqa: E402  (stdlib + numpy at import time)

ATTACKS = ("apgd-ce", "apgd-dlr", "square")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ROBUST, CLEAN_WRONG = aar.ROBUST, aar.CLEAN_WRONG


# ------------------------------------------------------------- ART (bench venv)

def make_attack(name: str, classifier, *, epsilon: float, eps_step: float,
                batch_size: int, verbose: bool):
  """The ART attack object and the exact keyword arguments it was built with."""
  from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
  if name in ("apgd-ce", "apgd-dlr"):
    kwargs = dict(norm=np.inf, eps=epsilon, eps_step=eps_step, max_iter=100,
                  targeted=False, nb_random_init=1, batch_size=batch_size,
                  loss_type="cross_entropy" if name == "apgd-ce" else "difference_logits_ratio",
                  verbose=verbose)
    return AutoProjectedGradientDescent(classifier, **kwargs), kwargs
  if name == "square":
    kwargs = dict(norm=np.inf, eps=epsilon, max_iter=5000, p_init=0.8, nb_restarts=1,
                  batch_size=batch_size, verbose=verbose)
    return SquareAttack(classifier, **kwargs), kwargs
  raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


def _seed_all(seed: int) -> None:
  import torch
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def run_art(npz_path: pathlib.Path, out_dir: pathlib.Path, *, epsilon: float,
            eps_step: float, attacks: tuple[str, ...], seed: int, threads: int,
            batch_size: int, verbose: bool = False) -> dict:
  import torch
  import art
  from art.estimators.classification import PyTorchClassifier
  torch.set_num_threads(threads)

  npz = np.load(npz_path)
  net = aar.build_torch_model(npz)
  for p in net.parameters():   # input gradients only (as autoattack_reference does)
    p.requires_grad_(False)
  x = np.ascontiguousarray(npz["x"].transpose(0, 3, 1, 2)).astype(np.float32)  # NHWC -> NCHW
  y = npz["y"].astype(np.int64)
  if x.shape[1:] != (1, 28, 28):
    raise ValueError(f"{npz_path}: images have shape {x.shape[1:]} (NCHW), expected (1, 28, 28)")
  keras_logits = npz["keras_logits"]
  logits = aar._predict(net, torch.from_numpy(x)).numpy()
  diff = np.abs(logits - keras_logits)
  port = {"images": len(x), "max_abs_diff": float(diff.max()),
          "argmax_equal": int((logits.argmax(1) == keras_logits.argmax(1)).sum()),
          "tolerance": aar.PORT_TOLERANCE}
  port["ok"] = port["max_abs_diff"] <= aar.PORT_TOLERANCE and port["argmax_equal"] == len(x)
  print(f"port check {npz_path}: {json.dumps(port)}", flush=True)
  if not port["ok"]:
    raise RuntimeError(f"{npz_path}: the PyTorch port does not reproduce the Keras logits: {port}")

  classifier = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(),
                                 input_shape=(1, 28, 28), nb_classes=10,
                                 clip_values=(0.0, 1.0), device_type="cpu")
  clean = logits.argmax(1) == y
  broken_by = np.where(clean, ROBUST, CLEAN_WRONG).astype(np.int8)
  x_adv = x.copy()
  per_attack, settings = [], {}
  before = aar.machine()
  start = time.perf_counter()
  for i, name in enumerate(attacks):
    idx = np.flatnonzero(broken_by == ROBUST)   # still robust: the AutoAttack way
    attack, kwargs = make_attack(name, classifier, epsilon=epsilon, eps_step=eps_step,
                                 batch_size=batch_size, verbose=verbose)
    settings[name] = {"class": type(attack).__name__,
                      **{k: ("inf" if v is np.inf else v) for k, v in kwargs.items()}}
    seconds = 0.0
    if len(idx):
      _seed_all(seed)
      t0 = time.perf_counter()
      adv = attack.generate(x=x[idx], y=y[idx])
      seconds = time.perf_counter() - t0
      pred = aar._predict(net, torch.from_numpy(adv.astype(np.float32))).numpy().argmax(1)
      hit = pred != y[idx]
      broken_by[idx[hit]] = i
      x_adv[idx[hit]] = adv[hit]
    row = {"attack": name, "images_attacked": int(len(idx)),
           "broken": int((broken_by == i).sum()),
           "robust_accuracy_after": float((broken_by == ROBUST).mean()),
           "seconds": round(seconds, 2)}
    per_attack.append(row)
    print(f"  [art] {name}: attacked {row['images_attacked']}, broke {row['broken']}, "
          f"robust accuracy after {100 * row['robust_accuracy_after']:.1f}%, "
          f"{row['seconds']} s", flush=True)
  total = time.perf_counter() - start
  after = aar.machine()

  robust = aar._predict(net, torch.from_numpy(x_adv)).numpy().argmax(1) == y
  linf = np.abs(x_adv - x).reshape(len(x), -1).max(1)
  aar.save_npz(out_dir / "art_masks.npz", clean_correct=clean, robust=robust,
               broken_by=broken_by, attacks=np.array(attacks),
               x_adv=x_adv.transpose(0, 2, 3, 1))
  return {
      "model_path": str(npz["model_path"]), "npz": str(npz_path),
      "first": int(npz["first"]) if "first" in npz else 0, "n_examples": len(x),
      "epsilon": epsilon, "norm": "Linf", "seed": seed, "batch_size": batch_size,
      "threads": threads, "port_check": port,
      "versions": {"art": art.__version__, "torch": torch.__version__,
                   "numpy": np.__version__, "python": platform.python_version()},
      "settings": {"chaining": "each attack on the images still robust after the previous ones",
                   "classifier": "art PyTorchClassifier(loss=CrossEntropyLoss, input_shape=(1, 28, 28), "
                                 "nb_classes=10, clip_values=(0, 1), device_type='cpu')",
                   "attacks": settings},
      "clean_accuracy": float(clean.mean()), "robust_accuracy": float(robust.mean()),
      "per_attack": per_attack,
      "attack_seconds": round(sum(r["seconds"] for r in per_attack), 2),
      "total_seconds": round(total, 2),
      "machine_before": before, "machine_after": after,
      "checks": {"robust_equals_argmax_of_x_adv": bool((robust == (broken_by == ROBUST)).all()),
                 "max_linf": float(linf.max()),
                 "linf_within_eps": bool(linf.max() <= epsilon + 1e-6),
                 "x_adv_in_box": bool(x_adv.min() >= 0 and x_adv.max() <= 1)},
      "masks": str(out_dir / "art_masks.npz")}


# ------------------------------------------------------------ run (project venv)

def _check_out_dir(path: str) -> pathlib.Path:
  out = pathlib.Path(path).resolve()
  if out == REPO_ROOT or REPO_ROOT in out.parents:
    raise SystemExit(f"--out_dir {path}: inside the repository ({REPO_ROOT}); "
                     "use a directory outside it (default /work/bench-out/art)")
  return out


def _parse_models(text: str) -> dict:
  models = {}
  for item in text.split(","):
    name, sep, path = item.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise SystemExit(f"--models: bad item {item!r}; expected name=path[,name=path...]")
    if not os.path.exists(path):
      raise SystemExit(f"--models: {name}: no such model path {path!r}")
    models[name.strip()] = path.strip()
  return models


def _parse_attacks(text: str) -> tuple[str, ...]:
  names = tuple(a.strip() for a in text.split(",") if a.strip())
  bad = [a for a in names if a not in ATTACKS]
  if bad or not names:
    raise SystemExit(f"--attacks: unknown {bad or text!r}; choose from {', '.join(ATTACKS)}")
  return names


def _npz_matches(path: pathlib.Path, model_path: str, first: int, num_images: int) -> str | None:
  """Why an existing model.npz can not be reused (None if it can)."""
  npz = np.load(path)
  if str(npz["model_path"]) != str(model_path):
    return f"holds {npz['model_path']}, not {model_path}"
  held_first = int(npz["first"]) if "first" in npz else 0
  if held_first != first or len(npz["x"]) != num_images:
    return f"holds images {held_first}..{held_first + len(npz['x']) - 1}"
  return None


def run_all(args) -> dict:
  out_root = _check_out_dir(args.out_dir)
  models = _parse_models(args.models)
  command = " ".join(["python"] + sys.argv)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO_ROOT).stdout.strip()
  summary_path = pathlib.Path(args.summary) if args.summary else None
  produced = {}
  env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
         "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
  for name, path in models.items():
    d = out_root / name
    d.mkdir(parents=True, exist_ok=True)
    npz = d / "model.npz"
    why = (_npz_matches(npz, path, args.first, args.num_images)
           if args.reuse_export and npz.exists() else "not asked to reuse")
    if why is None:
      print(f"== {name}: reusing {npz}", flush=True)
    else:
      if args.reuse_export:
        print(f"== {name}: not reusing {npz}: {why}", flush=True)
      print(f"== {name}: export {path}", flush=True)
      aar.export_model(path, npz, num_images=args.num_images, first=args.first)
    cmd = [args.bench_python, os.path.abspath(__file__), "art", "--npz", str(npz),
           "--out_dir", str(d), "--epsilon", str(args.epsilon), "--eps_step",
           str(args.eps_step), "--attacks", ",".join(args.attacks), "--seed", str(args.seed),
           "--threads", str(args.threads), "--batch_size", str(args.batch_size)]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env)
    res = json.loads((d / "art.json").read_text())
    produced[name] = {"command": command, "git_commit": commit, "model_path": path,
                      "images": f"MNIST test images {res['first']}..{res['first'] + res['n_examples'] - 1}",
                      **{k: res[k] for k in (
                          "versions", "threads", "batch_size", "settings", "port_check",
                          "clean_accuracy", "robust_accuracy", "per_attack", "attack_seconds",
                          "total_seconds", "machine_before", "machine_after", "checks", "masks")}}
    if summary_path is not None:   # after every model; other runs may have written meanwhile
      summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
      summary.update({"what": "IBM ART APGD-CE + APGD-DLR + Square, AutoAttack-way chaining "
                              "(benchmarks/art_reference.py)",
                      "epsilon": args.epsilon, "norm": "Linf", "seed": args.seed})
      summary["models"] = {**summary.get("models", {}), name: produced[name]}
      summary_path.parent.mkdir(parents=True, exist_ok=True)
      aar.write_json(summary_path, summary)
  return produced


# ------------------------------------------------------------------- CLI

def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  sub = p.add_subparsers(dest="stage", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--epsilon", type=float, default=0.3, help="L-inf radius (default 0.3)")
  common.add_argument("--eps_step", type=float, default=None,
                      help="APGD initial step size (default 2*epsilon, AutoAttack's; "
                           "ART's own default is 0.1)")
  common.add_argument("--attacks", default=",".join(ATTACKS),
                      help=f"comma list, run in this order (default {','.join(ATTACKS)})")
  common.add_argument("--seed", type=int, default=0,
                      help="numpy/torch/random seed, reset before each attack (default 0)")
  common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
  common.add_argument("--batch_size", type=int, default=500, help="ART batch_size (default 500)")
  e = sub.add_parser("export", help="project venv: Keras model -> model.npz")
  e.add_argument("--model_path", required=True)
  e.add_argument("--npz", required=True)
  e.add_argument("--num_images", type=int, default=1000)
  e.add_argument("--first", type=int, default=0, help="index of the first test image")
  a = sub.add_parser("art", parents=[common],
                     help="bench venv: model.npz -> ART attacks -> art.json, art_masks.npz")
  a.add_argument("--npz", required=True, help="written by the export stage")
  a.add_argument("--out_dir", required=True, help="where art.json and art_masks.npz go")
  a.add_argument("--verbose", action="store_true", help="ART's tqdm progress bars")
  r = sub.add_parser("run", parents=[common],
                     help="project venv: export + art (subprocess) for every model")
  r.add_argument("--models", required=True, help="name=path,... (SavedModel dirs or .keras)")
  r.add_argument("--num_images", type=int, default=1000)
  r.add_argument("--first", type=int, default=0, help="index of the first test image")
  r.add_argument("--bench_python", default="/work/bench-venv/bin/python",
                 help="interpreter of the venv that has ART and torch")
  r.add_argument("--out_dir", default="/work/bench-out/art",
                 help="per-model directories <out_dir>/<name>/ (outside the repo)")
  r.add_argument("--summary", default=None,
                 help="JSON merged per model (no per-image data); created if missing")
  r.add_argument("--reuse_export", action="store_true",
                 help="keep <out_dir>/<name>/model.npz if it holds the same model and images")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  for flag in ("num_images", "threads", "batch_size"):
    if getattr(args, flag, 1) < 1:
      p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if getattr(args, "first", 0) < 0:
    p.error(f"--first must be >= 0, got {args.first}")
  if hasattr(args, "epsilon"):
    if not args.epsilon > 0:
      p.error(f"--epsilon must be > 0, got {args.epsilon}")
    args.eps_step = 2 * args.epsilon if args.eps_step is None else args.eps_step
    if not args.eps_step > 0:
      p.error(f"--eps_step must be > 0, got {args.eps_step}")
    args.attacks = _parse_attacks(args.attacks)

  if args.stage == "export":
    print(json.dumps(aar.export_model(args.model_path, pathlib.Path(args.npz),
                                      num_images=args.num_images, first=args.first)))
  elif args.stage == "art":
    npz = pathlib.Path(args.npz)
    if not npz.is_file():
      p.error(f"--npz {args.npz}: no such file (write it with the export stage)")
    out = _check_out_dir(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run_art(npz, out, epsilon=args.epsilon, eps_step=args.eps_step,
                  attacks=args.attacks, seed=args.seed, threads=args.threads,
                  batch_size=args.batch_size, verbose=args.verbose)
    aar.write_json(out / "art.json", res)
    print(json.dumps({k: res[k] for k in ("clean_accuracy", "robust_accuracy",
                                          "attack_seconds", "total_seconds")}))
  else:
    run_all(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
