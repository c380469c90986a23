"""The deployment table's artifacts: deployment.md, deployment/rows.json and rows.csv.

One row per (parent, variant): bytes raw and gzip, latency, clean accuracy,
top-1 agreement with the float parent, robust accuracy per ε (the artifact's own
evaluation: black-box ensemble for a .tflite, white-box AutoAttack for the float
SavedModel) with 95% Wilson intervals, and the twin's white-box number beside it.

Masking warnings: a .tflite measured more robust than its twin under white-box
attack by more than the intervals allow is flagged (the black-box number is
then an upper bound to read with care: transfer gaps, not robustness, may
explain it), as is a row where Square broke images the transfer attacks could
not (the surrogate's gradients did not lead to the artifact's weaknesses).
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
from typing import Any, Sequence

from keras_defense.evaluation import statistics
from keras_defense.reports import tables
from keras_defense.util import io_utils


def _pct_ci(k: int, n: int) -> str:
  lo, hi = statistics.wilson_interval(k, n)
  return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def warnings(row: dict) -> list[str]:
  """The masking warnings of one row."""
  out = []
  if row["variant"] == "float":
    return out
  for eps, r in row["robust"].items():
    twin = row["twin_robust"].get(eps)
    if twin:
      _, hi_twin = statistics.wilson_interval(twin["robust"], twin["n"])
      lo, _ = statistics.wilson_interval(r["robust"], r["n"])
      if lo > hi_twin:
        out.append(f"{row['parent']} {row['variant']} at ε {eps}: black-box robust "
                   f"{100 * r['robust'] / r['n']:.1f}% above its twin's white-box "
                   f"{100 * twin['robust'] / twin['n']:.1f}% beyond the intervals: an upper "
                   f"bound (transfer gap), not evidence that quantization adds robustness.")
    if "transfer-pgd" in r["per_attack"] and (
        r["per_attack"].get("square", 0) >= max(1, r["robust"] // 10)):
      out.append(f"{row['parent']} {row['variant']} at ε {eps}: Square broke "
                 f"{r['per_attack']['square']} images the transfer attacks left: the "
                 f"surrogate's gradients miss the artifact's weaknesses.")
  return out


def render(rows: Sequence[dict], config: dict) -> str:
  eps = [str(e) if not isinstance(e, str) else e for e in
         [f"{float(e):g}" for e in config["epsilons"]]]
  header = ["parent", "artifact", "runtime", "bytes", "gzip bytes", "latency (ms)",
            f"clean ({config['clean_size']})", "agreement"]
  header += [f"robust ε {e}" for e in eps] + [f"twin white-box ε {e}" for e in eps]
  body = []
  for r in rows:
    cells = [r["parent"], r["variant"], r["runtime"], f"{r['bytes']:,}",
             f"{r['gzip_bytes']:,}", f"{1e3 * r['latency_seconds']:.3f}",
             _pct_ci(r["clean_correct"], r["clean_n"]), f"{100 * r['agreement']:.2f}%"]
    cells += [_pct_ci(r["robust"][e]["robust"], r["robust"][e]["n"]) if e in r["robust"]
              else "—" for e in eps]
    cells += [_pct_ci(r["twin_robust"][e]["robust"], r["twin_robust"][e]["n"])
              if e in r["twin_robust"] else "—" for e in eps]
    body.append(cells)
  twin = (f"version custom ({', '.join(config['twin_attacks'])})" if config["twin_attacks"]
          else f"version {config['twin_version']}")
  lines = ["# What ships: the MNIST deployment table", "",
           f"- Sizes: clean accuracy and agreement on the first {config['clean_size']:,} "
           f"{config['dataset']} test images; robust accuracy on the first "
           f"{config['robust_size']:,} (L-inf, ε ∈ {{{', '.join(eps)}}}); intervals are 95% "
           f"Wilson.",
           "- Robust accuracy of a .tflite: kd-evaluate's **black-box ensemble** on the LiteRT "
           "interpreter (per-image worst case of PGD, APGD-CE and APGD-T transferred from the "
           "float parent; on the QAT rows also BPDA: APGD-CE and APGD-T through the QAT "
           "twin's fake quantization with straight-through gradients; then Square with "
           f"{config['square_queries']:,} queries on the interpreter); of the float "
           f"SavedModel: white-box AutoAttack ({twin}).",
           "- Twin white-box: the float parent's AutoAttack, beside every row; a .tflite "
           "number far above it is flagged.",
           "- Bytes: a .tflite's file, a SavedModel's variables/; gzip: level-9 tar.gz. "
           f"Latency: median of {config['latency_repeats']} single-image calls, 1 thread "
           "(LiteRT; the float row on TensorFlow eager).",
           f"- QAT, robust QAT (PGD) and clustering fine-tune {config['fine_tune_epochs']} "
           f"epoch(s) on {config['train_limit'] or 'all'} training images.", ""]
  lines += tables.md_table(header, body)
  warns = [w for r in rows for w in warnings(r)]
  if warns:
    lines += ["", "## Masking warnings", ""] + [f"- {w}" for w in warns]
  lines += ["", "## Reproduce", "", "```", config.get("command") or "(not recorded)", "```"]
  return "\n".join(lines) + "\n"


def write(report_dir: str | os.PathLike, rows: Sequence[dict], *, config: dict
          ) -> dict[str, str]:
  """Writes deployment.md, deployment/rows.json and deployment/rows.csv; returns their paths."""
  root = pathlib.Path(report_dir)
  paths = {"deployment.md": str(root / "deployment.md"),
           "rows.json": str(root / "deployment" / "rows.json"),
           "rows.csv": str(root / "deployment" / "rows.csv")}
  io_utils.write_json(paths["rows.json"], {"config": config, "rows": list(rows)})
  buf = io.StringIO()
  fields = ["parent", "variant", "runtime", "bytes", "gzip_bytes", "latency_seconds",
            "clean_correct", "clean_n", "agreement"]
  writer = csv.writer(buf)
  eps = [f"{float(e):g}" for e in config["epsilons"]]
  writer.writerow(fields + [f"robust_{e}" for e in eps] + [f"twin_robust_{e}" for e in eps]
                  + ["robust_n"])
  for r in rows:
    writer.writerow([r[f] for f in fields]
                    + [r["robust"].get(e, {}).get("robust", "") for e in eps]
                    + [r["twin_robust"].get(e, {}).get("robust", "") for e in eps]
                    + [next(iter(r["robust"].values()), {}).get("n", "")])
  io_utils.write_text(paths["rows.csv"], buf.getvalue())
  io_utils.write_text(paths["deployment.md"], render(rows, config))
  return paths
