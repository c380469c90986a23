"""Attack results -> results.json, results.csv, report.md, plots and TensorBoard.

One *row* is one cell of the attack grid: a model attacked by one attack
(targeted or not, at one ε, or ε = None for the minimum-distortion C&W
attacks) under one threat model. Its success rate counts only the ``n`` test
images the model classified correctly before the attack, with a 95% Wilson
interval (``statistics.wilson_interval``).

The report lays the ε-bounded attacks out like the seed paper's table (attacks ×
ε down, models across), one table per threat model (``tables``), so the
flattering ``grey_box`` numbers stand next to the honest ``adaptive`` ones;
its figures come from ``plots``, its event files from ``tensorboard_writer``.

Example:
  paths = write_report("runs/mnist", rows=rows, models=models, warnings=[],
                       config=config, versions={"tensorflow": tf.__version__})
  results = load_results(paths["results.json"])
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from keras_defense.util import io_utils
from keras_defense.reports import plots
from keras_defense.reports import tables
from keras_defense.reports import tensorboard_writer

# The keys of a row, in the order of the CSV columns.
ROW_KEYS = ("model", "attack", "targeted", "epsilon", "threat_model", "source_model", "loss",
            "n", "successes", "success_rate", "ci_low", "ci_high",
            "mean_l0", "mean_l2", "mean_linf", "seconds")
MODEL_KEYS = ("clean_accuracy", "n_test", "total_weights", "nonzero_weights", "compression",
              "zero_gradient_fraction", "saved_model", "description")

THREAT_MODEL_DEFINITIONS = {
    "grey_box": ("the attacker differentiates the deployed model (M1 or M2 as exported) with the "
                 "standard cross-entropy loss and does not know about the defense. This is the "
                 "paper's setting (the authors' code attacks each stage through its own model)."),
    "transfer": ("adversarial examples are crafted on M0 (the original, undefended model) and "
                 "applied to M1/M2: the attacker knows the original model, not the "
                 "compressed/defended one."),
    "adaptive": ("defense-aware white box: the attacker uses the logit-margin loss (C&W's f6) "
                 "on the deployed model. A margin of logits is not squashed by the softmax, so "
                 "the softmax saturation that logits augmentation relies on cannot mask its "
                 "gradient (Athalye, Carlini & Wagner 2018, \"Obfuscated Gradients Give a False "
                 "Sense of Security\")."),
}


# --------------------------------------------------------------------------- validation


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> None:
  """Checks result rows before anything is written.

  Args:
    rows: a list of row dicts with the keys in ``ROW_KEYS``.

  Raises:
    TypeError: ``rows`` is not a list of dicts.
    ValueError: a row misses a key, has a value of the wrong kind or out of
      range, is inconsistent (success_rate != successes / n, rate outside its
      interval), or repeats another row's grid cell. The message names the row
      index, the row's cell and the key.
  """
  if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
    raise TypeError(f"`rows` must be a list of dicts; got {type(rows).__name__}.")
  seen = {}
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise TypeError(f"rows[{i}] must be a dict; got {type(row).__name__}.")
    where = f"rows[{i}] ({_describe_row(row)})"
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
      raise ValueError(f"{where} is missing key(s) {missing}; every row needs {list(ROW_KEYS)}.")

    def bad(key, expected, where=where, row=row):
      return ValueError(f"{where}: `{key}` must be {expected}; got {row[key]!r}.")

    for key in ("model", "attack", "threat_model", "source_model", "loss"):
      if not isinstance(row[key], str) or not row[key]:
        raise bad(key, "a non-empty string")
    if not isinstance(row["targeted"], (bool, np.bool_)):
      raise bad("targeted", "a bool")
    if row["epsilon"] is not None and not _is_number(row["epsilon"], minimum=0.0):
      raise bad("epsilon", "a finite number >= 0, or None for the C&W attacks")
    for key in ("n", "successes"):
      if not _is_int(row[key]) or row[key] < 0:
        raise bad(key, "an int >= 0")
    n, successes = int(row["n"]), int(row["successes"])
    if successes > n:
      raise ValueError(f"{where}: `successes` ({successes}) must be <= `n` ({n}).")
    for key in ("success_rate", "ci_low", "ci_high"):
      if not _is_number(row[key], minimum=0.0, maximum=1.0):
        raise bad(key, "a number in [0, 1]")
    rate = float(row["success_rate"])
    if n > 0 and abs(rate - successes / n) > 1e-4:
      raise ValueError(f"{where}: `success_rate` ({rate}) must equal successes / n "
                       f"({successes}/{n} = {successes / n:.6f}).")
    if not float(row["ci_low"]) - 1e-9 <= rate <= float(row["ci_high"]) + 1e-9:
      raise ValueError(f"{where}: `success_rate` ({rate}) must lie in its interval "
                       f"[ci_low, ci_high] = [{row['ci_low']}, {row['ci_high']}].")
    for key in ("mean_l0", "mean_l2", "mean_linf"):
      if row[key] is not None and not _is_number(row[key], minimum=0.0):
        raise bad(key, "a finite number >= 0, or None when no attack succeeded")
    if not _is_number(row["seconds"], minimum=0.0):
      raise bad("seconds", "a finite number >= 0")
    key = _cell_key(row)
    if key in seen:
      raise ValueError(f"{where} repeats the grid cell of rows[{seen[key]}]; each (model, attack, "
                       "targeted, epsilon, threat_model, source_model, loss) must appear once.")
    seen[key] = i


def _validate_models(models: Mapping[str, Mapping[str, Any]], rows) -> None:
  if not isinstance(models, Mapping):
    raise TypeError(f"`models` must be a dict of model name -> dict; got {type(models).__name__}.")
  for name, info in models.items():
    if not isinstance(info, Mapping):
      raise TypeError(f"models[{name!r}] must be a dict; got {type(info).__name__}.")
    for key in ("clean_accuracy", "zero_gradient_fraction"):
      value = info.get(key)
      if value is not None and not _is_number(value, minimum=0.0, maximum=1.0):
        raise ValueError(f"models[{name!r}]: `{key}` must be a number in [0, 1] or None; "
                         f"got {value!r}.")
  unknown = sorted({r["model"] for r in rows} - set(models))
  if unknown:
    raise ValueError(f"rows name model(s) {unknown} that are not in `models` "
                     f"({list(models)}); add them to `models`, which also fixes the column order.")


def _validate_warnings(warnings) -> None:
  if isinstance(warnings, str) or not all(isinstance(w, str) for w in warnings):
    raise TypeError(f"`warnings` must be a list of strings; got {warnings!r}.")


def _is_number(value, *, minimum=None, maximum=None) -> bool:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                    np.floating)):
    return False
  value = float(value)
  return (math.isfinite(value) and (minimum is None or value >= minimum)
          and (maximum is None or value <= maximum))


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _cell_key(row) -> tuple:
  eps = None if row["epsilon"] is None else round(float(row["epsilon"]), 9)
  return (row["model"], row["attack"], bool(row["targeted"]), eps, row["threat_model"],
          row["source_model"], row["loss"])


def _describe_row(row) -> str:
  parts = [str(row.get(k)) for k in ("model", "attack", "threat_model") if k in row]
  if "targeted" in row:
    parts.append("targeted" if row["targeted"] else "untargeted")
  if row.get("epsilon") is not None:
    parts.append(f"eps={row['epsilon']}")
  return " ".join(parts) or "empty row"


# --------------------------------------------------------------------------- JSON / CSV


def to_jsonable(obj: Any, *, where: str = "value") -> Any:
  """Converts numpy scalars, tuples and paths to plain JSON types.

  Non-finite floats become None (JSON has no NaN). Arrays are refused: results
  hold numbers, not data.

  Raises:
    TypeError: an array or an object JSON cannot represent.
  """
  if obj is None or isinstance(obj, (str, bool)):
    return obj
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    if not math.isfinite(float(obj)):
      return None
    # float32 0.225 is 0.22499999403953552 as a float64; keep its shortest repr instead.
    return float(repr(float(obj))) if isinstance(obj, float) else float(str(obj))
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v, where=f"{where}[{k!r}]") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, np.ndarray):
    raise TypeError(f"{where} is an array of shape {obj.shape}; results.json holds no arrays "
                    "(pass images in `examples`).")
  raise TypeError(f"{where} has type {type(obj).__name__}, which JSON cannot represent.")


def load_results(path: str | os.PathLike) -> dict:
  """Reads a results.json written by ``write_report`` and validates its rows.

  Args:
    path: the results.json file, or the run directory holding it.

  Returns:
    The dict with keys rows, models, warnings, config, versions, wall_seconds,
    command.

  Raises:
    ValueError: the file lacks the rows/models keys, or a row is invalid.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "results.json"
  results = io_utils.read_json(path)
  if not isinstance(results, dict) or "rows" not in results or "models" not in results:
    raise ValueError(f"{path} is not a keras-defense results.json: expected an object with "
                     "'rows' and 'models'.")
  validate_rows(results["rows"])
  return results


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
  extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ROW_KEYS]
  keys = list(ROW_KEYS) + extra
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
  return out.getvalue()




