"""Gradient-masking warnings from the evidence of an evaluation.

A defense that only masks gradients shows it in three ways (Athalye, Carlini &
Wagner 2018, Sec. 3.1): many inputs whose loss gradient is exactly zero; a
weaker attacker (transfer from another model) or a defense-aware one
(adaptive) beating the plain white-box attack; and optimisation attacks
(C&W) succeeding where single-step or few-step gradient attacks fail.
"""

from __future__ import annotations

from typing import Sequence

from keras_defense.evaluation import threat_models as tm

ZERO_GRADIENT_THRESHOLD = 0.10  # fraction of images with an all-zero input gradient
CW_SUCCESS_THRESHOLD = 0.90
WEAK_GRADIENT_ATTACK = 0.50
# A margin-loss attack is somewhat stronger than cross-entropy on any confident
# model (mild softmax saturation); only a large gap says the gradients are masked.
ADAPTIVE_GAP = 0.25


def _label(row: dict) -> str:
  eps = "" if row["epsilon"] is None else f" eps={row['epsilon']:g}"
  return f"{row['attack'].upper()} {'targeted' if row['targeted'] else 'untargeted'}{eps}"


def masking_warnings(rows: Sequence[dict], models: dict[str, dict]) -> list[str]:
  """Returns human-readable warnings where the evidence points to gradient masking.

  Args:
    rows: evaluation rows (see ``evaluation.evaluate``).
    models: name -> facts with ``zero_gradient_fraction``.

  Returns:
    Warnings, one string each, most important first; empty if none fire.
  """
  warnings = []
  for name, facts in models.items():
    frac = facts.get("zero_gradient_fraction")
    if frac is not None and frac >= ZERO_GRADIENT_THRESHOLD:
      warnings.append(
          f"{name}: {100 * frac:.1f}% of the evaluated test images have an exactly-zero "
          f"cross-entropy input gradient. That is gradient masking: sign-gradient attacks "
          f"(FGSM/BIM) add nothing there, so low grey_box success rates are not evidence "
          f"of robustness.")
  grey = {(r["model"], r["attack"], r["targeted"], r["epsilon"]): r
          for r in rows if r["threat_model"] == tm.GREY_BOX}
  for name in models:
    for threat in (tm.TRANSFER, tm.ADAPTIVE):
      beats = []
      for r in rows:
        if r["model"] != name or r["threat_model"] != threat:
          continue
        g = grey.get((r["model"], r["attack"], r["targeted"], r["epsilon"]))
        min_gap = ADAPTIVE_GAP if threat == tm.ADAPTIVE else 0.0
        if (g is not None and r["n"] and g["n"] and r["ci_low"] > g["ci_high"]
            and r["success_rate"] - g["success_rate"] >= min_gap):
          beats.append((r["success_rate"] - g["success_rate"], r, g))
      if beats:
        gap, r, g = max(beats, key=lambda b: b[0])
        total = sum(1 for r2 in rows if r2["model"] == name and r2["threat_model"] == threat)
        warnings.append(
            f"{name}: the {threat} attacker beats the grey_box attacker in {len(beats)} of "
            f"{total} cells (largest gap: {_label(r)}, {100 * r['success_rate']:.1f}% vs "
            f"{100 * g['success_rate']:.1f}%, 95% intervals disjoint"
            + ("" if threat == tm.TRANSFER else
               f", gap >= {100 * ADAPTIVE_GAP:.0f} points") + "). "
            + ("A weaker attacker should never win: the grey_box gradients are masked."
               if threat == tm.TRANSFER else
               "The grey_box number measures masked gradients, not robustness; "
               "report the adaptive column."))
  for name in models:
    cw = [r for r in rows if r["model"] == name and r["threat_model"] == tm.GREY_BOX
          and r["attack"].startswith("cw_") and r["n"]]
    grad = [r for r in rows if r["model"] == name and r["threat_model"] == tm.GREY_BOX
            and not r["attack"].startswith("cw_") and r["n"]]
    if not cw or not grad:
      continue
    best_cw = max(cw, key=lambda r: r["success_rate"])
    best_grad = max(grad, key=lambda r: r["success_rate"])
    if (best_cw["success_rate"] >= CW_SUCCESS_THRESHOLD
        and best_grad["success_rate"] < WEAK_GRADIENT_ATTACK
        and best_cw["ci_low"] > best_grad["ci_high"]):
      warnings.append(
          f"{name}: {_label(best_cw)} succeeds on {100 * best_cw['success_rate']:.1f}% while "
          f"the best grey_box FGSM/BIM cell reaches only "
          f"{100 * best_grad['success_rate']:.1f}% ({_label(best_grad)}): the model is "
          f"not robust, its cross-entropy gradients are masked.")
  return warnings


# AutoAttack's own evidence (Croce & Hein 2020, Sec. 5; Carlini et al. 2019,
# "On evaluating adversarial robustness", checklist: unbounded attacks reach 100%).
CE_VS_DLR_FACTOR = 2.0     # APGD-CE leaves >= 2x the images robust that APGD-T does ...
CE_VS_DLR_MIN_GAP = 0.05   # ... and the gap is >= 5% of the images


def autoattack_warnings(results: dict[str, tuple[dict, dict | None]]) -> list[str]:
  """Gradient-masking warnings from AutoAttack runs (``robustness`` results.json dicts).

  Three signs, each naming the model, ε and the images' count:
  Square (gradient-free) breaks images every gradient attack left robust;
  APGD-CE leaves far more images robust than APGD-T with the scale-invariant
  DLR loss (a saturated softmax); robust accuracy above 0 at an ε where any
  image can be turned into any other (the sanity run, ε = 1 on [0, 1]).

  Args:
    results: model name -> (its results.json, the sanity run's results.json or None).
  """
  warnings = []
  for name, (main, sanity) in results.items():
    n = int(main["n_examples"])
    for e in main["per_eps"]:
      steps = {s["attack"]: s for s in e["attacks"]}
      ce, t = steps.get("apgd-ce"), steps.get("apgd-t")
      if ce is not None and t is not None:
        robust_ce, robust_t = ce["n_robust"], t["n_robust"]
        if (robust_ce >= CE_VS_DLR_FACTOR * robust_t
            and robust_ce - robust_t >= CE_VS_DLR_MIN_GAP * n):
          warnings.append(
              f"{name}: at ε={e['eps']:g}, APGD-CE leaves {robust_ce} of {n} images robust but "
              f"APGD-T (targeted DLR loss, invariant to scaling the logits) only {robust_t}: "
              f"the cross-entropy saturates (a saturated softmax masks its gradient), so "
              f"cross-entropy attacks overstate this model's robustness.")
      square = steps.get("square")
      if square is not None and square["broken"] > 0:
        others = ", ".join(a.upper() for a in steps if a != "square")
        warnings.append(
            f"{name}: at ε={e['eps']:g}, Square (gradient-free) broke {square['broken']} of "
            f"{n} images that every gradient attack ({others}) left robust: the gradients "
            f"mislead the attacks there (gradient masking).")
    if sanity is not None and sanity["per_eps"]:
      s = sanity["per_eps"][0]
      if s["n_robust"] > 0:
        warnings.append(
            f"{name}: at ε={s['eps']:g}, where any image can be turned into any other, "
            f"{s['n_robust']} of {sanity['n_examples']} images stayed robust (robust accuracy "
            f"{100 * s['robust_acc']:.1f}%, must be 0): the attacks fail on this model, so "
            f"every robust accuracy reported for it is an overestimate.")
  return warnings
