"""A defenses comparison's rows -> defenses.md, defenses.json, defenses.csv, plots, TensorBoard.

Written to ``config.report_path`` (``--report_dir``, default the run directory):
``defenses.md`` there, everything else under ``defenses/`` beside it (so
``reports/mnist`` holds it next to the main report without touching its files):

* ``defenses.md``: one table (clean accuracy, compression, build time,
  grey-box / transfer / adaptive FGSM and BIM success at the largest grid ε,
  certified accuracy (``row["certified"]``, n/a with the reason) and
  AutoAttack robust accuracy with 95% Wilson intervals at every AutoAttack ε,
  the per-image worst case and its gap to the certified), the AutoAttack
  breakdown per row (robust accuracy after each attack), the warnings, the
  settings and the times.
* ``defenses.json``: per row RobustBench's fields (``clean_acc``,
  ``robust_acc``, ``eps``, ``threat_model``, ``n_examples``) per ε, plus the
  whole row record.
* ``defenses.csv``: one line per (row, ε), no timing columns.
* ``defenses/plots/robust_vs_eps.png`` (AutoAttack robust accuracy against ε, one
  curve per row, each row its own colour, marker and line style: ``row_style``)
  and ``plots/clean_vs_robust.png``.
* ``defenses/tensorboard/``: ``defenses/<key>/...`` scalars at step round(100 ε) and
  the report as text.
"""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_defense.util import io_utils
from keras_defense.reports import tensorboard_writer
from keras_defense.evaluation import threat_models as tm

CSV_COLUMNS = ("key", "name", "eps", "threat_model", "n_examples", "clean_acc",
               "autoattack_robust_acc", "autoattack_ci_low", "autoattack_ci_high",
               "robust_acc", "robust_ci_low", "robust_ci_high", "eot_robust_acc",
               "compression_ratio", "zero_gradient_fraction", "certified_acc",
               "certified_n")
CERTIFY_LABELS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}


def certified_at(row: dict, eps: float) -> dict | None:
  """The row's certified entry at ``eps``; None when n/a or not computed."""
  cert = row.get("certified")
  if not cert or cert.get("reason"):
    return None
  for p in cert["per_eps"]:
    if abs(p["eps"] - eps) < 1e-9:
      return p
  return None


def _certified_cell(row: dict, eps: float) -> str:
  cert = row.get("certified")
  if not cert:
    return "—"
  if cert.get("reason"):
    return "n/a"
  p = certified_at(row, eps)
  n = cert["n_examples"]
  return "—" if p is None else f"{_pct(p['certified_acc'])} ({p['n_certified']}/{n})"


def _methods(rows: Sequence[dict]) -> str | None:
  for row in rows:
    if row.get("certified"):
      return " ∪ ".join(CERTIFY_LABELS.get(m, m) for m in row["certified"]["methods"])
  return None


def _pct(v, digits: int = 1) -> str:
  return "—" if v is None else f"{100 * v:.{digits}f}%"


def _ci(ci: Sequence[float]) -> str:
  return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _seconds(s) -> str:
  if s is None:
    return "—"
  return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _grid_rate(row: dict, threat: str, attack: str, eps: float) -> float | None:
  for r in row["grid"]:
    if (r["threat_model"] == threat and r["attack"] == attack and not r["targeted"]
        and r["epsilon"] is not None and abs(r["epsilon"] - eps) < 1e-9):
      return r["success_rate"]
  return None


def robustbench(row: dict) -> list[dict[str, Any]]:
  """The row in RobustBench's fields, one entry per AutoAttack ε."""
  out = []
  for e in row["per_eps"].values():
    cert = certified_at(row, e["eps"])
    out.append({"clean_acc": row["clean_acc"], "robust_acc": e["worst_case_robust_acc"],
                "autoattack_robust_acc": e["autoattack_robust_acc"], "eps": e["eps"],
                "threat_model": row["threat_model"], "n_examples": e["worst_case_n"],
                "autoattack_n_examples": e["n_examples"],
                "certified_acc": None if cert is None else cert["certified_acc"]})
  return out


