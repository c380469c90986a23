"""A robustness evaluation's artifacts: results.json, report.md, TensorBoard, the grid.

Written into the run directory, each atomically (``io_utils``): ``results.json``
(``RobustnessResult.to_dict``), ``report.md`` (a table per ε: clean accuracy,
the robust accuracy after each attack with its 95% Wilson interval, the final
per-image worst case, and the command line), ``tensorboard/`` (the robust
accuracy per ε after each attack, and the grid) and
``worst_case_adversarials.png`` (clean vs worst-case adversarial images per ε,
via ``plots.plot_adversarial_examples``).

Example:
  >>> paths = write("runs/eval_m0", result)
  >>> paths["report.md"]
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from keras_defense.evaluation import black_box
from keras_defense.util import io_utils
from keras_defense.reports import plots
from keras_defense.reports import tables
from keras_defense.reports import tensorboard_writer
from keras_defense.evaluation.robustness_result import RobustnessResult

GRID = "worst_case_adversarials.png"
CERTIFY_LABELS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}


def _pct(x: float) -> str:
  return f"{100 * x:.2f}%"


def _ci(ci: Sequence[float]) -> str:
  return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def render_markdown(results: dict) -> str:
  """report.md from the results.json dict."""
  r = results
  kind = {"saved_model": "SavedModel", "keras": "Keras file",
          "tflite": "TFLite flatbuffer on LiteRT"}.get(r["model_kind"], r["model_kind"])
  model = f"`{r['model']}` ({kind}"
  if r.get("signature"):
    model += f", signature `{r['signature']}`"
  if r.get("output_key"):
    model += f", output `{r['output_key']}`"
  model += ")"
  lines = [f"# Robustness evaluation: {r['model']}", "",
           f"- Model: {model}, SHA-256 `{r['model_sha256'][:16]}…`",
           f"- Output: {r['output']}" + (
               " — the model returns probabilities (non-negative rows summing to 1 on "
               "real test images), so the attacks differentiate log(p)."
               if r["output"] != "logits" else ""),
           f"- Data: the first {r['n_examples']} {r['dataset']} test images",
           f"- Threat model: {r['threat_model']}, ε ∈ "
           f"{{{', '.join(tables.format_epsilon(e) for e in r['eps'])}}}",
           *_black_box_lines(r),
           f"- {'Attacks' if 'black_box' in r else 'AutoAttack version `' + r['version'] + '`'}"
           f": {', '.join(r['attacks'])} (in this order, each on the images still robust)",
           f"- Clean accuracy: {_pct(r['clean_acc'])} {_ci(r['clean_acc_ci95'])} "
           f"({r['n_clean_correct']}/{r['n_examples']})",
           f"- Seed {r['seed']}, batch size {r['batch_size']}, compute dtype "
           f"{r['compute_dtype']} (asked: {r['requested_compute_dtype']}); time: "
           f"{r['total_seconds']:.1f} s computing (clean {r['clean_seconds']:.1f} s + "
           f"attacks {r['attack_seconds']:.1f} s)"
           + (f"; every attack batch split across the replicas of --strategy="
              f"{r['strategy']}" if r.get("strategy") else ""),
           *_certified_lines(r),
           "", "Robust accuracy counts an image only if it is classified correctly and "
           "every attack so far failed on it (cumulative, per image); intervals are 95% "
           "Wilson intervals.", ""]
  head = ["ε", "clean", "robust (worst case)", "95% CI", "robust images"]
  summary = [[tables.format_epsilon(p["eps"]), _pct(r["clean_acc"]),
              _pct(p["robust_acc"]), _ci(p["robust_acc_ci95"]),
              f"{p['n_robust']}/{r['n_examples']}"] for p in r["per_eps"]]
  if "certify_methods" in r:
    head += [f"certified ({' ∪ '.join(CERTIFY_LABELS.get(m, m) for m in r['certify_methods'])})",
             "gap (robust − certified)"]
    for row, p in zip(summary, r["per_eps"]):
      if p.get("n_certified") is None:
        row += ["n/a", "—"]
      else:
        row += [f"{_pct(p['certified_acc'])} ({p['n_certified']}/{r['n_examples']})",
                f"{100 * (p['robust_acc'] - p['certified_acc']):.2f} points "
                f"({p['n_robust'] - p['n_certified']} "
                f"image{'' if p['n_robust'] - p['n_certified'] == 1 else 's'})"]
  lines += ["## Summary", ""]
  lines += tables.md_table(head, summary)
  for p in r["per_eps"]:
    rows = [["clean", _pct(r["clean_acc"]), _ci(r["clean_acc_ci95"]),
             str(r["n_clean_correct"]), "—", "—"]]
    if p["broken_at_smaller_eps"]:
      n_left = r["n_clean_correct"] - p["broken_at_smaller_eps"]
      rows.append(["broken at a smaller ε", _pct(n_left / r["n_examples"]), "—",
                   str(n_left), str(p["broken_at_smaller_eps"]), "—"])
    for s in p["attacks"]:
      broken = f"{s['broken']} of {s['attacked']}"
      if s["outside_threat_model"]:
        broken += f" ({s['outside_threat_model']} outside the threat model: not counted)"
      rows.append([f"after {s['attack']}", _pct(s["robust_acc"]), _ci(s["robust_acc_ci95"]),
                   str(s["n_robust"]), broken, f"{s['seconds']:.1f}"])
    rows.append([f"**final (worst case)**", f"**{_pct(p['robust_acc'])}**",
                 _ci(p["robust_acc_ci95"]), str(p["n_robust"]), "—",
                 f"{p['seconds']:.1f}"])
    lines += ["", f"## ε = {tables.format_epsilon(p['eps'])}", ""]
    lines += tables.md_table(["", "robust accuracy", "95% CI", "robust images",
                              "broken by it", "seconds"], rows)
  lines += ["", f"![worst-case adversarials]({GRID})", "",
            "## Reproduce", "", "```", r.get("command") or "(not recorded)", "```", "",
            "## Versions", ""]
  lines += [f"- {k}: {v}" for k, v in r["versions"].items()]
  return "\n".join(lines) + "\n"


def _certified_lines(r: dict) -> list[str]:
  """The report's line on the proven side (certify/), when it was asked for."""
  if "certify_methods" not in r:
    return []
  methods = " and ".join(CERTIFY_LABELS.get(m, m) for m in r["certify_methods"])
  if r.get("certified_reason"):
    return [f"- Certified: n/a — {r['certified_reason']} (randomized smoothing, "
            f"`kd-certify --method=smoothing`, takes any model)"]
  return [f"- Certified: {methods} bounds (keras_defense/certify); an image is certified when "
          f"any proves that no perturbation in the ball changes its prediction, a lower bound "
          f"on robust accuracy. Each row reads certified ≤ robust (the attacks' upper bound) "
          f"≤ clean; the gap is the images neither proven nor broken. A certified image an "
          f"attack broke would have stopped the run (evaluation/certified.py)."]


