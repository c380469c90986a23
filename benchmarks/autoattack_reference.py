"""The reference AutoAttack (pyautoattack, PyTorch, CPU) on the same weights and images as ours.

Issue 13, item 5: robust accuracy per attack and image by image, reference vs
``keras_defense.attacks.auto_attack``, with both timed in the same run. Two
interpreters are involved, because PyTorch and the reference live only in a
separate benchmark venv (never in setup.py, .venv or CI):

  export     project venv: a Keras model -> ``model.npz`` (its layers as a
             small spec, the Keras weights, the first N MNIST test images and
             the Keras logits on them).
  reference  bench venv: ``model.npz`` -> the same network in PyTorch; the port
             is checked against the Keras logits (max |diff|, argmax); then the
             reference AutoAttack -> ``reference.json`` + ``reference_masks.npz``
             (clean-correct, robust and "broken by" per image, x_adv).
  ours       project venv: ``keras_defense.attacks.auto_attack`` on the same
             images -> ``ours.json`` + ``ours_masks.npz`` (skipped, with a note,
             while it does not exist).
  compare    either venv (numpy only): per attack and image by image.
  run        project venv: all of it for every model, the reference as a
             subprocess of ``--bench_python``, one after the other (never
             concurrently), plus a small summary JSON.

The port: Conv2D kernels (kh, kw, in, out) -> (out, in, kh, kw); Dense kernels
transposed; the first Dense after a Flatten gets its input rows permuted from
Keras's (h, w, c) flattening order to PyTorch's (c, h, w). Only the layers of
the C&W networks are accepted (Conv2D valid/stride 1, MaxPooling2D, Flatten,
Dense, Activation, Dropout, Rescaling); anything else is an error.

How the reference's per-attack table is read: pyautoattack's
``run_standard_evaluation`` logs "robust accuracy after X" but returns only
``x_adv``. Each attack object's ``perturb`` is wrapped: the reference calls it
on the still-robust images in ascending index order, batch after batch, so the
wrapper knows which images each call holds, times it, and records which of them
the returned examples misclassify (the same test the reference applies). At the
end the tracked mask is checked against ``argmax(model(x_adv)) == y`` and the
per-attack numbers against the reference's own log lines.

Setup and usage (see benchmarks/README.md, "AutoAttack reference"):
  python3 -m venv /work/bench-venv
  /work/bench-venv/bin/pip install torch==2.13.0 numpy
  /work/bench-venv/bin/pip install --no-deps pyautoattack==0.2.0
  .venv/bin/python benchmarks/autoattack_reference.py run \\
      --models m0=saved_models/mnist_m0/1,m1=saved_models/mnist_m1/1,m2=saved_models/mnist_m2/1 \\
      --attack_models m0,m2 --bench_python /work/bench-venv/bin/python \\
      --out_dir /work/bench-out/aa --summary benchmarks/autoattack_reference_results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import numpy as np

ATTACKS_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
ROBUST, CLEAN_WRONG = -2, -1   # codes of "broken_by" beside an attack's index
PORT_TOLERANCE = 1e-4


# ----------------------------------------------------------------- helpers

def machine() -> dict:
  """What the timings ran on: cores and load now (the CPU is shared)."""
  return {"nproc": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()],
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
  tmp.replace(path)


def _jsonable(v):
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, pathlib.Path):
    return str(v)
  raise TypeError(f"not JSON serializable: {type(v).__name__}")


def save_npz(path: pathlib.Path, **arrays) -> None:
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez_compressed(tmp, **arrays)
  tmp.replace(path)


def attack_key(name: str) -> str:
  """'APGD_CE', 'apgd-ce', 'ApgdCe' -> 'apgd-ce' (to match names across implementations)."""
  s = re.sub(r"(?<=[a-z])(?=[A-Z])", "-", str(name)).lower().replace("_", "-").strip()
  return {"apgd-dlr-t": "apgd-t", "apgd-targeted": "apgd-t", "fab-targeted": "fab-t",
          "square-attack": "square"}.get(s, s)


# ------------------------------------------------------ export (project venv)

def export_model(model_path: str, out: pathlib.Path, *, num_images: int,
                 first: int = 0) -> dict:
  """Writes the layer spec, Keras weights, images and Keras logits to ``out``."""
  import keras_defense as kd
  from keras_defense.util.compat import keras

  model = kd.load_model(model_path)
  spec, arrays = [], {}
  for layer in model.layers:
    cfg = layer.get_config()
    kind = type(layer).__name__
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if isinstance(layer, keras.layers.Dropout):
      continue   # inference: identity
    entry = {"kind": kind, "name": layer.name}
    if isinstance(layer, keras.layers.Conv2D):
      if (tuple(cfg["strides"]) != (1, 1) or cfg["padding"] != "valid"
          or tuple(cfg["dilation_rate"]) != (1, 1) or cfg["data_format"] != "channels_last"
          or cfg.get("groups", 1) != 1):
        raise ValueError(f"layer {layer.name}: only stride-1 valid channels_last "
                         f"convolutions are ported; got {cfg}.")
      entry.update(activation=cfg["activation"], use_bias=cfg["use_bias"])
    elif isinstance(layer, keras.layers.MaxPooling2D):
      if cfg["padding"] != "valid":
        raise ValueError(f"layer {layer.name}: only valid pooling is ported.")
      entry.update(pool_size=list(cfg["pool_size"]), strides=list(cfg["strides"]))
    elif isinstance(layer, keras.layers.Flatten):
      entry.update(input_hwc=list(layer.input_shape[1:]))
    elif isinstance(layer, keras.layers.Dense):
      entry.update(activation=cfg["activation"], use_bias=cfg["use_bias"])
    elif isinstance(layer, keras.layers.Activation):
      entry.update(activation=cfg["activation"])
    elif isinstance(layer, keras.layers.Rescaling):
      entry.update(scale=float(cfg["scale"]), offset=float(cfg["offset"]))
    else:
      raise ValueError(f"layer {layer.name} ({kind}) has no PyTorch port here.")
    if entry.get("activation", "linear") not in ("relu", "linear"):
      raise ValueError(f"layer {layer.name}: activation {entry['activation']!r} not ported.")
    for i, w in enumerate(layer.get_weights()):
      arrays[f"w{len(spec)}_{i}"] = w.astype(np.float32)
    spec.append(entry)

  x, y = kd.load_arrays("mnist", "test", limit=first + num_images)
  x, y = x[first:], y[first:]
  logits = np.concatenate([model(x[i:i + 500], training=False).numpy()
                           for i in range(0, len(x), 500)])
  out.parent.mkdir(parents=True, exist_ok=True)
  save_npz(out, spec=np.array(json.dumps(spec)), x=x, y=y, keras_logits=logits,
           first=np.array(first),
           model_path=np.array(str(model_path)), **arrays)
  return {"model_path": str(model_path), "layers": [s["kind"] for s in spec],
          "first": first, "num_images": len(x), "keras_clean_accuracy": float(np.mean(logits.argmax(1) == y))}


# ------------------------------------------------- reference (bench venv)

def build_torch_model(npz):
  """The Keras network of ``npz`` as a torch.nn.Sequential taking NCHW images."""
  import torch
  from torch import nn

  class Rescale(nn.Module):
    def __init__(self, scale, offset):
      super().__init__()
      self.scale, self.offset = scale, offset

    def forward(self, x):
      return x * self.scale + self.offset

  spec = json.loads(str(npz["spec"]))
  mods = []
  flatten_hwc = None
  for i, e in enumerate(spec):
    w = [torch.from_numpy(npz[f"w{i}_{j}"]) for j in range(2) if f"w{i}_{j}" in npz]
    if e["kind"] == "Conv2D":
      k = w[0]                                      # (kh, kw, in, out)
      conv = nn.Conv2d(k.shape[2], k.shape[3], tuple(k.shape[:2]), bias=e["use_bias"])
      conv.weight.data = k.permute(3, 2, 0, 1).contiguous()
      if e["use_bias"]:
        conv.bias.data = w[1].clone()
      mods.append(conv)
    elif e["kind"] == "MaxPooling2D":
      mods.append(nn.MaxPool2d(tuple(e["pool_size"]), tuple(e["strides"])))
    elif e["kind"] == "Flatten":
      flatten_hwc = e["input_hwc"]
      mods.append(nn.Flatten())
    elif e["kind"] == "Dense":
      k = w[0]                                      # (in, out), Keras order
      if flatten_hwc is not None:                   # rows (h, w, c) -> (c, h, w)
        h, wd, c = flatten_hwc
        k = k.reshape(h, wd, c, -1).permute(2, 0, 1, 3).reshape(h * wd * c, -1)
        flatten_hwc = None
      lin = nn.Linear(k.shape[0], k.shape[1], bias=e["use_bias"])
      lin.weight.data = k.t().contiguous()
      if e["use_bias"]:
        lin.bias.data = w[1].clone()
      mods.append(lin)
    elif e["kind"] == "Rescaling":
      mods.append(Rescale(e["scale"], e["offset"]))
    elif e["kind"] != "Activation":
      raise ValueError(f"no port for {e['kind']}")
    if e.get("activation") == "relu":
      mods.append(nn.ReLU())
  return nn.Sequential(*mods).eval()


def _predict(net, x, batch=500):
  import torch
  with torch.no_grad():
    return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])


def run_reference(npz_path: pathlib.Path, out_dir: pathlib.Path, *, epsilon: float,
                  version: str, seed: int, threads: int, batch_size: int,
                  attack: bool = True) -> dict:
  import torch
  torch.set_num_threads(threads)
  try:
    from pyautoattack import AutoAttack   # PyPI "pyautoattack"
    import pyautoattack as aa_pkg
  except ImportError:                     # the original package (git install)
    from autoattack import AutoAttack
    import autoattack as aa_pkg

  npz = np.load(npz_path)
  net = build_torch_model(npz)
  for p in net.parameters():
    p.requires_grad_(False)
  x = torch.from_numpy(npz["x"]).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
  y = torch.from_numpy(npz["y"]).long()
  keras_logits = npz["keras_logits"]
  logits = _predict(net, x).numpy()
  diff = np.abs(logits - keras_logits)
  port = {"images": len(x), "max_abs_diff": float(diff.max()),
          "max_abs_logit": float(np.abs(keras_logits).max()),
          "max_rel_diff": float((diff.max(1) / np.abs(keras_logits).max(1)).max()),
          "argmax_equal": int((logits.argmax(1) == keras_logits.argmax(1)).sum()),
          "tolerance": PORT_TOLERANCE}
  port["ok"] = port["max_abs_diff"] <= PORT_TOLERANCE and port["argmax_equal"] == len(x)
  result = {"model_path": str(npz["model_path"]), "port_check": port,
            "torch": torch.__version__, "reference": f"{aa_pkg.__name__} "
            f"{getattr(aa_pkg, '__version__', '?')}", "threads": threads,
            "python": platform.python_version()}
  print(f"port check {npz_path}: {json.dumps(port)}", flush=True)
  if not attack:
    return result

  clean = logits.argmax(1) == y.numpy()
  tracker = _Tracker(clean)
  logger = logging.getLogger("auto-attack")
  logger.setLevel(logging.DEBUG)
  logger.propagate = False
  for h in list(logger.handlers):
    logger.removeHandler(h)
  log_file = logging.FileHandler(out_dir / "reference.log", mode="w")
  log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  logger.addHandler(log_file)
  logger.addHandler(tracker)
  stream = logging.StreamHandler(sys.stdout)
  stream.setFormatter(logging.Formatter("  [reference] %(message)s"))
  logger.addHandler(stream)

  adversary = AutoAttack(net, norm="Linf", eps=epsilon, version=version, seed=seed,
                         device="cpu")
  for obj in {id(o): o for o in (adversary.apgd, adversary.apgd_targeted,
                                  adversary.fab, adversary.square)}.values():
    tracker.wrap(obj, net)
  before = machine()
  start = time.perf_counter()
  x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
  seconds = time.perf_counter() - start
  after = machine()
  log_file.close()

  robust = (_predict(net, x_adv).argmax(1) == y).numpy()
  linf = (x_adv - x).abs().reshape(len(x), -1).max(1)[0].numpy()
  attacks = tracker.attacks
  per_attack = []
  for i, name in enumerate(attacks):
    broken = tracker.broken_by == i
    per_attack.append({
        "attack": name, "broken": int(broken.sum()),
        "robust_accuracy_after": float((tracker.broken_by == ROBUST).sum() +
                                       sum((tracker.broken_by == j).sum()
                                           for j in range(i + 1, len(attacks)))) / len(x),
        "robust_accuracy_logged": tracker.logged.get(name),
        "images_attacked": tracker.attacked[name], "seconds": round(tracker.seconds[name], 2)})
  result.update({
      "epsilon": epsilon, "norm": "Linf", "version": version, "seed": seed,
      "batch_size": batch_size, "n_examples": len(x),
      "clean_accuracy": float(clean.mean()), "robust_accuracy": float(robust.mean()),
      "per_attack": per_attack, "seconds": round(seconds, 1),
      "machine_before": before, "machine_after": after,
      "checks": {"tracked_mask_equals_argmax_of_x_adv": bool((robust == (tracker.broken_by == ROBUST)).all()),
                 "per_attack_equals_reference_log": all(
                     a["images_attacked"] == 0 or (a["robust_accuracy_logged"] is not None and
                     abs(a["robust_accuracy_after"] - a["robust_accuracy_logged"]) < 1e-6)
                     for a in per_attack),
                 "max_linf": float(linf.max()),
                 "x_adv_in_box": bool((x_adv.min() >= 0) and (x_adv.max() <= 1))},
      "warnings": tracker.warnings,
      "masks": str(out_dir / "reference_masks.npz")})
  save_npz(out_dir / "reference_masks.npz", clean_correct=clean, robust=robust,
           broken_by=tracker.broken_by, attacks=np.array(attacks),
           x_adv=x_adv.permute(0, 2, 3, 1).numpy())
  return result


class _Tracker(logging.Handler):
  """Follows run_standard_evaluation: which images each perturb call held and broke."""

  def __init__(self, clean):
    super().__init__(logging.DEBUG)
    self.broken_by = np.where(clean, ROBUST, CLEAN_WRONG).astype(np.int8)
    self.attacks, self.current, self.queue, self.pos = [], None, None, 0
    self.logged, self.seconds, self.attacked, self.warnings = {}, {}, {}, []

  def emit(self, record):
    msg = record.getMessage()
    m = re.match(r"running (\S+)$", msg)
    if m:
      self.current = m.group(1)
      self.attacks.append(self.current)
      self.queue = np.flatnonzero(self.broken_by == ROBUST)
      self.pos = 0
      self.seconds[self.current] = 0.0
      self.attacked[self.current] = int(len(self.queue))
    m = re.match(r"robust accuracy after (\S+): ([\d.]+)%", msg)
    if m:
      self.logged[m.group(1).lower()] = float(m.group(2)) / 100
    if record.levelno >= logging.WARNING:
      self.warnings.append(msg)

  def wrap(self, obj, net):
    original = obj.perturb

    def perturb(x, y, *args, **kwargs):
      t0 = time.perf_counter()
      adv = original(x, y, *args, **kwargs)
      self.seconds[self.current] += time.perf_counter() - t0
      idx = self.queue[self.pos:self.pos + len(x)]
      self.pos += len(x)
      broken = (_predict(net, adv).argmax(1) != y).numpy()
      self.broken_by[idx[broken]] = len(self.attacks) - 1
      return adv

    obj.perturb = perturb


# ------------------------------------------------------ ours (project venv)

def find_ours():
  """keras_defense's auto_attack, or None while it does not exist."""
  try:
    from keras_defense import attacks
    fn = getattr(attacks, "auto_attack", None)
    if fn is None:
      from keras_defense.attacks.autoattack import auto_attack as fn
  except Exception as e:  # not written yet, or mid-edit in a shared tree
    print(f"keras_defense auto_attack unavailable: {type(e).__name__}: {e}", flush=True)
    return None
  return fn