def csv_text(rows: Sequence[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    for e in row["per_eps"].values():
      eot = e.get("eot_n_robust")
      cert = certified_at(row, e["eps"])
      writer.writerow({
          "key": row["key"], "name": row["name"], "eps": repr(e["eps"]),
          "threat_model": row["threat_model"], "n_examples": e["n_examples"],
          "clean_acc": repr(row["clean_acc"]),
          "autoattack_robust_acc": repr(e["autoattack_robust_acc"]),
          "autoattack_ci_low": repr(e["autoattack_ci95"][0]),
          "autoattack_ci_high": repr(e["autoattack_ci95"][1]),
          "robust_acc": repr(e["worst_case_robust_acc"]),
          "robust_ci_low": repr(e["worst_case_ci95"][0]),
          "robust_ci_high": repr(e["worst_case_ci95"][1]),
          "eot_robust_acc": "" if eot is None else repr(eot / e["n_examples"]),
          "compression_ratio": repr(row["facts"]["compression"]),
          "zero_gradient_fraction": repr(row["facts"]["zero_gradient_fraction"]),
          "certified_acc": "" if cert is None else repr(cert["certified_acc"]),
          "certified_n": "" if cert is None else cert["n_certified"]})
  return buf.getvalue()


# Every row its own look, by row order: 18 colours (tab10, then Dark2's first 8), 7
# markers and 4 line styles; (colour, marker) alone is distinct for the first
# lcm(18, 7) = 126 rows.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a",
           "#66a61e", "#e6ab02", "#a6761d", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def row_style(i: int) -> dict[str, str]:
  """Matplotlib colour, marker and line style of row ``i`` (0-based, in table order)."""
  return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
          "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _save(fig: Figure, path: pathlib.Path) -> None:
  FigureCanvasAgg(fig)
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_robust_vs_eps(rows: Sequence[dict], path: pathlib.Path) -> Figure:
  """Draws (and saves to ``path``) robust accuracy against ε; returns the figure."""
  fig = Figure(figsize=(7.0, 4.6))
  ax = fig.add_subplot(1, 1, 1)
  for i, row in enumerate(rows):
    es = sorted(row["per_eps"].values(), key=lambda e: e["eps"])
    xs = [e["eps"] for e in es]
    ys = [100 * e["worst_case_robust_acc"] for e in es]
    lo = [100 * e["worst_case_ci95"][0] for e in es]
    hi = [100 * e["worst_case_ci95"][1] for e in es]
    (line,) = ax.plot(xs, ys, label=row["name"], **row_style(i))
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
  ax.set_xlabel("L∞ ε")
  ax.set_ylabel("robust accuracy, per-image worst case (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set_title("AutoAttack + FGSM/BIM grid, 95% Wilson bands")
  _save(fig, path)
  return fig


def plot_clean_vs_robust(rows: Sequence[dict], path: pathlib.Path) -> None:
  fig = Figure(figsize=(6.4, 4.6))
  ax = fig.add_subplot(1, 1, 1)
  for i, row in enumerate(rows):
    e = max(row["per_eps"].values(), key=lambda e: e["eps"])
    style = row_style(i)
    ax.scatter([100 * e["worst_case_robust_acc"]], [100 * row["clean_acc"]],
               color=style["color"], marker=style["marker"])
    ax.annotate(row["name"], (100 * e["worst_case_robust_acc"], 100 * row["clean_acc"]),
                fontsize=7, xytext=(4, 2), textcoords="offset points")
  eps = max((max(r["per_eps"].values(), key=lambda e: e["eps"])["eps"] for r in rows),
            default=0)
  ax.set_xlabel(f"robust accuracy at ε = {eps:g} (%)")
  ax.set_ylabel("clean accuracy (%)")
  ax.set_xlim(-3, 103)
  ax.grid(alpha=0.3)
  _save(fig, path)


def markdown(rows: Sequence[dict], missing: Sequence[str], config, plots: Sequence[str]
             ) -> str:
  e = config.eval
  aa_eps = sorted(e.autoattack_eps)
  grid_eps = max(e.epsilons) if e.attacks else None
  lines = ["# Defenses side by side", ""]
  if config.command:
    command = config.command.replace(" --stages=report", "")
    lines += [f"Made by `{command}` (rows are bound to these settings by the run's "
              f"comparison.json and resumable one by one; each row's JSON records the "
              f"invocation that evaluated it).", ""]
  n_aa = rows[0]["per_eps"][f"{aa_eps[0]:g}"]["n_examples"] if rows else None
  lines += [
      f"Dataset `{config.dataset}`; clean accuracy on all {rows[0]['facts']['n_test'] if rows else '?'} "
      f"test images. AutoAttack ({e.autoattack_version}) at L∞ ε "
      f"{', '.join(f'{x:g}' for x in aa_eps)} on the **first {n_aa}** test images; FGSM/BIM "
      f"(BIM-{e.bim_steps}) in three threat models on the first {rows[0]['n_grid'] if rows else '?'}. "
      f"**Robust** = correct and not fooled by any attack run on that image (AutoAttack, "
      f"its EOT version for randomized rows, every FGSM/BIM cell at that ε), with 95% "
      f"Wilson intervals. Compression is relative to the first row.", ""]
  methods = _methods(rows)
  if methods:
    lines += [
        f"**Certified** = proven by {methods} bounds (keras_defense/certify; an image counts "
        f"when any method proves that no L∞ perturbation of that ε changes its prediction) "
        f"on the same first {n_aa} images: a lower bound, so each row reads certified ≤ "
        f"robust ≤ clean; the gap is the images neither proven nor broken. n/a: a randomized "
        f"row, or a model the bounds cannot read (the reasons below the table). A certified "
        f"image an attack broke stops the report with an error.", ""]
  head = ["defense", "clean", "compression", "build time"]
  if grid_eps is not None:
    for threat in e.threat_models:
      for attack in e.attacks:
        head.append(f"{attack.upper()} {threat.replace('_', '-')} success, ε {grid_eps:g}")
  for eps in aa_eps:
    if methods:
      head.append(f"certified ({methods}), ε {eps:g}")
    head.append(f"AutoAttack robust, ε {eps:g}")
  head.append(f"worst case, ε {aa_eps[-1]:g}")
  if methods:
    head.append(f"gap (worst case − certified), ε {aa_eps[-1]:g}")
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["name"], _pct(row["clean_acc"], 2), f"{row['facts']['compression']:.2f}×",
             _seconds(row.get("build_seconds"))]
    if grid_eps is not None:
      for threat in e.threat_models:
        for attack in e.attacks:
          rate = _grid_rate(row, threat, attack, grid_eps)
          cells.append("—" if rate is None and threat == tm.TRANSFER and
                       row["key"] == rows[0]["key"] else _pct(rate))
    for eps in aa_eps:
      p = row["per_eps"][f"{eps:g}"]
      if methods:
        cells.append(_certified_cell(row, eps))
      text = f"{_pct(p['autoattack_robust_acc'])} {_ci(p['autoattack_ci95'])}"
      if p.get("eot_n_robust") is not None:
        text += f" (EOT: {_pct(p['eot_n_robust'] / p['n_examples'])})"
      cells.append(text)
    p = row["per_eps"][f"{aa_eps[-1]:g}"]
    cells.append(f"**{_pct(p['worst_case_robust_acc'])}** {_ci(p['worst_case_ci95'])}")
    if methods:
      cert = certified_at(row, aa_eps[-1])
      cells.append("—" if cert is None else
                   f"{100 * (p['worst_case_robust_acc'] - cert['certified_acc']):.1f} points")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  not_bounded = [f"{r['name']}: {r['certified']['reason']}" for r in rows
                 if r.get("certified") and r["certified"].get("reason")]
  if not_bounded:
    lines += ["Certified n/a — " + "; ".join(not_bounded) + ".", ""]
  if missing:
    lines += [f"Not finished yet: {', '.join(missing)} (rerun the command to resume).", ""]
  lines += ["## How each row was made", ""]
  for row in rows:
    made = "; ".join(
        f"{s['kind']} `{s['source']}`" + (" (built here)" if s["built"] else " (reused)")
        for s in row["steps"])
    lines.append(f"- **{row['name']}**: {made} -> `{row['saved_model']}`"
                 + (" — randomized at inference" if row["randomized"] else ""))
  lines += ["", "## AutoAttack, attack by attack", "",
            "Robust accuracy after each attack (cumulative; each attack runs only on the "
            "images still robust).", ""]
  for row in rows:
    for label, result in (("", row["autoattack"]), (" (EOT, rand)", row.get("autoattack_eot"))):
      if not result:
        continue
      for pe in result["per_eps"]:
        steps = ", ".join(f"{s['attack']} {_pct(s['robust_acc'])}" for s in pe["attacks"])
        lines.append(f"- {row['name']}{label}, ε {pe['eps']:g}: clean "
                     f"{_pct(result['clean_acc'])} -> {steps}")
    if row.get("sanity") and row["sanity"]["per_eps"]:
      s = row["sanity"]["per_eps"][0]
      lines.append(f"- {row['name']}, sanity ε {s['eps']:g} on {row['sanity']['n_examples']} "
                   f"images: robust {_pct(s['robust_acc'])} (must be 0)")
  warnings = [w for row in rows for w in row["warnings"]]
  lines += ["", "## Warnings", ""]
  lines += [f"- {w}" for w in warnings] or ["None fired."]
  lines += ["", "## Time", ""]
  for row in rows:
    lines.append(f"- {row['name']}: build {_seconds(row.get('build_seconds'))} "
                 f"(this run: {_seconds(row['built_here_seconds'])}), evaluation "
                 f"{_seconds(row['evaluation_seconds'])}")
  total = sum(r["built_here_seconds"] + r["evaluation_seconds"] for r in rows)
  lines += [f"- total in the runs that made these rows: {_seconds(total)}", ""]
  if plots:
    lines += ["## Plots", ""] + [f"![{p}](defenses/plots/{p})" for p in plots] + [""]
  return "\n".join(lines)


def write(config, rows: list[dict], missing: list[str]) -> dict[str, str]:
  """Writes the report files under ``config.report_path``; returns their paths."""
  out_dir = config.report_path / "defenses"
  out = {}
  io_utils.write_json(out_dir / "defenses.json", {
      "dataset": config.dataset, "command": config.command, "missing": list(missing),
      "rows": [{"name": r["name"], "key": r["key"], "results": robustbench(r), "record": r}
               for r in rows]})
  out["defenses.json"] = str(out_dir / "defenses.json")
  io_utils.write_text(out_dir / "defenses.csv", csv_text(rows))
  out["defenses.csv"] = str(out_dir / "defenses.csv")
  plots = []
  if rows:
    for name, fn in (("robust_vs_eps.png", plot_robust_vs_eps),
                     ("clean_vs_robust.png", plot_clean_vs_robust)):
      fn(rows, out_dir / "plots" / name)
      plots.append(name)
      out[name] = str(out_dir / "plots" / name)
  text = markdown(rows, missing, config, plots)
  scalars = []
  for row in rows:
    for e in row["per_eps"].values():
      step = round(100 * e["eps"])
      scalars += [(f"defenses/{row['key']}/autoattack_robust_acc", step,
                   e["autoattack_robust_acc"]),
                  (f"defenses/{row['key']}/worst_case_robust_acc", step,
                   e["worst_case_robust_acc"])]
      cert = certified_at(row, e["eps"])
      if cert is not None:
        scalars.append((f"defenses/{row['key']}/certified_acc", step, cert["certified_acc"]))
    scalars.append((f"defenses/{row['key']}/clean_acc", 0, row["clean_acc"]))
  tensorboard_writer.write_summaries(
      out_dir / "tensorboard", scalars=scalars,
      pngs=[(f"plots/{p}", out_dir / "plots" / p) for p in plots],
      texts=[("defenses.md", text)])
  out["tensorboard"] = str(out_dir / "tensorboard")
  io_utils.write_text(config.report_path / "defenses.md", text)
  out["defenses.md"] = str(config.report_path / "defenses.md")
  return out
