"""How much a pruned model kept, and what that saves: the compression report.

``sparsity_report`` counts a model's kernel and bias weights and their
nonzeros per layer and per layer type (looking through tfmot's wrappers);
``gzipped_size`` is a SavedModel's gzip'd size, reproducibly;
``CompressionReport`` sets M0 beside M1 (weights, kept fractions, sizes,
accuracies) and writes ``<prefix>.json`` and ``<prefix>.md``.

"Kept fraction" is nonzero/total of the *kernels* (biases are not pruned); the
compression ratio counts all weights (kernels and biases) on both sides.

Example:
  >>> report = CompressionReport(base=sparsity_report(m0), pruned=sparsity_report(m1))
  >>> print(report.to_markdown())
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from keras_defense.defenses import magnitude_pruning
from keras_defense.util import io_utils
from keras_defense.util.gzip_size import gzipped_bytes as gzipped_size  # noqa: F401  (pruning's name)
from keras_defense.util.compat import keras


def sparsity_report(model: keras.Model) -> dict[str, Any]:
  """Per-layer and overall kept (nonzero) fraction of a model's weights.

  Args:
    model: a (stripped) tf_keras model; wrappers are looked through.

  Returns:
    ``{"layers": [{"name", "type", "kernel_total", "kernel_nonzero",
    "kept_fraction", "bias_total", "bias_nonzero"}...], "by_type": {"Dense":
    {...}, "Conv2D": {...}}, "kernel_total", "kernel_nonzero",
    "kept_fraction", "weights_total", "weights_nonzero"}``. ``kept_fraction``
    is nonzero/total over kernels only; ``weights_*`` count kernels and biases
    of the prunable layers; ``model_weights_*`` count every weight of the
    model (BatchNormalization's and other unpruned layers' too);
    ``left_unpruned``: the layers with weights that are not pruned
    (``magnitude_pruning.left_unpruned``). A "kernel" is the weights tfmot
    prunes (``prunable_weight_names``: SeparableConv2D's pointwise kernel).
  """
  layers, by_type = [], {}
  model_total = model_nonzero = 0  # every weight of the model (BatchNorm's too)
  for layer in model.layers:
    inner = layer.layer if isinstance(layer, magnitude_pruning.WRAPPER_TYPE) else layer
    names = magnitude_pruning.prunable_weight_names(inner)
    masks = {}
    if isinstance(layer, magnitude_pruning.WRAPPER_TYPE):  # what the stripped weights would hold
      masks = {id(w): keras.backend.get_value(m) for w, m, _ in layer.pruning_vars}
    for w in inner.weights:
      value = keras.backend.get_value(w) * masks.get(id(w), 1)
      model_total += int(value.size)
      model_nonzero += int(np.count_nonzero(value))
    if not names:
      continue
    kernel = np.concatenate([
        (keras.backend.get_value(getattr(inner, n)) * masks.get(id(getattr(inner, n)), 1)
         ).ravel() for n in names])
    has_bias = getattr(inner, "use_bias", False) and getattr(inner, "bias", None) is not None
    bias = keras.backend.get_value(inner.bias) if has_bias else np.zeros([0])
    kind = ("Conv2D" if isinstance(inner, keras.layers.Conv2D) else
            "Dense" if isinstance(inner, keras.layers.Dense) else type(inner).__name__)
    row = {"name": inner.name, "type": kind,
           "kernel_total": int(kernel.size),
           "kernel_nonzero": int(np.count_nonzero(kernel)),
           "bias_total": int(bias.size), "bias_nonzero": int(np.count_nonzero(bias))}
    row["kept_fraction"] = row["kernel_nonzero"] / max(row["kernel_total"], 1)
    layers.append(row)
    agg = by_type.setdefault(kind, {"kernel_total": 0, "kernel_nonzero": 0})
    agg["kernel_total"] += row["kernel_total"]
    agg["kernel_nonzero"] += row["kernel_nonzero"]
  for agg in by_type.values():
    agg["kept_fraction"] = agg["kernel_nonzero"] / max(agg["kernel_total"], 1)
  kt = sum(r["kernel_total"] for r in layers)
  kn = sum(r["kernel_nonzero"] for r in layers)
  return {
      "layers": layers, "by_type": by_type,
      "kernel_total": kt, "kernel_nonzero": kn, "kept_fraction": kn / max(kt, 1),
      "weights_total": kt + sum(r["bias_total"] for r in layers),
      "weights_nonzero": kn + sum(r["bias_nonzero"] for r in layers),
      "model_weights_total": model_total, "model_weights_nonzero": model_nonzero,
      "left_unpruned": magnitude_pruning.left_unpruned(model),
  }


@dataclasses.dataclass
class CompressionReport:
  """M0 vs M1: weights, kept fractions, gzip'd sizes and accuracies."""
  base: dict[str, Any]  # sparsity_report(M0)
  pruned: dict[str, Any]  # sparsity_report(M1)
  base_accuracy: float | None = None
  pruned_accuracy: float | None = None
  test_examples: int | None = None
  base_gzip_bytes: int | None = None
  pruned_gzip_bytes: int | None = None
  base_model_path: str | None = None
  pruned_model_path: str | None = None
  recipe: dict[str, Any] | None = None

  @property
  def compression_ratio(self) -> float:
    """M0 weights (kernels + biases) / M1 nonzero weights (kernels + biases)."""
    return self.base["weights_total"] / max(self.pruned["weights_nonzero"], 1)

  @property
  def kernel_compression_ratio(self) -> float:
    """M0 kernel weights / M1 nonzero kernel weights."""
    return self.base["kernel_total"] / max(self.pruned["kernel_nonzero"], 1)

  @property
  def model_compression_ratio(self) -> float | None:
    """All M0 weights / all nonzero M1 weights (unpruned layers too); None if not counted."""
    if "model_weights_total" not in self.base or "model_weights_nonzero" not in self.pruned:
      return None  # a report written before whole-model counts
    return self.base["model_weights_total"] / max(self.pruned["model_weights_nonzero"], 1)

  def to_dict(self) -> dict[str, Any]:
    return {
        "compression_ratio": self.compression_ratio,
        "compression_ratio_definition":
            "M0 weights (kernels + biases) / M1 nonzero weights (kernels + biases)",
        "kernel_compression_ratio": self.kernel_compression_ratio,
        "model_compression_ratio": self.model_compression_ratio,
        "kept_fraction_definition": "nonzero / total kernel weights (biases are not pruned)",
        "base_accuracy": self.base_accuracy, "pruned_accuracy": self.pruned_accuracy,
        "test_examples": self.test_examples,
        "base_gzip_bytes": self.base_gzip_bytes, "pruned_gzip_bytes": self.pruned_gzip_bytes,
        "gzip_ratio": (self.base_gzip_bytes / self.pruned_gzip_bytes
                       if self.base_gzip_bytes and self.pruned_gzip_bytes else None),
        "base_model_path": self.base_model_path, "pruned_model_path": self.pruned_model_path,
        "recipe": self.recipe, "base": self.base, "pruned": self.pruned,
    }

  def to_markdown(self) -> str:
    def pct(x, digits=2):
      return "n/a" if x is None else f"{100 * x:.{digits}f}%"
    lines = [
        "| layer | type | kernel weights | nonzero | kept | biases (kept, not pruned) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in self.pruned["layers"]:
      lines.append(f"| {r['name']} | {r['type']} | {r['kernel_total']:,} | "
                   f"{r['kernel_nonzero']:,} | {pct(r['kept_fraction'], 3)} | "
                   f"{r['bias_nonzero']}/{r['bias_total']} |")
    for kind, agg in sorted(self.pruned["by_type"].items()):
      lines.append(f"| all {kind} | {kind} | {agg['kernel_total']:,} | "
                   f"{agg['kernel_nonzero']:,} | {pct(agg['kept_fraction'], 3)} | |")
    lines.append(f"| **total** | | {self.pruned['kernel_total']:,} | "
                 f"{self.pruned['kernel_nonzero']:,} | {pct(self.pruned['kept_fraction'], 3)} | |")
    lines += ["", "| | M0 (base) | M1 (pruned) |", "|---|---:|---:|",
              f"| weights (kernels + biases) | {self.base['weights_total']:,} | "
              f"{self.pruned['weights_nonzero']:,} nonzero |",
              f"| test accuracy (n={self.test_examples}) | {pct(self.base_accuracy)} | "
              f"{pct(self.pruned_accuracy)} |"]
    if self.base_gzip_bytes and self.pruned_gzip_bytes:
      lines.append(f"| gzip'd SavedModel | {self.base_gzip_bytes / 1e6:.3f} MB | "
                   f"{self.pruned_gzip_bytes / 1e6:.3f} MB "
                   f"({self.base_gzip_bytes / self.pruned_gzip_bytes:.2f}x smaller) |")
    lines += ["", f"Compression ratio (M0 weights / M1 nonzero weights): "
              f"**{self.compression_ratio:.2f}x** (kernels only: "
              f"{self.kernel_compression_ratio:.2f}x)."]
    if self.model_compression_ratio is not None:
      lines += ["", f"Whole model (every weight, unpruned layers too: "
                f"{self.base['model_weights_total']:,} -> "
                f"{self.pruned['model_weights_nonzero']:,} nonzero): "
                f"**{self.model_compression_ratio:.2f}x**."]
    left = self.pruned.get("left_unpruned") or []
    if left:
      lines += ["", "Left unpruned: " + ", ".join(
          f"{r['name']} ({r['type']}, {r['weights']:,} weights: {r['why']})" for r in left)
                + "."]
    lines += ["", "Kept = nonzero / total kernel weights (biases are not pruned); each kernel "
              "keeps at most floor(n * (1 - sparsity)) weights (`kept_at_most`)."]
    return "\n".join(lines) + "\n"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
    """Inverse of ``to_dict`` (derived fields are recomputed)."""
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

  def write(self, path_prefix: str | os.PathLike) -> tuple[str, str]:
    """Writes ``<prefix>.json`` and ``<prefix>.md`` atomically; returns both paths."""
    prefix = pathlib.Path(path_prefix)
    json_path, md_path = prefix.with_suffix(".json"), prefix.with_suffix(".md")
    io_utils.write_json(json_path, self.to_dict())
    title = f"# Compression report: {self.pruned_model_path or 'pruned model'}\n\n"
    io_utils.write_text(md_path, title + self.to_markdown())
    return str(json_path), str(md_path)
