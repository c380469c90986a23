"""Attack results -> results.json, results.csv, report.md, plots and TensorBoard.

One *row* is one cell of the attack grid: a model attacked by one attack
(targeted or not, at one ε, or ε = None for the minimum-distortion C&W
attacks) under one threat model. Its success rate counts only the ``n`` test
images the model classified correctly before the attack, with a 95% Wilson
interval (``statistics.wilson_interval``).

The report lays the ε-bounded attacks out like the seed paper's table (attacks ×
ε down, models across), one table per threat model, so the flattering
``grey_box`` numbers stand next to the honest ``adaptive`` ones.

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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from keras_defense.util import io_utils
from keras_defense.evaluation import statistics
from keras_defense.reports import tensorboard_writer

# The keys of a row, in the order of the CSV columns.
ROW_KEYS = ("model", "attack", "targeted", "epsilon", "threat_model", "source_model", "loss",
            "n", "successes", "success_rate", "ci_low", "ci_high",
            "mean_l0", "mean_l2", "mean_linf", "seconds")
MODEL_KEYS = ("clean_accuracy", "n_test", "total_weights", "nonzero_weights", "compression",
              "zero_gradient_fraction", "saved_model", "description")

# Display order; names not listed here follow in order of first appearance.
THREAT_MODEL_ORDER = ("grey_box", "transfer", "adaptive")
ATTACK_ORDER = ("fgsm", "bim", "pgd", "cw_l2", "cw_linf", "cw_l0")
ATTACK_NAMES = {"fgsm": "FGSM", "bim": "BIM", "pgd": "PGD", "cw_l2": "C&W L2",
                "cw_linf": "C&W L∞", "cw_l0": "C&W L0"}

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

_PLOT_STYLES = {"grey_box": ("-", "o"), "transfer": ("--", "s"), "adaptive": (":", "^")}
_EXTRA_STYLES = (("-.", "D"), ((0, (1, 3)), "v"), ((0, (5, 1)), "P"))
_MAX_EXAMPLE_IMAGES = 8  # images per example entry in the PNG grid
_MAX_EXAMPLE_ENTRIES = 12  # example entries (model × attack × threat model) in the PNG grid


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


# --------------------------------------------------------------------------- ordering / labels


def _ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
  values = list(dict.fromkeys(values))
  return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


def _variant_fields(rows) -> dict[str, set]:
  """Per threat model, the fields ("loss", "source_model") needed to tell cells apart.

  Normally a threat model fixes both (e.g. adaptive = margin loss on the model
  itself), and labels and tags stay short; only when one grid cell (model,
  attack, targeted, ε) was run with several losses or sources do they say which.
  """
  groups = {}
  for r in rows:
    key = (r["threat_model"], r["model"], r["attack"], bool(r["targeted"]),
           None if r["epsilon"] is None else _eps_key(r["epsilon"]))
    groups.setdefault(key, []).append(r)
  fields = {r["threat_model"]: set() for r in rows}
  for (tm, *_), group in groups.items():
    if len({r["loss"] for r in group}) > 1:
      fields[tm].add("loss")
    if len({r["source_model"] for r in group}) > 1:
      fields[tm].add("source_model")
  return fields


def _variant(row, varying: dict[str, set]) -> tuple[str, ...]:
  """() normally; e.g. ('margin',) or ('margin', 'from m0') when a threat model mixes them."""
  parts = []
  if "loss" in varying.get(row["threat_model"], ()):
    parts.append(row["loss"])
  if "source_model" in varying.get(row["threat_model"], ()):
    parts.append(f"from {row['source_model']}")
  return tuple(parts)


def _variant_label(variant: tuple[str, ...]) -> str:
  return f" ({', '.join(variant)})" if variant else ""


def _variant_tag(variant: tuple[str, ...]) -> str:
  return "".join("_" + part.replace(" ", "_") for part in variant)


def format_epsilon(epsilon: float | None) -> str:
  """0.3 -> '0.3'; 8/255 -> '8/255'; None -> '—'."""
  if epsilon is None:
    return "—"
  eps = float(epsilon)
  if abs(eps - round(eps, 3)) < 1e-9:
    return f"{round(eps, 3):g}"
  k = round(eps * 255)
  if k and abs(eps * 255 - k) < 1e-6:
    return f"{k}/255"
  return f"{eps:.4g}"


def _attack_label(attack: str, targeted: bool, epsilon: float | None = None) -> str:
  label = f"{ATTACK_NAMES.get(attack, attack)} {'targeted' if targeted else 'untargeted'}"
  return label if epsilon is None else f"{label} ε={format_epsilon(epsilon)}"


def _pct(x: float | None, digits: int = 1) -> str:
  return "—" if x is None else f"{100 * float(x):.{digits}f}"


def _cell(row) -> str:
  if row is None:
    return "—"
  if int(row["n"]) == 0:
    return "n/a (0)"
  return (f"{_pct(row['success_rate'])}% [{_pct(row['ci_low'])}–{_pct(row['ci_high'])}] "
          f"({int(row['n'])})")


def _num(x, fmt: str = ".3g") -> str:
  return "—" if x is None else format(float(x), fmt)


# --------------------------------------------------------------------------- Markdown


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in body]
  return lines


def _threat_table(tm: str, rows, model_names, varying) -> list[str]:
  sub = [r for r in rows if r["threat_model"] == tm and r["epsilon"] is not None]
  if not sub:
    return []
  cells = {}
  for r in sub:
    cells[(r["attack"], bool(r["targeted"]), _eps_key(r["epsilon"]), _variant(r, varying),
           r["model"])] = r
  keys = sorted({k[:4] for k in cells},
                key=lambda k: (_ordered([r["attack"] for r in sub], ATTACK_ORDER).index(k[0]),
                               k[1], k[2], k[3]))
  body = []
  for attack, targeted, eps, variant in keys:
    label = _attack_label(attack, targeted, eps)
    label += _variant_label(variant)
    body.append([label] + [_cell(cells.get((attack, targeted, eps, variant, m)))
                           for m in model_names])
  losses = sorted({r["loss"] for r in sub})
  sources = sorted({r["source_model"] for r in sub if r["source_model"] != r["model"]})
  crafted = ("each column's own model" if not sources else
             ", ".join(sources) + (" (own model where a column is its source)"
                                   if any(r["source_model"] == r["model"] for r in sub) else ""))
  lines = [f"### {tm}", "",
           f"Loss: {', '.join(losses)}; examples crafted on: {crafted}.", ""]
  return lines + _md_table(["Attack"] + list(model_names), body) + [""]


def _eps_key(epsilon) -> float:
  return round(float(epsilon), 9)


def _cw_table(rows, model_names, threat_models) -> list[str]:
  sub = [r for r in rows if r["epsilon"] is None]
  if not sub:
    return []
  attacks = _ordered([r["attack"] for r in sub], ATTACK_ORDER)
  sub = sorted(sub, key=lambda r: (attacks.index(r["attack"]), bool(r["targeted"]),
                                   threat_models.index(r["threat_model"]),
                                   list(model_names).index(r["model"]), r["loss"],
                                   r["source_model"]))
  body = [[_attack_label(r["attack"], bool(r["targeted"])), r["threat_model"], r["model"],
           r["loss"], r["source_model"], _cell(r), _num(r["mean_l2"], ".2f"),
           _num(r["mean_linf"], ".3f"), _num(r["mean_l0"], ".1f")] for r in sub]
  return (["## Minimum-distortion attacks (Carlini & Wagner)", "",
           "Success over initially correct images and the mean distortion of the successful "
           "adversarial examples (L2 and L∞ in [0, 1] pixel units, L0 = pixels changed). "
           "Smaller distortion = easier to attack.", ""]
          + _md_table(["Attack", "Threat model", "Model", "Loss", "Crafted on", "Success",
                       "mean L2", "mean L∞", "mean L0"], body) + [""])


def _models_table(models) -> list[str]:
  body = []
  for name, info in models.items():
    acc, n_test = info.get("clean_accuracy"), info.get("n_test")
    acc_cell = "—"
    if acc is not None:
      acc_cell = f"{_pct(acc, 2)}%"
      if n_test:
        lo, hi = statistics.wilson_interval(round(float(acc) * int(n_test)), int(n_test))
        acc_cell += f" [{_pct(lo, 2)}–{_pct(hi, 2)}] ({int(n_test)})"
    weights = "—"
    if info.get("nonzero_weights") is not None and info.get("total_weights") is not None:
      weights = f"{int(info['nonzero_weights']):,} / {int(info['total_weights']):,}"
    compression = _num(info.get("compression"), ".2f")
    compression += "×" if info.get("compression") is not None else ""
    body.append([name, info.get("description") or "—", acc_cell, weights, compression,
                 _pct(info.get("zero_gradient_fraction")) + (
                     "%" if info.get("zero_gradient_fraction") is not None else ""),
                 f"`{info['saved_model']}`" if info.get("saved_model") else "—"])
  return (["## Models", "",
           "Clean accuracy with its 95% Wilson interval and the number of test images; "
           "compression = M0's weights / this model's nonzero weights; zero-gradient fraction = "
           "share of test images whose cross-entropy input gradient is exactly zero (the mark "
           "of gradient masking: FGSM/BIM then add nothing).", ""]
          + _md_table(["Model", "Description", "Clean accuracy", "Nonzero / total weights",
                       "Compression", "Zero-gradient fraction", "SavedModel"], body) + [""])


def dataset_lines(dataset: Mapping[str, Any] | None) -> list[str]:
  """The report header's lines on the data: name, version, split sizes, classes, sources."""
  if not dataset:
    return []
  names = list(dataset.get("class_names") or [])
  classes = ", ".join(str(n) for n in names[:20]) + (", …" if len(names) > 20 else "")
  lines = [f"- Dataset: `{dataset['name']}` (tfds version {dataset.get('version') or '—'}, "
           f"images {'x'.join(str(d) for d in dataset.get('image_shape', []))}): "
           f"train {dataset.get('num_train')} / validation {dataset.get('num_validation')} / "
           f"test {dataset.get('num_test')} examples; {dataset.get('num_classes')} classes "
           f"({classes}); content checked against the source files: "
           f"{dataset.get('content_check') or '—'}"]
  sources = dataset.get("sources") or {}
  if sources:
    lines.append("- Source files (SHA-256): " + "; ".join(
        f"`{n}` {d}" for n, d in sorted(sources.items())))
  return lines