def render_markdown(*, rows, models, warnings, config, versions, wall_seconds=None,
                    command=None, title="MNIST", plots: Mapping[str, str] | None = None,
                    dataset: Mapping[str, Any] | None = None,
                    autoattack: Mapping[str, Any] | None = None) -> str:
  """Builds report.md (see ``write_report``). ``plots`` maps a caption to a relative path."""
  model_names = list(models)
  threat_models = tables.ordered([r["threat_model"] for r in rows], tables.THREAT_MODEL_ORDER)
  varying = tables.variant_fields(rows)
  wall = "—"
  if wall_seconds is not None:
    wall = f"{float(wall_seconds):.0f} s ({float(wall_seconds) / 60:.1f} min)"
  lines = [f"# {title}: adversarial attacks on pruning + logits augmentation", "",
           f"- Command: `{command}`" if command else "- Command: —",
           f"- Wall time: {wall}"]
  lines += tables.dataset_lines(dataset)
  if versions:
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  lines += ["", "## How to read this", "",
            "Each cell is the attack success rate over the images the model classified "
            "correctly before the attack (untargeted: misclassified afterwards; targeted: the "
            "target class reached), as `success% [95% Wilson interval] (n)`; `—` marks a cell "
            "that was not run (e.g. transfer has no M0 column, its examples come from M0). "
            "The grey_box table is the flattering one: it is the paper's setting, where the "
            "attacker's cross-entropy gradient vanishes on a defended model. The adaptive table "
            "is the honest one: it attacks the same deployed model with a loss the defense "
            "cannot mask. A defense that only looks strong in grey_box masks gradients rather "
            "than removing adversarial examples.", ""]
  lines += ["## Attack success by threat model", ""]
  threat_tables = [line for tm in threat_models
                   for line in tables.threat_table(tm, rows, model_names, varying)]
  lines += threat_tables or ["No ε-bounded attacks were run.", ""]
  lines += tables.cw_table(rows, model_names, threat_models)
  lines += tables.autoattack_lines(autoattack, rows,
                                   (config or {}).get("eval", {}).get("eval_size"))
  lines += tables.models_table(models)
  lines += ["## Warnings", ""]
  lines += [f"- {w}" for w in warnings] if warnings else ["none"]
  lines += ["", "## Threat models", ""]
  for tm in threat_models:
    lines.append(f"- **{tm}**: {THREAT_MODEL_DEFINITIONS.get(tm, '(no definition given)')}")
  for tm in tables.THREAT_MODEL_ORDER:
    if tm not in threat_models:
      lines.append(f"- **{tm}** (not run): {THREAT_MODEL_DEFINITIONS[tm]}")
  if plots:
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({path})" for caption, path in plots.items()]
  if config:
    lines += ["", "## Configuration", "", "```json",
              json.dumps(to_jsonable(config, where="config"), indent=2), "```"]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- TensorBoard