def _black_box_lines(r: dict) -> list[str]:
  """The report's lines on a black-box evaluation (a model without gradients)."""
  bb = r.get("black_box")
  if not bb:
    return []
  cache = (f" (examples crafted once per image and reused from `{bb['transfer_cache']}`)"
           if bb.get("transfer_cache") else "")
  lines = ["- **Black-box evaluation**: the model runs on the LiteRT interpreter and has no "
           "gradients, so white-box AutoAttack cannot run on it (it would be masked). "
           + (f"Transfer attacks are crafted on the surrogate `{bb['surrogate']}` and judged "
              f"on the interpreter{cache}; " if bb.get("surrogate") else
              "No surrogate was given, so Square alone runs: a weaker evaluation (pass "
              "--surrogate=PATH, the float parent or QAT twin, for the transfer attacks); ")
           + (f"BPDA: APGD-CE and APGD-T on the QAT twin `{bb['qat_twin']}` (forward through "
              f"its fake quantization, backward straight through the rounding: TensorFlow's "
              f"gradient of the fake-quant ops), judged on the interpreter; "
              if bb.get("qat_twin") else "")
           + f"Square queries the interpreter ({bb['square_queries']} queries per image at "
           f"most). The surrogate's own white-box AutoAttack is a separate kd-evaluate run "
           f"of the surrogate."]
  for eps, q in bb.get("queries", {}).items():
    lines.append(f"- Square at ε {eps}: {q['total']:,} queries on {q['images']} images "
                 f"(mean {q['mean']:.0f}, median {q['median']:.0f}, max {q['max']} per image)")
  return lines