def _pct_ci(k: int, n: int) -> str:
  from keras_defense.evaluation import statistics  # pylint: disable=g-import-not-at-top
  if not n:
    return "—"
  lo, hi = statistics.wilson_interval(int(k), int(n))
  return f"{100 * k / n:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] ({n})"


def autoattack_lines(autoattack: Mapping[str, Any] | None, rows, n_grid: int | None
                     ) -> list[str]:
  """The report's AutoAttack section: robust accuracy per model and ε, per-image worst case.

  Args:
    autoattack: model -> {"autoattack": results.json of ``robustness.run``,
      "sanity": the ε = 1 run's or None, "worst_case": {ε text: {...}}}
      (``experiment.autoattack_summary``).
    rows: the grid's rows (for the grey_box BIM column beside it).
    n_grid: images the FGSM/BIM grid ran on.
  """
  if not autoattack:
    return []
  first = next(iter(autoattack.values()))["autoattack"]
  attacks = list(first["attacks"])
  lines = ["## AutoAttack: robust accuracy, per-image worst case", "",
           f"Robust accuracy = classified correctly and not fooled by any attack run on that "
           f"image (per-image worst case), as `accuracy [95% Wilson interval] (n)`. AutoAttack "
           f"{first['version']} ({first['threat_model']}; {', '.join(attacks)}, each only on "
           f"the images still robust; columns are cumulative) on the first "
           f"{first['n_examples']} test images. *grey_box BIM* is the paper's setting on the "
           f"grid's first {n_grid} images (cross-entropy, untargeted); *worst case over every "
           f"attack* counts an image robust only if AutoAttack and every FGSM/BIM cell of the "
           f"grid at that ε (all threat models, untargeted and targeted) failed on it, on the "
           f"images both ran on. *ε = 1*: the sanity check (any image can become any other, so "
           f"it must be 0%).", ""]
  grey = {(r["model"], r["epsilon"]): r for r in rows
          if r["threat_model"] == "grey_box" and r["attack"] == "bim" and not r["targeted"]}
  header = (["ε", "Model", "Clean"] + [f"after {a}" for a in attacks]
            + ["AutoAttack robust", "grey_box BIM robust", "worst case over every attack"])
  body = []
  eps_all = sorted({e for s in autoattack.values() for e in s["autoattack"]["eps"]})
  for eps in eps_all:
    for name, s in autoattack.items():
      res = s["autoattack"]
      per = next((p for p in res["per_eps"] if p["eps"] == eps), None)
      if per is None:
        continue
      n = int(res["n_examples"])
      steps = {a["attack"]: a for a in per["attacks"]}
      cells = [f"{eps:g}", name, _pct_ci(res["n_clean_correct"], n)]
      cells += [f"{100 * steps[a]['n_robust'] / n:.1f}%" if a in steps else "—" for a in attacks]
      cells.append(f"**{_pct_ci(per['n_robust'], n)}**")
      g = grey.get((name, eps))
      cells.append(_pct_ci(g["n"] - g["successes"], n_grid) if g and n_grid else "—")
      w = s.get("worst_case", {}).get(f"{eps:g}")
      cells.append(_pct_ci(w["n_robust"], w["n"]) if w else "—")
      body.append(cells)
  lines += _md_table(header, body) + [""]
  sanity = [(name, s["sanity"]) for name, s in autoattack.items() if s.get("sanity")]
  if sanity:
    lines.append("Sanity check: " + "; ".join(
        f"{name} at ε={r['per_eps'][0]['eps']:g}: {_pct_ci(r['per_eps'][0]['n_robust'], r['n_examples'])}"
        for name, r in sanity) + ".")
    lines.append("")
  seconds = {name: sum(p["seconds"] for p in s["autoattack"]["per_eps"])
             for name, s in autoattack.items()}
  lines.append("AutoAttack time: " + ", ".join(f"{n} {v:.0f} s" for n, v in seconds.items())
               + ".")
  return lines + [""]