def _tensorboard_scalars(rows, models) -> list[tuple[str, int, float]]:
  varying = tables.variant_fields(rows)
  scalars = []
  for r in rows:
    name = f"{r['attack']}_{'targeted' if r['targeted'] else 'untargeted'}"
    name += tables.variant_tag(tables.row_variant(r, varying))
    step = 0 if r["epsilon"] is None else round(float(r["epsilon"]) * 1000)
    for metric in ("success_rate", "ci_low", "ci_high", "mean_l2", "mean_linf", "mean_l0"):
      if r[metric] is not None and (r["epsilon"] is None or not metric.startswith("mean")):
        scalars.append((f"{metric}/{r['threat_model']}/{r['model']}/{name}", step,
                        float(r[metric])))
  for name, info in models.items():
    for metric in ("clean_accuracy", "compression", "zero_gradient_fraction"):
      if info.get(metric) is not None:
        scalars.append((f"model/{metric}/{name}", 0, float(info[metric])))
  return scalars


def _tensorboard_images(examples) -> list[tuple[str, np.ndarray]]:
  images = []
  for ex in examples:
    tag = f"adversarial_examples/{ex['threat_model']}/{ex['model']}/{ex['attack']}"
    if ex.get("targeted") is not None:
      tag += "_targeted" if ex["targeted"] else "_untargeted"
    if ex.get("epsilon") is not None:
      tag += f"_eps{round(float(ex['epsilon']) * 1000)}"
    # Entries without `targeted` may share a tag; number the repeats so none is hidden.
    repeats = sum(1 for t, _ in images if t == tag or t.startswith(tag + "_#"))
    if repeats:
      tag += f"_#{repeats + 1}"
    # One grid per entry: the clean images on top, their adversarial versions below.
    images.append((tag, tensorboard_writer.image_grid([ex["x"], ex["x_adv"]])))
  return images


# --------------------------------------------------------------------------- entry point


