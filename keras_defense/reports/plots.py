"""The experiment's figures (matplotlib Agg): success vs ε, clean vs adversarial images.

Each figure is drawn on a ``Figure`` of its own (no pyplot state) and saved to a
temporary path that is renamed into place (``save_figure``).

Example:
  plot_success_vs_epsilon(rows, ["m0", "m1", "m2"], "runs/mnist/plots/success_vs_epsilon.png",
                          title="MNIST")
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from keras_defense.util import io_utils
from keras_defense.reports import tables

_PLOT_STYLES = {"grey_box": ("-", "o"), "transfer": ("--", "s"), "adaptive": (":", "^")}
_EXTRA_STYLES = (("-.", "D"), ((0, (1, 3)), "v"), ((0, (5, 1)), "P"))
_MAX_EXAMPLE_IMAGES = 8  # images per example entry in the PNG grid
_MAX_EXAMPLE_ENTRIES = 12  # example entries (model × attack × threat model) in the PNG grid


def save_figure(fig: Figure, path: pathlib.Path) -> None:
  """Renders ``fig`` to a PNG at ``path`` (110 dpi, tight), written atomically."""
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
  varying = tables.variant_fields(rows)
  attacks = tables.ordered([r["attack"] for r in sub], tables.ATTACK_ORDER)
  panels = [(a, t) for a in attacks for t in (False, True)
            if any(r["attack"] == a and bool(r["targeted"]) == t for r in sub)]
  ncols = 2 if len(panels) > 1 else 1
  nrows = math.ceil(len(panels) / ncols)
  fig_height = 3.8 * nrows + 0.6
  fig = Figure(figsize=(5.2 * ncols, fig_height))
  axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
  threat_models = tables.ordered([r["threat_model"] for r in sub], tables.THREAT_MODEL_ORDER)
  colors = {m: f"C{i % 10}" for i, m in enumerate(model_names)}
  eps_all = sorted({float(r["epsilon"]) for r in sub})
  span = (eps_all[-1] - eps_all[0]) or max(eps_all[-1], 1e-3)
  series_keys = sorted({(r["model"], r["threat_model"], tables.row_variant(r, varying))
                        for r in sub},
                       key=lambda k: (threat_models.index(k[1]), list(model_names).index(k[0]),
                                      k[2]))
  # Line style per threat model; a threat model run with several losses/sources
  # (a "variant", see tables.variant_fields) gets a further style per variant.
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
                   if (r["model"], r["threat_model"], tables.row_variant(r, varying)) == key
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
    ax.set_title(tables.attack_label(attack, targeted), fontsize=11)
    ax.set_xticks(eps_all)
    ax.set_xticklabels([tables.format_epsilon(e) for e in eps_all], fontsize=8)
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
                     linewidth=1.6, label=sk[0] + tables.variant_label(sk[1]))
              for sk in style_keys]
  fig.legend(handles=proxies, loc="lower center", ncol=min(len(proxies), 7), fontsize=9,
             frameon=False, bbox_to_anchor=(0.5, 0.0))
  fig.tight_layout(rect=(0, 0.4 / fig_height, 1, 1 - 0.05 / nrows))
  save_figure(fig, pathlib.Path(path))
  return True


def _example_label(example) -> str:
  """E.g. 'm2\nadaptive\nFGSM untargeted\nε=0.3' (one fact per line, for the left margin)."""
  attack = tables.ATTACK_NAMES.get(example.get("attack"), example.get("attack"))
  if example.get("targeted") is not None:
    attack += " targeted" if example["targeted"] else " untargeted"
  lines = [str(example.get("model")), str(example.get("threat_model")), attack]
  if example.get("epsilon") is not None:
    lines.append(f"ε={tables.format_epsilon(example['epsilon'])}")
  return "\n".join(lines)


def validate_examples(examples) -> None:
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
  save_figure(fig, pathlib.Path(path))