def render_markdown(*, rows, models, warnings, config, versions, wall_seconds=None,
                    command=None, title="MNIST", plots: Mapping[str, str] | None = None,
                    dataset: Mapping[str, Any] | None = None,
                    autoattack: Mapping[str, Any] | None = None) -> str:
  """Builds report.md (see ``write_report``). ``plots`` maps a caption to a relative path."""
  model_names = list(models)
  threat_models = _ordered([r["threat_model"] for r in rows], THREAT_MODEL_ORDER)
  varying = _variant_fields(rows)
  wall = "—"
  if wall_seconds is not None:
    wall = f"{float(wall_seconds):.0f} s ({float(wall_seconds) / 60:.1f} min)"
  lines = [f"# {title}: adversarial attacks on pruning + logits augmentation", "",
           f"- Command: `{command}`" if command else "- Command: —",
           f"- Wall time: {wall}"]
  lines += dataset_lines(dataset)
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
  tables = [line for tm in threat_models for line in _threat_table(tm, rows, model_names, varying)]
  lines += tables or ["No ε-bounded attacks were run.", ""]
  lines += _cw_table(rows, model_names, threat_models)
  lines += autoattack_lines(autoattack, rows, (config or {}).get("eval", {}).get("eval_size"))
  lines += _models_table(models)
  lines += ["## Warnings", ""]
  lines += [f"- {w}" for w in warnings] if warnings else ["none"]
  lines += ["", "## Threat models", ""]
  for tm in threat_models:
    lines.append(f"- **{tm}**: {THREAT_MODEL_DEFINITIONS.get(tm, '(no definition given)')}")
  for tm in THREAT_MODEL_ORDER:
    if tm not in threat_models:
      lines.append(f"- **{tm}** (not run): {THREAT_MODEL_DEFINITIONS[tm]}")
  if plots:
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({path})" for caption, path in plots.items()]
  if config:
    lines += ["", "## Configuration", "", "```json",
              json.dumps(to_jsonable(config, where="config"), indent=2), "```"]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _save_figure(fig: Figure, path: pathlib.Path) -> None:
  FigureCanvasAgg(fig)
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_success_vs_epsilon(rows, model_names: Sequence[str], path: str | os.PathLike, *,
                            title: str = "") -> bool:
  """Plots success rate vs ε, one subplot per attack × targeted, with CI error bars.

  One line per model (color) × threat model (line style and marker), dodged a
  little along x so the error bars at one ε stay apart. Returns
  False (and writes nothing) when no row has an ε.
  """
  sub = [r for r in rows if r["epsilon"] is not None]
  if not sub:
    return False
  varying = _variant_fields(rows)
  attacks = _ordered([r["attack"] for r in sub], ATTACK_ORDER)
  panels = [(a, t) for a in attacks for t in (False, True)
            if any(r["attack"] == a and bool(r["targeted"]) == t for r in sub)]
  ncols = 2 if len(panels) > 1 else 1
  nrows = math.ceil(len(panels) / ncols)
  fig_height = 3.8 * nrows + 0.6
  fig = Figure(figsize=(5.2 * ncols, fig_height))
  axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
  threat_models = _ordered([r["threat_model"] for r in sub], THREAT_MODEL_ORDER)
  colors = {m: f"C{i % 10}" for i, m in enumerate(model_names)}
  eps_all = sorted({float(r["epsilon"]) for r in sub})
  span = (eps_all[-1] - eps_all[0]) or max(eps_all[-1], 1e-3)
  series_keys = sorted({(r["model"], r["threat_model"], _variant(r, varying)) for r in sub},
                       key=lambda k: (threat_models.index(k[1]), list(model_names).index(k[0]),
                                      k[2]))
  # Line style per threat model; a threat model run with several losses/sources
  # (a "variant", see _variant_fields) gets a further style per variant.
  style_keys = list(dict.fromkeys((k[1], k[2]) for k in series_keys))
  extra = iter(_EXTRA_STYLES * len(style_keys))
  styles = {sk: (_PLOT_STYLES[sk[0]] if not sk[1] and sk[0] in _PLOT_STYLES else next(extra))
            for sk in style_keys}
  # Dodge the series a little along x so error bars at the same ε do not overlap.
  dodge = {k: (i - (len(series_keys) - 1) / 2) * span * 0.012 for i, k in enumerate(series_keys)}
  for idx, (attack, targeted) in enumerate(panels):
    ax = axes[idx // ncols][idx % ncols]
    for key in series_keys:
      model, tm, variant = key
      pts = sorted((float(r["epsilon"]), r) for r in sub
                   if (r["model"], r["threat_model"], _variant(r, varying)) == key
                   and r["attack"] == attack and bool(r["targeted"]) == targeted
                   and int(r["n"]) > 0)
      if not pts:
        continue
      x = np.array([e for e, _ in pts]) + dodge[key]
      y = np.array([100 * float(r["success_rate"]) for _, r in pts])
      lo = np.array([100 * float(r["ci_low"]) for _, r in pts])
      hi = np.array([100 * float(r["ci_high"]) for _, r in pts])
      linestyle, marker = styles[(tm, variant)]
      ax.errorbar(x, y, yerr=np.vstack([np.maximum(y - lo, 0), np.maximum(hi - y, 0)]),
                      color=colors[model], linestyle=linestyle, marker=marker, markersize=4.5,
                      linewidth=1.6, capsize=3, elinewidth=1)
    ax.set_title(_attack_label(attack, targeted), fontsize=11)
    ax.set_xticks(eps_all)
    ax.set_xticklabels([format_epsilon(e) for e in eps_all], fontsize=8)
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("ε (L∞, pixels in [0, 1])")
    if idx % ncols == 0:
      ax.set_ylabel("attack success (%)")
  for idx in range(len(panels), nrows * ncols):
    axes[idx // ncols][idx % ncols].set_visible(False)
  fig.suptitle(f"{title}: attack success vs ε (95% Wilson intervals; "
               "color = model, line style = threat model)".lstrip(": "), fontsize=11)
  used_models = [m for m in model_names if any(k[0] == m for k in series_keys)]
  proxies = [Line2D([], [], color=colors[m], linewidth=2.5, label=m) for m in used_models]
  proxies += [Line2D([], [], color="0.25", linestyle=styles[sk][0], marker=styles[sk][1],
                     linewidth=1.6, label=sk[0] + _variant_label(sk[1]))
              for sk in style_keys]
  fig.legend(handles=proxies, loc="lower center", ncol=min(len(proxies), 7), fontsize=9,
             frameon=False, bbox_to_anchor=(0.5, 0.0))
  fig.tight_layout(rect=(0, 0.4 / fig_height, 1, 1 - 0.05 / nrows))
  _save_figure(fig, pathlib.Path(path))
  return True


def _example_label(example) -> str:
  """E.g. 'm2\nadaptive\nFGSM untargeted\nε=0.3' (one fact per line, for the left margin)."""
  attack = ATTACK_NAMES.get(example.get("attack"), example.get("attack"))
  if example.get("targeted") is not None:
    attack += " targeted" if example["targeted"] else " untargeted"
  lines = [str(example.get("model")), str(example.get("threat_model")), attack]
  if example.get("epsilon") is not None:
    lines.append(f"ε={format_epsilon(example['epsilon'])}")
  return "\n".join(lines)


def _validate_examples(examples) -> None:
  for i, ex in enumerate(examples):
    for key in ("model", "attack", "threat_model", "x", "x_adv", "y", "pred_clean", "pred_adv"):
      if key not in ex:
        raise ValueError(f"examples[{i}] is missing key {key!r}.")
    x, x_adv = np.asarray(ex["x"]), np.asarray(ex["x_adv"])
    if x.ndim != 4 or x.shape != x_adv.shape or x.shape[-1] not in (1, 3):
      raise ValueError(f"examples[{i}]: `x` and `x_adv` must both be [k, H, W, C] with C in "
                       f"(1, 3); got {x.shape} and {x_adv.shape}.")
    for key in ("y", "pred_clean", "pred_adv"):
      if np.asarray(ex[key]).shape != (x.shape[0],):
        raise ValueError(f"examples[{i}]: `{key}` must have shape ({x.shape[0]},); got "
                         f"{np.asarray(ex[key]).shape}.")


def plot_adversarial_examples(examples: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                              title: str = "", class_names: Sequence[str] = ()) -> None:
  """Clean vs adversarial images with labels: two image rows per example entry.

  The clean row is titled "y=<label> → <prediction>", the adversarial row
  "→ <prediction>", red when the prediction differs from the true label;
  classes are shown by name when ``class_names`` is given.
  """
  def name(k: int) -> str:
    return str(class_names[k]) if 0 <= k < len(class_names) else str(k)

  examples = list(examples)[:_MAX_EXAMPLE_ENTRIES]
  k = max(min(len(ex["x"]), _MAX_EXAMPLE_IMAGES) for ex in examples)
  # Fixed layout in inches (tight_layout squeezes the tiles around long labels).
  tile, gap, title_h, left, top, entry_gap = 1.1, 0.12, 0.22, 1.75, 0.45, 0.3
  row_h = tile + title_h
  entry_h = 2 * row_h + entry_gap
  width = left + k * (tile + gap) + 0.1
  height = top + len(examples) * entry_h
  fig = Figure(figsize=(width, height))
  for e, ex in enumerate(examples):
    y = np.asarray(ex["y"]).astype(int)
    entry_top = height - top - e * entry_h
    fig.text(0.08 / width, (entry_top - row_h) / height, _example_label(ex), fontsize=9,
             fontweight="bold", va="center", ha="left", linespacing=1.4)
    for r, (key, pred_key) in enumerate((("x", "pred_clean"), ("x_adv", "pred_adv"))):
      images = np.clip(np.asarray(ex[key], np.float32), 0, 1)[:_MAX_EXAMPLE_IMAGES]
      preds = np.asarray(ex[pred_key]).astype(int)
      bottom = entry_top - r * row_h - title_h - tile
      for j, img in enumerate(images):
        ax = fig.add_axes(((left + j * (tile + gap)) / width, bottom / height, tile / width,
                           tile / height))
        ax.set_xticks([])
        ax.set_yticks([])
        if img.shape[-1] == 1:
          ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
          ax.imshow(img, interpolation="nearest")
        wrong = preds[j] != y[j]
        text = f"y={name(y[j])} → {name(preds[j])}" if r == 0 else f"→ {name(preds[j])}"
        ax.set_title(text, fontsize=9, color="red" if wrong else "black", pad=2)
        for spine in ax.spines.values():
          spine.set_edgecolor("red" if wrong else "0.6")
          spine.set_linewidth(1.5 if wrong else 0.8)
        if j == 0:
          ax.set_ylabel("clean" if r == 0 else "adversarial", fontsize=8.5)
  fig.suptitle(f"{title}: clean vs adversarial (y = label → prediction; red = misclassified)"
               .lstrip(": "), fontsize=10, y=1 - 0.12 / height, va="top")
  _save_figure(fig, pathlib.Path(path))


# --------------------------------------------------------------------------- TensorBoard


def _tensorboard_scalars(rows, models) -> list[tuple[str, int, float]]:
  varying = _variant_fields(rows)
  scalars = []
  for r in rows:
    name = f"{r['attack']}_{'targeted' if r['targeted'] else 'untargeted'}"
    name += _variant_tag(_variant(r, varying))
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
  _validate_examples(examples)
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

  plots = {}
  success_plot = run_dir / "plots" / "success_vs_epsilon.png"
  if plot_success_vs_epsilon(rows, list(models), success_plot, title=title):
    paths["plots/success_vs_epsilon.png"] = str(success_plot)
    plots["Attack success vs ε"] = "plots/success_vs_epsilon.png"
  if examples:
    examples_plot = run_dir / "plots" / "adversarial_examples.png"
    plot_adversarial_examples(examples, examples_plot, title=title,
                              class_names=(dataset or {}).get("class_names") or ())
    paths["plots/adversarial_examples.png"] = str(examples_plot)
    plots["Clean vs adversarial examples"] = "plots/adversarial_examples.png"

  markdown = render_markdown(rows=rows, models=models, warnings=results["warnings"],
                             config=results["config"], versions=results["versions"],
                             wall_seconds=wall_seconds, command=command, title=title, plots=plots,
                             dataset=dataset, autoattack=autoattack)
  paths["report.md"] = str(run_dir / "report.md")
  io_utils.write_text(paths["report.md"], markdown)

  paths["tensorboard"] = tensorboard_writer.write_summaries(
      run_dir / "tensorboard" / "report",
      scalars=_tensorboard_scalars(rows, models),
      images=_tensorboard_images(examples),
      pngs=[(f"plots/{pathlib.Path(p).stem}", run_dir / p) for p in plots.values()],
      texts=[("report", markdown)])
  return paths