def _as_dict(entry) -> dict:
  if dataclasses.is_dataclass(entry):
    return {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
  for attr in ("to_dict", "_asdict"):
    if hasattr(entry, attr):
      return dict(getattr(entry, attr)())
  if isinstance(entry, dict):
    return dict(entry)
  return {"value": entry}


def run_ours(npz_path: pathlib.Path, out_dir: pathlib.Path, *, epsilon: float,
             version: str, seed: int, compute_dtype: str | None = None) -> dict:
  auto_attack = find_ours()
  if auto_attack is None:
    return {"skipped": "keras_defense.attacks.auto_attack is not importable yet"}
  import keras_defense as kd
  npz = np.load(npz_path)
  model = kd.load_model(str(npz["model_path"]))
  x, y = npz["x"], npz["y"]
  before = machine()
  start = time.perf_counter()
  dtype = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
  res = auto_attack(model, x, y, epsilon, norm="linf", version=version, seed=seed, **dtype)
  seconds = time.perf_counter() - start
  after = machine()
  x_adv = np.asarray(res.x_adv)
  robust = np.asarray(res.robust).astype(bool)
  clean = np.asarray(res.clean_correct).astype(bool)
  pred = np.concatenate([model(x_adv[i:i + 500], training=False).numpy().argmax(1)
                         for i in range(0, len(x), 500)])
  per_attack, masks = [], {}
  for i, entry in enumerate(res.per_attack):
    d, scalars = _as_dict(entry), {}
    for k, v in d.items():
      a = np.asarray(v) if not isinstance(v, str) else None
      if a is not None and a.shape == (len(x),):
        masks[f"per_attack{i}_{k}"] = a
      elif a is not None and a.ndim == 0:
        scalars[k] = a.item()
      else:
        scalars[k] = str(v) if a is None or a.size > 50 else a.tolist()
    name = next((scalars[k] for k in ("attack", "name") if k in scalars), f"attack{i}")
    scalars["attack"] = attack_key(name)
    per_attack.append(scalars)
  save_npz(out_dir / "ours_masks.npz", clean_correct=clean, robust=robust, x_adv=x_adv,
           **masks)
  return {"model_path": str(npz["model_path"]), "keras_defense": kd.__file__,
          "epsilon": epsilon, "version": version, "seed": seed, "n_examples": len(x), "clean_accuracy": float(clean.mean()),
          "robust_accuracy": float(robust.mean()),
          "robust_accuracy_reported": float(res.robust_accuracy),
          "compute_dtype": str(getattr(res, "compute_dtype", "?")),
          "per_attack": per_attack, "seconds": round(seconds, 1),
          "machine_before": before, "machine_after": after,
          "checks": {"robust_equals_argmax_of_x_adv": bool((robust == (clean & (pred == y))).all()),
                     "max_linf": float(np.abs(x_adv - x).max()),
                     "x_adv_in_box": bool(x_adv.min() >= 0 and x_adv.max() <= 1)},
          "masks": str(out_dir / "ours_masks.npz")}


# ------------------------------------------------------------- compare

def compare(out_dir: pathlib.Path) -> dict:
  ref = json.loads((out_dir / "reference.json").read_text())
  ours_path = out_dir / "ours.json"
  ours = json.loads(ours_path.read_text()) if ours_path.exists() else {"skipped": "no ours.json"}
  if "skipped" in ours or "per_attack" not in ref:
    return {"skipped": ours.get("skipped", "no reference attack run")}
  r = np.load(out_dir / "reference_masks.npz")
  o = np.load(out_dir / "ours_masks.npz")
  ref_attacks = [str(a) for a in r["attacks"]]
  both = r["robust"] & o["robust"]
  rows = []
  ours_by = {a["attack"]: a for a in ours["per_attack"]}
  for a in ref["per_attack"]:
    mine = ours_by.get(attack_key(a["attack"]), {})
    acc = next((mine[k] for k in ("robust_accuracy", "robust_accuracy_after", "robust_acc")
                if k in mine), None)
    rows.append({"attack": a["attack"], "reference_robust_accuracy_after": a["robust_accuracy_after"],
                 "ours_robust_accuracy_after": acc, "reference_seconds": a["seconds"],
                 "ours_seconds": mine.get("seconds")})
  diff = 100 * (ours["robust_accuracy"] - ref["robust_accuracy"])
  return {
      "n_examples": ref["n_examples"],
      "reference_robust_accuracy": ref["robust_accuracy"],
      "ours_robust_accuracy": ours["robust_accuracy"],
      "ours_minus_reference_points": round(diff, 2),
      "strength_target_met (ours <= reference + 0.5 points)": bool(diff <= 0.5),
      "clean_correct_agree": int((r["clean_correct"] == o["clean_correct"]).sum()),
      "robust_in_both": int(both.sum()),
      "robust_only_in_ours (reference broke, we did not)": np.flatnonzero(
          o["robust"] & ~r["robust"]).tolist(),
      "robust_only_in_reference (we broke, it did not)": np.flatnonzero(
          r["robust"] & ~o["robust"]).tolist(),
      "reference_broke_by_attack_among_ours_robust": {
          name: int(((r["broken_by"] == i) & o["robust"]).sum())
          for i, name in enumerate(ref_attacks)},
      "per_attack": rows,
      "reference_seconds": ref["seconds"], "ours_seconds": ours["seconds"],
      "reference_threads": ref.get("threads"), "ours_compute_dtype": ours.get("compute_dtype"),
      "loadavg_1min (reference start, end; ours start, end)": [
          ref["machine_before"]["loadavg"][0], ref["machine_after"]["loadavg"][0],
          ours["machine_before"]["loadavg"][0], ours["machine_after"]["loadavg"][0]],
      "speedup (reference / ours)": round(ref["seconds"] / ours["seconds"], 2)
      if ours["seconds"] else None}


# ------------------------------------------------------------- run (all)

def run_all(args) -> dict:
  out_root = pathlib.Path(args.out_dir)
  models = dict(item.split("=", 1) for item in args.models.split(","))
  attack_models = set(args.attack_models.split(",")) if args.attack_models else set(models)
  command = " ".join(["python"] + sys.argv)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  summary_path = pathlib.Path(args.summary) if args.summary else None
  summary = (json.loads(summary_path.read_text())
             if summary_path is not None and summary_path.exists() else {})
  summary.update({"epsilon": args.epsilon, "norm": "Linf", "version": args.version,
                  "seed": args.seed})
  summary.setdefault("models", {})
  produced = {}
  for name, path in models.items():
    d = out_root / name
    d.mkdir(parents=True, exist_ok=True)
    if args.reuse_export and (d / "model.npz").exists():
      print(f"== {name}: reusing {d / 'model.npz'}", flush=True)
      exported = {"model_path": path, "reused": str(d / "model.npz")}
    else:
      print(f"== {name}: export {path}", flush=True)
      exported = export_model(path, d / "model.npz", num_images=args.num_images,
                              first=args.first)
    cmd = [args.bench_python, os.path.abspath(__file__), "reference", "--npz",
           str(d / "model.npz"), "--out_dir", str(d), "--epsilon", str(args.epsilon),
           "--version", args.version, "--seed", str(args.seed), "--threads",
           str(args.threads), "--batch_size", str(args.batch_size)]
    if name not in attack_models:
      cmd.append("--port_check_only")
    held = (json.loads((d / "reference.json").read_text())
            if (d / "reference.json").exists() else {})
    reused = args.reuse_reference and ("per_attack" in held or name not in attack_models)
    if reused:
      print(f"== {name}: reusing {d / 'reference.json'}", flush=True)
    else:
      print(f"== {name}: reference: {' '.join(cmd)}", flush=True)
      subprocess.run(cmd, check=True)
    ref = json.loads((d / "reference.json").read_text())
    entry = {"command": ("(reference reused) " if reused else "") + command,
             "git_commit": commit, "model_path": path,
             "images": f"MNIST test images {args.first}..{args.first + ref['port_check']['images'] - 1}",
             "port_check": ref["port_check"]}
    if name in attack_models:
      entry["reference"] = {k: ref[k] for k in (
          "reference", "torch", "threads", "batch_size", "clean_accuracy",
          "robust_accuracy", "per_attack", "seconds", "machine_before", "machine_after",
          "checks", "warnings", "masks")}
      held_ours = (json.loads((d / "ours.json").read_text())
                   if (d / "ours.json").exists() else {})
      if args.reuse_ours and "per_attack" in held_ours:
        print(f"== {name}: reusing {d / 'ours.json'}", flush=True)
        ours = held_ours
      elif args.skip_ours:
        ours = None
      else:
        print(f"== {name}: ours", flush=True)
        try:
          ours = run_ours(d / "model.npz", d, epsilon=args.epsilon, version=args.version,
                          seed=args.seed, compute_dtype=args.ours_compute_dtype)
        except Exception as e:  # keep the reference results of the other models
          ours = {"skipped": f"auto_attack failed: {type(e).__name__}: {e}"}
          print(ours["skipped"], flush=True)
        write_json(d / "ours.json", ours)
      if ours is not None:
        entry["ours"] = ours if "skipped" in ours else {k: ours[k] for k in (
            "clean_accuracy", "robust_accuracy", "compute_dtype", "per_attack", "seconds",
            "machine_before", "machine_after", "checks", "masks")}
        entry["comparison"] = compare(d)
        write_json(d / "comparison.json", entry["comparison"])
    produced[name] = entry
    if summary_path is not None:   # after every model: a long run keeps what it has
      held = (json.loads(summary_path.read_text()).get("models", {})
              if summary_path.exists() else {})   # other runs may have written meanwhile
      summary["models"] = {**held, **produced}
      write_json(summary_path, summary)
  summary["models"].update(produced)
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="stage", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--epsilon", type=float, default=0.3)
  common.add_argument("--version", default="standard")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  common.add_argument("--batch_size", type=int, default=500, help="reference batch size")
  common.add_argument("--ours_compute_dtype", default=None,
                      help="compute_dtype for auto_attack (default: its own default, float32)")
  e = sub.add_parser("export", parents=[common])
  e.add_argument("--model_path", required=True)
  e.add_argument("--npz", required=True)
  e.add_argument("--num_images", type=int, default=1000)
  e.add_argument("--first", type=int, default=0, help="index of the first test image")
  r = sub.add_parser("reference", parents=[common])
  r.add_argument("--npz", required=True)
  r.add_argument("--out_dir", required=True)
  r.add_argument("--port_check_only", action="store_true")
  o = sub.add_parser("ours", parents=[common])
  o.add_argument("--npz", required=True)
  o.add_argument("--out_dir", required=True)
  c = sub.add_parser("compare")
  c.add_argument("--out_dir", required=True)
  a = sub.add_parser("run", parents=[common])
  a.add_argument("--models", required=True, help="name=path,... (SavedModel dirs or .keras)")
  a.add_argument("--attack_models", default=None,
                 help="names to attack (default all); the others get the port check only")
  a.add_argument("--num_images", type=int, default=1000)
  a.add_argument("--first", type=int, default=0, help="index of the first test image")
  a.add_argument("--bench_python", default="/work/bench-venv/bin/python")
  a.add_argument("--out_dir", default="/work/bench-out/aa")
  a.add_argument("--summary", default=None, help="small summary JSON (no per-image data)")
  a.add_argument("--skip_ours", action="store_true")
  a.add_argument("--reuse_reference", action="store_true",
                 help="keep an existing reference.json (e.g. to add ours to a finished reference run)")
  a.add_argument("--reuse_ours", action="store_true",
                 help="keep an existing ours.json with results instead of rerunning ours")
  a.add_argument("--reuse_export", action="store_true",
                 help="keep an existing model.npz (same images and weights) instead of re-exporting")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  if args.stage == "export":
    print(json.dumps(export_model(args.model_path, pathlib.Path(args.npz),
                                  num_images=args.num_images, first=args.first)))
  elif args.stage == "reference":
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run_reference(pathlib.Path(args.npz), out, epsilon=args.epsilon,
                        version=args.version, seed=args.seed, threads=args.threads,
                        batch_size=args.batch_size, attack=not args.port_check_only)
    write_json(out / "reference.json", res)
    print(json.dumps({k: res[k] for k in ("port_check", "robust_accuracy", "seconds")
                      if k in res}))
  elif args.stage == "ours":
    out = pathlib.Path(args.out_dir)
    res = run_ours(pathlib.Path(args.npz), out, epsilon=args.epsilon,
                   version=args.version, seed=args.seed,
                   compute_dtype=args.ours_compute_dtype)
    write_json(out / "ours.json", res)
    print(json.dumps({k: res.get(k) for k in ("robust_accuracy", "seconds", "skipped")}))
  elif args.stage == "compare":
    res = compare(pathlib.Path(args.out_dir))
    write_json(pathlib.Path(args.out_dir) / "comparison.json", res)
    print(json.dumps(res, indent=1))
  else:
    run_all(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