def _model_label(path: str | os.PathLike) -> str:
  """A short name: 'mnist_m0/1' for a versioned SavedModel, else the file or folder name."""
  p = pathlib.Path(path)
  return f"{p.parent.name}/{p.name}" if p.name.isdigit() and p.parent.name else p.name


def _examples(result: RobustnessResult) -> list[dict]:
  out = []
  for e in result.epsilons:
    ex = e.examples
    if len(ex["index"]):
      out.append({"model": _model_label(result.config.model),
                  "attack": f"AutoAttack {result.config.version}",
                  "threat_model": result.to_dict()["threat_model"], "epsilon": e.eps,
                  "x": ex["x"], "x_adv": ex["x_adv"], "y": ex["y"],
                  "pred_clean": ex["pred_clean"], "pred_adv": ex["pred_adv"]})
  return out


def write(run_dir: str | os.PathLike, result: RobustnessResult) -> dict[str, str]:
  """Writes results.json, report.md, the grid PNG and TensorBoard; returns their paths."""
  run_dir = pathlib.Path(run_dir)
  results = result.to_dict()
  if result.model_kind == "tflite":
    results["black_box"] = {"surrogate": result.config.surrogate,
                            "qat_twin": black_box.qat_twin_path(result.config),
                            "square_queries": result.config.square_queries,
                            "transfer_cache": result.config.transfer_cache,
                            "queries": black_box.query_summary(str(run_dir))}
  paths = {"results.json": str(run_dir / "results.json"),
           "report.md": str(run_dir / "report.md"),
           "tensorboard": str(run_dir / "tensorboard")}
  examples = _examples(result)
  pngs = []
  if examples:
    paths[GRID] = str(run_dir / GRID)
    plots.plot_adversarial_examples(
        examples, paths[GRID],
        title=f"{result.config.model}: worst-case adversarials ({results['threat_model']})")
    pngs.append(("worst_case_adversarials", paths[GRID]))
  scalars = []
  for p in results["per_eps"]:
    tag = f"robust_accuracy/eps_{tables.format_epsilon(p['eps']).replace('/', '_')}"
    scalars.append((tag, 0, results["clean_acc"]))
    scalars += [(tag, k + 1, s["robust_acc"]) for k, s in enumerate(p["attacks"])]
    scalars.append(("robust_accuracy/final", round(p["eps"] * 1000), p["robust_acc"]))
    if p.get("certified_acc") is not None:
      scalars.append(("certified_accuracy/final", round(p["eps"] * 1000), p["certified_acc"]))
  markdown = render_markdown(results)
  if not examples:
    markdown = markdown.replace(f"![worst-case adversarials]({GRID})",
                                "(no image was broken: no grid)")
  tensorboard_writer.write_summaries(paths["tensorboard"], scalars=scalars, pngs=pngs,
                                     texts=[("report", markdown)])
  io_utils.write_json(paths["results.json"], results)
  io_utils.write_text(paths["report.md"], markdown)
  return paths
