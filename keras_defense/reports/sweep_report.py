"""A sweep's points -> sweep.csv, report.md, plots and TensorBoard (HParams + curves).

``sweep.csv`` has one row per finished point, in grid order, with a fixed set
of columns and no timing column, so two runs of the same grid (resumed,
sharded or not) give byte-identical files; the seconds stay in the point
JSONs. Plots (matplotlib Agg): robust accuracy vs compression ratio (one curve
per training method and logits ε, 95% Wilson bands), clean vs robust
accuracy, zero-gradient fraction vs logits ε.

TensorBoard (``<run_dir>/tensorboard``, replaced atomically on every report):

* ``hparams/``: the HParams plugin's experiment (``hparams_config``: the
  grid's Discrete domains and the metrics) and one session per point,
  ``hparams/<key>`` (``hp.hparams`` + one scalar per metric at step 0), so the
  HParams dashboard filters and sorts the points.
* ``curves/<method>_eps<ε>``: ``sweep/robust_acc_vs_compression`` at step
  round(100 x compression ratio), with its Wilson bounds; ``curves/<method>_<sparsity>``:
  ``sweep/zero_gradient_fraction_vs_logits_eps`` at step = the ε's index in the grid.

A grid with quantized points (``SweepConfig.quantized``) adds a ``quantization``
column after the coordinates and ``bytes``, ``gzip_bytes`` (a SavedModel's
``variables/``, a .tflite's file) and ``agreement`` (a .tflite's top-1 agreement
with its float point) at the end, an HParam ``quantization`` and a curve per
quantization; a quantized point's robust accuracy is the black-box ensemble's
(``pipelines.sweep_quantization``), its zero-gradient fraction and FGSM/BIM
success rates are empty. Without quantized points every file is what it was
before the quantization dimension existed.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_defense.util import io_utils
from keras_defense.evaluation import sweep_grid
from keras_defense.util.compat import tf

COORDINATES = ("key", "method", "dense_sparsity", "conv_sparsity", "logits_epsilon", "seed")
METRICS = ("eps", "threat_model", "n_examples", "clean_acc", "robust_acc", "robust_ci_low",
           "robust_ci_high", "autoattack_robust_acc", "nonzero_params", "total_params",
           "compression_ratio", "zero_gradient_fraction")
QUANTIZED_METRICS = ("bytes", "gzip_bytes", "agreement")  # only in a quantized grid


def quantization(point: dict) -> str:
  """A point's quantization ("none" for points written before the dimension existed)."""
  return point.get("quantization", sweep_grid.NO_QUANTIZATION)


def _label(method: str, eps: float, q: str) -> str:
  return f"{method}, logits ε={eps:g}" + ("" if q == sweep_grid.NO_QUANTIZATION else f", {q}")


def columns(config: sweep_grid.SweepConfig) -> list[str]:
  """sweep.csv's columns, in order."""
  if not config.quantized:
    return [*COORDINATES, *METRICS, *sweep_grid.success_columns(config)]
  return [*COORDINATES, "quantization", *METRICS, *sweep_grid.success_columns(config),
          *QUANTIZED_METRICS]


def row(point: dict, config: sweep_grid.SweepConfig) -> dict[str, Any]:
  """A point's CSV row (no timing)."""
  aa = point.get("autoattack") or {}
  out = {k: point[k] for k in COORDINATES}
  if config.quantized:
    out["quantization"] = quantization(point)
  out.update({k: point[k] for k in ("eps", "threat_model", "n_examples", "clean_acc",
                                     "robust_acc", "nonzero_params", "total_params",
                                     "compression_ratio", "zero_gradient_fraction")})
  out["robust_ci_low"], out["robust_ci_high"] = point["robust_ci95"]
  out["autoattack_robust_acc"] = aa.get("robust_acc")
  for col in sweep_grid.success_columns(config):
    out[col] = (point["success"].get(col) or {}).get("success_rate")
  if config.quantized:
    out.update({k: point.get(k) for k in QUANTIZED_METRICS})
  return out


