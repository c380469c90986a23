"""What a robustness evaluation found: per attack, per ε, and results.json.

``robustness.run`` returns a ``RobustnessResult`` (this module sits below the
runner and below ``reports.robustness_report``, which renders it); ``to_dict`` is the
``results.json`` schema, with RobustBench's field names (``clean_acc``,
``robust_acc``, ``eps``, ``threat_model``, ``n_examples``) and accuracies as
fractions in [0, 1], each with a 95% Wilson interval. Timing fields are exactly
the keys ending in ``seconds`` (a resumed run differs from an uninterrupted
one only there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from keras_defense.evaluation import statistics
from keras_defense.evaluation.robustness_config import RobustnessConfig

THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names


@dataclasses.dataclass
class AttackStep:
  """One attack at one ε: images still robust after it (cumulative)."""
  attack: str
  attacked: int   # images it ran on (those still robust before it)
  broken: int     # images it broke
  robust: int     # images still robust after it
  outside_threat_model: int  # adversarials it returned outside the ball or box (not counted)
  seconds: float


@dataclasses.dataclass
class EpsilonResult:
  """The ensemble at one ε."""
  eps: float
  broken_at_smaller_eps: int
  steps: list[AttackStep]
  robust: int
  seconds: float
  examples: dict[str, np.ndarray]  # worst-case adversarials for the grid


@dataclasses.dataclass
class RobustnessResult:
  """Everything ``results.json`` and ``report.md`` show."""
  config: RobustnessConfig
  attacks: list[str]
  n: int
  clean_correct: int
  output: str
  model_kind: str
  model_sha256: str
  compute_dtype: str  # the one the attacks used ("auto" resolved)
  epsilons: list[EpsilonResult]
  clean_seconds: float
  wall_seconds: float
  versions: dict[str, str]
  # How the batch size was chosen from memory (``attacks.memory``); None if given.
  batch_size_auto: dict[str, Any] | None = None
  # This process's shard ({"index", "count", "images": [start, stop)}); None if whole.
  shard: dict[str, Any] | None = None
  # The proven side (``evaluation.certified.Certified``); None when not asked for.
  certified: Any = None

  @property
  def clean_acc(self) -> float:
    return self.clean_correct / self.n

  @property
  def robust_acc(self) -> list[float]:
    return [e.robust / self.n for e in self.epsilons]

  def _acc(self, count: int) -> dict[str, Any]:
    lo, hi = statistics.wilson_interval(count, self.n)
    return {"acc": count / self.n, "ci95": [lo, hi], "count": count}

  def to_dict(self) -> dict[str, Any]:
    """results.json: RobustBench's field names (accuracies as fractions in [0, 1]).

    Timing fields are exactly the keys ending in ``seconds``.
    """
    c = self.config
    clean = self._acc(self.clean_correct)
    per_eps = []
    for e in self.epsilons:
      final = self._acc(e.robust)
      steps = [{"attack": s.attack, "robust_acc": s.robust / self.n,
                "robust_acc_ci95": self._acc(s.robust)["ci95"], "n_robust": s.robust,
                "attacked": s.attacked, "broken": s.broken,
                "outside_threat_model": s.outside_threat_model, "seconds": s.seconds}
               for s in e.steps]
      per_eps.append({"eps": e.eps, "robust_acc": final["acc"],
                      "robust_acc_ci95": final["ci95"], "n_robust": e.robust,
                      "broken_at_smaller_eps": e.broken_at_smaller_eps,
                      "attacks": steps, "seconds": e.seconds, **self._certified_at(e.eps)})
    return {
        "model": str(c.model), "model_kind": self.model_kind,
        "model_sha256": self.model_sha256,
        "signature": c.signature if self.model_kind == "saved_model" else None,
        "output_key": c.output_key, "output": self.output,
        "pixels": c.pixels().to_dict(),  # the model's convention; attacks ran in [0, 1]
        "dataset": c.dataset, "split": "test", "n_examples": self.n,
        "threat_model": THREAT_MODELS[c.norm], "norm": c.norm,
        "version": c.version, "attacks": list(self.attacks),
        "clean_acc": clean["acc"], "clean_acc_ci95": clean["ci95"],
        "n_clean_correct": self.clean_correct,
        "eps": [e.eps for e in self.epsilons],
        "robust_acc": self.robust_acc,
        "robust_acc_ci95": [p["robust_acc_ci95"] for p in per_eps],
        "per_eps": per_eps,
        "seed": c.seed, "batch_size": c.batch_size, "batch_size_auto": self.batch_size_auto,
        "slice_size": c.slice_size, **({"shard": self.shard} if self.shard else {}),
        # Where it ran, when not on one device (replicas): a run without the key is.
        **({"strategy": c.strategy, "num_cpu_devices": c.num_cpu_devices}
           if c.strategy != "default" else {}),
        "compute_dtype": self.compute_dtype, "requested_compute_dtype": c.compute_dtype,
        "versions": self.versions, "command": c.command,
        "clean_seconds": self.clean_seconds,
        "attack_seconds": sum(e.seconds for e in self.epsilons),
        "total_seconds": self.clean_seconds + sum(e.seconds for e in self.epsilons),
        "wall_seconds": self.wall_seconds,
        **self._certified_fields(),
    }

  def _certified_at(self, eps: float) -> dict[str, Any]:
    """A per_eps entry's certified fields (none when certification was not asked for)."""
    cert = self.certified
    if cert is None:
      return {}
    if not cert.available:
      return {"certified_acc": None, "n_certified": None}
    p = cert.per_eps[eps]
    acc = self._acc(p["n_certified"])
    return {"certified_acc": acc["acc"], "certified_acc_ci95": acc["ci95"],
            "n_certified": p["n_certified"],
            "n_certified_by_method": {m: v["n_certified"] for m, v in p["by_method"].items()},
            "certify_seconds": p["seconds"]}

  def _certified_fields(self) -> dict[str, Any]:
    """results.json's top-level certified fields, aligned with ``eps`` like ``robust_acc``."""
    cert = self.certified
    if cert is None:
      return {}
    ok = cert.available
    return {"certify_methods": list(cert.methods), "certified_reason": cert.reason,
            "certified_acc": [cert.per_eps[e.eps]["certified_acc"] if ok else None
                              for e in self.epsilons],
            "certified_indices": [cert.per_eps[e.eps]["certified_indices"] if ok else None
                                  for e in self.epsilons]}

  def summary(self) -> str:
    parts = [f"clean {100 * self.clean_acc:.2f}%"]
    if self.shard:
      parts.insert(0, f"shard {self.shard['index']} of {self.shard['count']}, images "
                      f"{self.shard['images'][0]}-{self.shard['images'][1] - 1}")
    cert = self.certified
    for e in self.epsilons:
      text = f"ε={e.eps:g}: robust {100 * e.robust / self.n:.2f}%"
      if cert is not None and cert.available:
        text = f"ε={e.eps:g}: certified {100 * cert.per_eps[e.eps]['certified_acc']:.2f}% " \
            f"<= robust {100 * e.robust / self.n:.2f}%"
      parts.append(text)
    if cert is not None and not cert.available:
      parts.append(f"certified n/a ({cert.reason})")
    return f"{self.config.model} ({THREAT_MODELS[self.config.norm]}, n={self.n}): " + \
        ", ".join(parts)
