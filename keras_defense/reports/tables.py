"""Markdown tables and the formatting they share: ε, attack labels, percentages, CIs.

The experiment's report (``experiment_report``) lays the ε-bounded attacks out
like the seed paper's table (attacks × ε down, models across), one table per
threat model, then the C&W, AutoAttack and models tables; the robustness report
and the plots use the same labels (``format_epsilon``, ``attack_label``) and
the one table writer (``md_table``).

Example:
  >>> md_table(["ε", "robust"], [[format_epsilon(8 / 255), "41.2%"]])
  ['| ε | robust |', '|---|---|', '| 8/255 | 41.2% |']
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from keras_defense.evaluation import statistics

# Display order; names not listed here follow in order of first appearance.
THREAT_MODEL_ORDER = ("grey_box", "transfer", "adaptive")
ATTACK_ORDER = ("fgsm", "bim", "pgd", "cw_l2", "cw_linf", "cw_l0")
ATTACK_NAMES = {"fgsm": "FGSM", "bim": "BIM", "pgd": "PGD", "cw_l2": "C&W L2",
                "cw_linf": "C&W L∞", "cw_l0": "C&W L0"}


# --------------------------------------------------------------------------- ordering / labels


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
  """The distinct ``values``: those in ``preferred`` in its order, then the rest as met."""
  values = list(dict.fromkeys(values))
  return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


def variant_fields(rows) -> dict[str, set]:
  """Per threat model, the fields ("loss", "source_model") needed to tell cells apart.

  Normally a threat model fixes both (e.g. adaptive = margin loss on the model
  itself), and labels and tags stay short; only when one grid cell (model,
  attack, targeted, ε) was run with several losses or sources do they say which.
  """
  groups = {}
  for r in rows:
    key = (r["threat_model"], r["model"], r["attack"], bool(r["targeted"]),
           None if r["epsilon"] is None else eps_key(r["epsilon"]))
    groups.setdefault(key, []).append(r)
  fields = {r["threat_model"]: set() for r in rows}
  for (tm, *_), group in groups.items():
    if len({r["loss"] for r in group}) > 1:
      fields[tm].add("loss")
    if len({r["source_model"] for r in group}) > 1:
      fields[tm].add("source_model")
  return fields


def row_variant(row, varying: dict[str, set]) -> tuple[str, ...]:
  """() normally; e.g. ('margin',) or ('margin', 'from m0') when a threat model mixes them."""
  parts = []
  if "loss" in varying.get(row["threat_model"], ()):
    parts.append(row["loss"])
  if "source_model" in varying.get(row["threat_model"], ()):
    parts.append(f"from {row['source_model']}")
  return tuple(parts)


def variant_label(variant: tuple[str, ...]) -> str:
  return f" ({', '.join(variant)})" if variant else ""


def variant_tag(variant: tuple[str, ...]) -> str:
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


def attack_label(attack: str, targeted: bool, epsilon: float | None = None) -> str:
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


def md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in body]
  return lines


def threat_table(tm: str, rows, model_names, varying) -> list[str]:
  sub = [r for r in rows if r["threat_model"] == tm and r["epsilon"] is not None]
  if not sub:
    return []
  cells = {}
  for r in sub:
    cells[(r["attack"], bool(r["targeted"]), eps_key(r["epsilon"]), row_variant(r, varying),
           r["model"])] = r
  keys = sorted({k[:4] for k in cells},
                key=lambda k: (ordered([r["attack"] for r in sub], ATTACK_ORDER).index(k[0]),
                               k[1], k[2], k[3]))
  body = []
  for attack, targeted, eps, variant in keys:
    label = attack_label(attack, targeted, eps)
    label += variant_label(variant)
    body.append([label] + [_cell(cells.get((attack, targeted, eps, variant, m)))
                           for m in model_names])
  losses = sorted({r["loss"] for r in sub})
  sources = sorted({r["source_model"] for r in sub if r["source_model"] != r["model"]})
  crafted = ("each column's own model" if not sources else
             ", ".join(sources) + (" (own model where a column is its source)"
                                   if any(r["source_model"] == r["model"] for r in sub) else ""))
  lines = [f"### {tm}", "",
           f"Loss: {', '.join(losses)}; examples crafted on: {crafted}.", ""]
  return lines + md_table(["Attack"] + list(model_names), body) + [""]


def eps_key(epsilon) -> float:
  return round(float(epsilon), 9)


def cw_table(rows, model_names, threat_models) -> list[str]:
  sub = [r for r in rows if r["epsilon"] is None]
  if not sub:
    return []
  attacks = ordered([r["attack"] for r in sub], ATTACK_ORDER)
  sub = sorted(sub, key=lambda r: (attacks.index(r["attack"]), bool(r["targeted"]),
                                   threat_models.index(r["threat_model"]),
                                   list(model_names).index(r["model"]), r["loss"],
                                   r["source_model"]))
  body = [[attack_label(r["attack"], bool(r["targeted"])), r["threat_model"], r["model"],
           r["loss"], r["source_model"], _cell(r), _num(r["mean_l2"], ".2f"),
           _num(r["mean_linf"], ".3f"), _num(r["mean_l0"], ".1f")] for r in sub]
  return (["## Minimum-distortion attacks (Carlini & Wagner)", "",
           "Success over initially correct images and the mean distortion of the successful "
           "adversarial examples (L2 and L∞ in [0, 1] pixel units, L0 = pixels changed). "
           "Smaller distortion = easier to attack.", ""]
          + md_table(["Attack", "Threat model", "Model", "Loss", "Crafted on", "Success",
                       "mean L2", "mean L∞", "mean L0"], body) + [""])


def models_table(models) -> list[str]:
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
          + md_table(["Model", "Description", "Clean accuracy", "Nonzero / total weights",
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
  lines += md_table(header, body) + [""]
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