def write_report(run_dir: str | os.PathLike, *, rows: list[dict], models: dict[str, dict],
                 warnings: list[str], config: dict, versions: dict,
                 examples: list[dict] | None = None, wall_seconds: float | None = None,
                 command: str | None = None, title: str = "MNIST",
                 dataset: dict | None = None, autoattack: dict | None = None) -> dict[str, str]:
  """Writes every report artifact of one experiment run into ``run_dir``.

  Artifacts (each written to a temporary path and renamed into place):
  results.json, results.csv, report.md, plots/success_vs_epsilon.png (when a
  row has an ε), plots/adversarial_examples.png (when ``examples`` is given),
  and TensorBoard summaries under ``<run_dir>/tensorboard/report``: scalars
  ``<metric>/<threat_model>/<model>/<attack>_<targeted|untargeted>`` at step
  round(ε·1000) (step 0 for C&W), ``model/<metric>/<model>``, one image grid
  per example entry, the plots as images and report.md as text.

  Args:
    run_dir: the run directory (created if missing).
    rows: result rows, see ``ROW_KEYS`` and ``validate_rows``.
    models: model name -> facts (``MODEL_KEYS``); its order is the column order.
    warnings: gradient-masking warnings to list in the report.
    config: the run's configuration (JSON-able).
    versions: library versions, e.g. {"tensorflow": "2.21.0"}.
    examples: optional image examples: dicts with model, attack, threat_model,
      epsilon, x and x_adv (float32 [k, H, W, C] in [0, 1]), y, pred_clean and
      pred_adv (int [k]); targeted optional.
    wall_seconds: the run's wall time, shown in the report.
    command: the command that made the run, shown in the report.
    title: dataset name for headings ("MNIST", "CIFAR-10").
    dataset: ``data.DatasetInfo.to_dict()`` of the data the run used: the
      report header names it, its version, split sizes and source digests,
      and plots name classes by their names.
    autoattack: ``experiment.autoattack_summary`` (model -> AutoAttack results,
      sanity run, per-image worst case); adds the AutoAttack section and
      ``results.json["autoattack"]``.

  Returns:
    {artifact name: path}, names "results.json", "results.csv", "report.md",
    "plots/success_vs_epsilon.png", "plots/adversarial_examples.png",
    "tensorboard".

  Raises:
    ValueError: invalid rows (see ``validate_rows``), rows naming a model not in
      ``models``, or malformed examples.
    TypeError: wrong container types, or values JSON cannot hold.
  """
  validate_rows(rows)
  _validate_models(models, rows)
  _validate_warnings(warnings)
  examples = list(examples or [])
  plots.validate_examples(examples)
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  rows = [to_jsonable(dict(r), where=f"rows[{i}]") for i, r in enumerate(rows)]
  results = {"rows": rows, "models": to_jsonable(models, where="models"),
             "warnings": list(warnings), "config": to_jsonable(config or {}, where="config"),
             "versions": to_jsonable(versions or {}, where="versions"),
             "wall_seconds": to_jsonable(wall_seconds, where="wall_seconds"), "command": command}
  if dataset is not None:
    results["dataset"] = to_jsonable(dict(dataset), where="dataset")
  if autoattack:
    results["autoattack"] = to_jsonable(dict(autoattack), where="autoattack")
  models = results["models"]
  paths = {}
  paths["results.json"] = str(run_dir / "results.json")
  io_utils.write_json(paths["results.json"], results)
  paths["results.csv"] = str(run_dir / "results.csv")
  io_utils.write_text(paths["results.csv"], _csv_text(rows))

  figures = {}  # caption -> path relative to run_dir
  success_plot = run_dir / "plots" / "success_vs_epsilon.png"
  if plots.plot_success_vs_epsilon(rows, list(models), success_plot, title=title):
    paths["plots/success_vs_epsilon.png"] = str(success_plot)
    figures["Attack success vs ε"] = "plots/success_vs_epsilon.png"
  if examples:
    examples_plot = run_dir / "plots" / "adversarial_examples.png"
    plots.plot_adversarial_examples(examples, examples_plot, title=title,
                                    class_names=(dataset or {}).get("class_names") or ())
    paths["plots/adversarial_examples.png"] = str(examples_plot)
    figures["Clean vs adversarial examples"] = "plots/adversarial_examples.png"

  markdown = render_markdown(rows=rows, models=models, warnings=results["warnings"],
                             config=results["config"], versions=results["versions"],
                             wall_seconds=wall_seconds, command=command, title=title,
                             plots=figures,
                             dataset=dataset, autoattack=autoattack)
  paths["report.md"] = str(run_dir / "report.md")
  io_utils.write_text(paths["report.md"], markdown)

  paths["tensorboard"] = tensorboard_writer.write_summaries(
      run_dir / "tensorboard" / "report",
      scalars=_tensorboard_scalars(rows, models),
      images=_tensorboard_images(examples),
      pngs=[(f"plots/{pathlib.Path(p).stem}", run_dir / p) for p in figures.values()],
      texts=[("report", markdown)])
  return paths