def csv_text(points: Sequence[dict], config: sweep_grid.SweepConfig) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns(config), lineterminator="\n")
  writer.writeheader()
  for p in points:
    writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v)
                     for k, v in row(p, config).items()})
  return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _save(fig: Figure, path: pathlib.Path) -> None:
  FigureCanvasAgg(fig)
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _series(points, by: Sequence[str]) -> dict[tuple, list[dict]]:
  out: dict[tuple, list[dict]] = {}
  for p in points:
    out.setdefault(tuple(quantization(p) if k == "quantization" else p[k] for k in by),
                   []).append(p)
  return out


def plot_robust_vs_compression(points, path: pathlib.Path) -> None:
  fig = Figure(figsize=(6.4, 4.4))
  ax = fig.subplots()
  for i, ((method, eps, q), pts) in enumerate(
      _series(points, ("method", "logits_epsilon", "quantization")).items()):
    pts = sorted(pts, key=lambda p: p["compression_ratio"])
    x = np.array([p["compression_ratio"] for p in pts])
    y = np.array([100 * p["robust_acc"] for p in pts])
    lo = np.array([100 * p["robust_ci95"][0] for p in pts])
    hi = np.array([100 * p["robust_ci95"][1] for p in pts])
    color = f"C{i % 10}"
    ax.plot(x, y, marker="o", color=color, label=_label(method, eps, q))
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
  ax.set_xscale("log")
  ratios = sorted({round(p["compression_ratio"], 2) for p in points})
  ax.set_xticks(ratios, [f"{r:g}x" for r in ratios], fontsize=8)
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel("compression ratio (all weights of M0 / nonzero weights)")
  ax.set_ylabel("robust accuracy (%)")
  ax.set_ylim(-3, 103)
  ax.grid(True, alpha=0.3)
  eps = points[0]["eps"]
  ax.set_title(f"robust accuracy vs compression at L∞ ε={eps:g} (95% Wilson bands)", fontsize=10)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_clean_vs_robust(points, path: pathlib.Path) -> None:
  fig = Figure(figsize=(6.0, 4.4))
  ax = fig.subplots()
  markers = "osD^vP*X"
  for i, ((method, eps, q), pts) in enumerate(
      _series(points, ("method", "logits_epsilon", "quantization")).items()):
    x = np.array([100 * p["clean_acc"] for p in pts])
    y = np.array([100 * p["robust_acc"] for p in pts])
    err = np.array([[y[j] - 100 * p["robust_ci95"][0], 100 * p["robust_ci95"][1] - y[j]]
                    for j, p in enumerate(pts)]).T
    ax.errorbar(x, y, yerr=np.maximum(err, 0), fmt=markers[i % len(markers)],
                color=f"C{i % 10}", capsize=3, label=_label(method, eps, q))
  ax.set_xlabel("clean accuracy (%)")
  ax.set_ylabel("robust accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.set_title("clean vs robust accuracy (each point: one sparsity)", fontsize=10)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_zero_gradient(points, path: pathlib.Path) -> None:
  fig = Figure(figsize=(6.0, 4.4))
  ax = fig.subplots()
  for i, ((method, d, c), pts) in enumerate(_series(
      [p for p in points if p.get("zero_gradient_fraction") is not None],  # not a .tflite
      ("method", "dense_sparsity", "conv_sparsity")).items()):
    pts = sorted(pts, key=lambda p: p["logits_epsilon"])
    ax.plot([p["logits_epsilon"] for p in pts], [p["zero_gradient_fraction"] for p in pts],
            marker="o", color=f"C{i % 10}", label=f"{method}, sparsity {d:g}:{c:g}")
  ax.set_xscale("symlog", linthresh=1.0)
  ax.set_xlabel("logits-augmentation ε (symlog)")
  ax.set_ylabel("fraction of images with an all-zero input gradient")
  ax.set_ylim(-0.03, 1.03)
  ax.grid(True, alpha=0.3)
  ax.set_title("gradient masking: zero cross-entropy gradients vs logits ε", fontsize=10)
  ax.legend(fontsize=8)
  _save(fig, path)


# ----------------------------------------------------------------------- TensorBoard


def hparams_metrics(config: sweep_grid.SweepConfig) -> list[str]:
  """The scalar tags of every HParams session (the dashboard's metric columns)."""
  out = ["clean_acc", "robust_acc", "compression_ratio", "nonzero_params",
         "zero_gradient_fraction", *sweep_grid.success_columns(config), "seconds"]
  if config.eval.autoattack_version != "none":
    out.insert(2, "autoattack_robust_acc")
  if config.quantized:
    out[-1:-1] = QUANTIZED_METRICS
  return out


def _metric_values(point: dict, config: sweep_grid.SweepConfig) -> dict[str, float]:
  r = row(point, config)
  values = {k: r.get(k) for k in hparams_metrics(config)}
  values["seconds"] = point.get("seconds")
  return {k: float(v) for k, v in values.items() if v is not None}


def write_tensorboard(logdir: pathlib.Path, points, config: sweep_grid.SweepConfig) -> None:
  """The HParams experiment, one session per point, and the curves (see the module doc)."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  hparams = {
      "method": hp.HParam("method", hp.Discrete(list(config.methods))),
      "dense_sparsity": hp.HParam("dense_sparsity", hp.Discrete(
          sorted({float(d) for d, _ in config.sparsities}))),
      "conv_sparsity": hp.HParam("conv_sparsity", hp.Discrete(
          sorted({float(c) for _, c in config.sparsities}))),
      "logits_epsilon": hp.HParam("logits_epsilon", hp.Discrete(
          sorted(float(e) for e in config.logits_epsilons))),
      "seed": hp.HParam("seed", hp.Discrete([int(config.seed)])),
  }
  if config.quantized:
    hparams["quantization"] = hp.HParam("quantization", hp.Discrete(list(config.quantization)))
  with io_utils.atomic_path(logdir, directory=True) as tmp:
    root = pathlib.Path(tmp)

    def write(sub: str, fn):
      writer = tf.summary.create_file_writer(str(root / sub))
      try:
        with writer.as_default():
          fn()
        writer.flush()
      finally:
        writer.close()

    write("hparams", lambda: hp.hparams_config(
        hparams=list(hparams.values()),
        metrics=[hp.Metric(m, display_name=m) for m in hparams_metrics(config)]))
    for p in points:
      def session(p=p):
        hp.hparams({hparams[k]: quantization(p) if k == "quantization" else p[k]
                    for k in hparams}, trial_id=p["key"])
        for tag, value in _metric_values(p, config).items():
          tf.summary.scalar(tag, value, step=0)
      write(f"hparams/{p['key']}", session)
    for (method, eps, q), pts in _series(points, ("method", "logits_epsilon",
                                                  "quantization")).items():
      def curve(pts=pts):
        for p in pts:
          step = int(round(100 * p["compression_ratio"]))
          tf.summary.scalar("sweep/robust_acc_vs_compression", p["robust_acc"], step=step,
                            description="step = round(100 x compression ratio)")
          tf.summary.scalar("sweep/robust_acc_vs_compression_ci_low", p["robust_ci95"][0],
                            step=step)
          tf.summary.scalar("sweep/robust_acc_vs_compression_ci_high", p["robust_ci95"][1],
                            step=step)
          tf.summary.scalar("sweep/clean_acc_vs_compression", p["clean_acc"], step=step)
      write(f"curves/{method}_eps{eps:g}"
            + ("" if q == sweep_grid.NO_QUANTIZATION else f"_{q}"), curve)
    eps_index = {float(e): i for i, e in enumerate(sorted(config.logits_epsilons))}
    for (method, d, c), pts in _series(
        [p for p in points if p.get("zero_gradient_fraction") is not None],
        ("method", "dense_sparsity", "conv_sparsity")).items():
      def zero(pts=pts):
        for p in pts:
          tf.summary.scalar("sweep/zero_gradient_fraction_vs_logits_eps",
                            p["zero_gradient_fraction"],
                            step=eps_index[float(p["logits_epsilon"])],
                            description="step = index of the logits ε in the sorted grid")
      write(f"curves/{method}_d{d:g}_c{c:g}", zero)


# ------------------------------------------------------------------------- markdown


def _pct(v) -> str:
  return "—" if v is None else f"{100 * v:.1f}%"


def markdown(points, missing, config: sweep_grid.SweepConfig, plots: Sequence[str]) -> str:
  e = config.eval
  total = len(config.points())
  lines = [f"# Robustness vs compression sweep: {config.dataset}", "",
           f"{len(points)} of {total} points finished.", ""]
  if missing:
    lines += [f"**Missing points ({len(missing)})**: " + ", ".join(f"`{k}`" for k in missing),
              "", "Run `kd-sweep` again with the same flags (or the missing shards) to "
              "finish them; `--stages=report` re-renders this page.", ""]
  lines += [
      "## Grid", "",
      f"- training methods: {', '.join(config.methods)}",
      "- Dense:Conv sparsity pairs: " + ", ".join(f"{d:g}:{c:g}" for d, c in config.sparsities)
      + " (0:0 is M0 itself, not fine-tuned)",
      "- logits-augmentation ε: " + ", ".join(f"{x:g}" for x in config.logits_epsilons)
      + " (0: no augmentation)",
      *([f"- quantization: {', '.join(config.quantization)} (none: the float SavedModel"
         + (f"; qat_int8 fine-tunes {config.quantize_epochs} epoch(s) under fake quantization"
            if "qat_int8" in config.quantization else "") + ")"]
        if config.quantized else []),
      f"- seed {config.seed}; attack ε = {config.epsilon:g} (L∞); attacks "
      f"{', '.join(e.attacks)} ({', '.join('targeted' if t else 'untargeted' for t in e.targeted_modes)}), "
      f"BIM {e.bim_steps} steps; {e.eval_size or 'all'} test images"
      + (f"; AutoAttack {e.autoattack_version} on {e.autoattack_size or 'all'} images"
         if e.autoattack_version != "none" else "; AutoAttack off"),
      "",
      "Robust accuracy is the per-image worst case at ε over every FGSM/BIM cell "
      "(grey-box, transfer from the method's M0, adaptive margin loss)"
      + (" and AutoAttack" if e.autoattack_version != "none" else "")
      + ", with a 95% Wilson interval; success rates count only images the model "
      "classified correctly. Compression = all weights of M0 / nonzero weights.", "",
      *([f"A quantized point is its float point's model converted to a .tflite "
         f"(kd-quantize's library) and run on the LiteRT interpreter, which has no "
         f"gradients: its robust accuracy is the per-image worst case of kd-evaluate's "
         f"black-box ensemble on the same images (PGD, APGD-CE and APGD-T transferred from "
         f"the float point; for qat_int8 also BPDA: APGD-CE and APGD-T through the QAT "
         f"twin's fake quantization with straight-through gradients; then Square with "
         f"{config.square_queries:,} queries on the interpreter), not the white-box grid "
         f"above. Bytes: a SavedModel's variables/, a .tflite's file; gzip: level 9; "
         f"agreement: top-1 with the float point on the test images.", ""]
        if config.quantized else []),
      "## Points", ""]
  succ = sweep_grid.success_columns(config)
  header = ["method", "sparsity d:c", "logits ε",
            *(["quantization"] if config.quantized else []), "clean", "robust [95% CI]"]
  if e.autoattack_version != "none":
    header.append("AutoAttack")
  header += ["compression", "zero-grad", *[c.replace("_success", "") for c in succ]]
  if config.quantized:
    header += ["bytes", "gzip bytes", "agreement"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for p in points:
    r = row(p, config)
    cells = [p["method"], f"{p['dense_sparsity']:g}:{p['conv_sparsity']:g}",
             f"{p['logits_epsilon']:g}", *([quantization(p)] if config.quantized else []),
             _pct(p["clean_acc"]),
             f"{_pct(p['robust_acc'])} [{_pct(r['robust_ci_low'])}, {_pct(r['robust_ci_high'])}]"]
    if e.autoattack_version != "none":
      cells.append(_pct(r["autoattack_robust_acc"]))
    zero = p["zero_gradient_fraction"]
    cells += [f"{p['compression_ratio']:.2f}x", "—" if zero is None else f"{zero:.3f}",
              *[_pct(r[c]) for c in succ]]
    if config.quantized:
      cells += ["—" if r[k] is None else f"{r[k]:,}" for k in ("bytes", "gzip_bytes")]
      cells.append(_pct(r["agreement"]) if quantization(p) != sweep_grid.NO_QUANTIZATION
                   else "—")
    lines.append("| " + " | ".join(cells) + " |")
  lines += [""]
  for name in plots:
    lines += [f"![{name}](plots/{name})", ""]
  lines += ["## Files", "",
            "- `sweep.csv`: one row per finished point (no timing columns)",
            "- `points/<key>.json`: each point (RobustBench fields, success rates with "
            "Wilson intervals, AutoAttack, seconds)",
            "- `tensorboard/`: `tensorboard --logdir " + "tensorboard` → HParams (one session "
            "per point) and Scalars (`sweep/*` curves)", "",
            *time_lines(points, config),
            "## Settings", "", "```json", json.dumps(config.identity(), indent=2), "```", ""]
  return "\n".join(lines)


def time_lines(points, config: sweep_grid.SweepConfig) -> list[str]:
  """The compute time the run directory records: parents built, points evaluated.

  Summed over whichever processes did the work (shards add up, they do not
  overlap here), so with one process it is the run's wall time less start-up.
  """
  parents = []
  for done in sorted(pathlib.Path(config.run_dir).glob("parents/*/done.json")):
    record = io_utils.read_json(done)
    if isinstance(record.get("seconds"), (int, float)):
      parents.append((done.parent.name, float(record["seconds"])))
  point_seconds = [float(p["seconds"]) for p in points
                   if isinstance(p.get("seconds"), (int, float))]
  parent_total = sum(s for _, s in parents)
  lines = ["## Time", "",
           f"{(parent_total + sum(point_seconds)) / 60:.1f} min of compute in all: "
           f"{len(parents)} parent models built in {parent_total / 60:.1f} min"
           + (" (" + ", ".join(f"`{k}` {s:.0f} s" for k, s in parents) + ")" if parents else "")
           + f"; {len(point_seconds)} points evaluated in {sum(point_seconds) / 60:.1f} min"
           + (f" ({min(point_seconds):.0f}-{max(point_seconds):.0f} s each)"
              if point_seconds else "") + ".", ""]
  return lines


def write(config: sweep_grid.SweepConfig, points: list[dict], missing: list[str]
          ) -> dict[str, str]:
  """Writes sweep.csv, report.md, plots/ and tensorboard/; returns their paths."""
  run_dir = pathlib.Path(config.run_dir)
  out = {"sweep.csv": str(run_dir / "sweep.csv"), "report.md": str(run_dir / "report.md")}
  io_utils.write_text(run_dir / "sweep.csv", csv_text(points, config))
  plots = []
  if points:
    for name, fn in (("robust_vs_compression.png", plot_robust_vs_compression),
                     ("clean_vs_robust.png", plot_clean_vs_robust),
                     ("zero_gradient_vs_logits_eps.png", plot_zero_gradient)):
      if fn is plot_zero_gradient and all(p.get("zero_gradient_fraction") is None
                                          for p in points):
        continue  # only quantized points: no gradients to measure
      fn(points, run_dir / "plots" / name)
      plots.append(name)
      out[name] = str(run_dir / "plots" / name)
  write_tensorboard(run_dir / "tensorboard", points, config)
  out["tensorboard"] = str(run_dir / "tensorboard")
  io_utils.write_text(run_dir / "report.md", markdown(points, missing, config, plots))
  return out
