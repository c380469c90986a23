"""The grid of a robustness-vs-compression sweep: its points and its config.

A sweep evaluates every *point* of

  method (standard, or an adversarial-training method of ``training.TrainConfig``)
  x (Dense sparsity, Conv sparsity) pairs (as given, not their product)
  x logits-augmentation ε (0: no augmentation)
  x quantization (``none``: the float SavedModel; ``ptq_int8``/``qat_int8``:
    the point's model converted by ``compression.quantize`` into a .tflite)

(``SweepConfig.points``, in grid order). Keys: a parent or point is named by
its coordinates and the seed, e.g. ``standard__s0`` (M0),
``standard__d0.9_c0.95__s0`` (pruned), ``standard__d0.9_c0.95__eps20__s0`` (a
point and its augmented model), ``standard__d0.9_c0.95__eps20__s0__qat_int8``
(that model quantized: the suffix only when quantized, so the keys and run
directories of a sweep without quantization are those it always had).

Below both the execution (``pipelines.sweep``: parents, attacks, run) and the
report (``reports.sweep_report``), which read the same config and columns.

Example:
  >>> config = SweepConfig(run_dir="runs/sweep", train=..., prune=..., augment=...,
  ...                      eval=evaluation.EvalConfig(epsilons=(0.1,), cw_attacks=()))
  >>> [p.key for p in config.validate().points()]
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from keras_defense import data
from keras_defense.evaluation import grid as evaluation
from keras_defense.evaluation import statistics
from keras_defense import training
from keras_defense.util import config_checks
from keras_defense.util.errors import UserError

STAGES = ("train", "prune", "augment", "quantize", "attack", "autoattack", "report")
NO_QUANTIZATION = "none"
# The quantization dimension: none, or a compression.quantize method.
QUANTIZATIONS = (NO_QUANTIZATION, "ptq_int8", "qat_int8")
STANDARD = "standard"
# PruneConfig's robust-pruning flags (defenses.pruning, its adversarial spec):
# part of a sweep's identity only when prune.adversarial is set.
ROBUST_PRUNING_FIELDS = training.ADVERSARIAL_FLAGS
THREAT_MODEL = "Linf"  # RobustBench's name of the L-inf ball every attack here uses


def methods_available() -> tuple[str, ...]:
  """The training methods: standard, plus ``training.ADVERSARIAL_METHODS`` if available.

  Adversarial methods need ``training.TrainConfig.adversarial``; without it only
  "standard" is offered.
  """
  fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
  if "adversarial" not in fields:
    return (STANDARD,)
  return (STANDARD, *getattr(training, "ADVERSARIAL_METHODS", ()))


def _g(x: float) -> str:
  return f"{float(x):g}"


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: its coordinates and seed."""
  method: str
  dense_sparsity: float
  conv_sparsity: float
  logits_epsilon: float
  seed: int
  quantization: str = NO_QUANTIZATION

  @property
  def sparsity_id(self) -> str:
    return f"d{_g(self.dense_sparsity)}_c{_g(self.conv_sparsity)}"

  @property
  def quantized(self) -> bool:
    return self.quantization != NO_QUANTIZATION

  @property
  def key(self) -> str:
    """``<method>__d<dense>_c<conv>__eps<ε>__s<seed>[__<quantization>]``: the point and its
    model (the suffix only when quantized)."""
    return self.float_key + (f"__{self.quantization}" if self.quantized else "")

  @property
  def float_key(self) -> str:
    """The key of the float model a quantized point converts (its own key if not quantized)."""
    return f"{self.method}__{self.sparsity_id}__eps{_g(self.logits_epsilon)}__s{self.seed}"

  def float_point(self) -> "Point":
    """This point without quantization: the float model it converts."""
    return dataclasses.replace(self, quantization=NO_QUANTIZATION)

  @property
  def m0_key(self) -> str:
    return f"{self.method}__s{self.seed}"

  @property
  def pruned_key(self) -> str:
    """The pruned parent's key (M0's when both sparsities are 0)."""
    if self.dense_sparsity == 0 and self.conv_sparsity == 0:
      return self.m0_key
    return f"{self.method}__{self.sparsity_id}__s{self.seed}"

  @property
  def model_name(self) -> str:
    """The point's model in the attack grid (no "__": cell keys split on it)."""
    return f"{self.sparsity_id}_eps{_g(self.logits_epsilon)}"

  def coordinates(self) -> dict[str, Any]:
    """The point's coordinates (``quantization`` only when quantized, as the key)."""
    return {"method": self.method, "dense_sparsity": float(self.dense_sparsity),
            "conv_sparsity": float(self.conv_sparsity),
            "logits_epsilon": float(self.logits_epsilon), "seed": int(self.seed),
            **({"quantization": self.quantization} if self.quantized else {})}


@dataclasses.dataclass
class SweepConfig:
  """The sweep. Sub-configs as kd-experiment's; field names match the kd-sweep flags.

  ``eval`` must hold exactly one ε (``eval.epsilons``: the radius of every
  point's attacks and AutoAttack) and no C&W attacks (not ε-bounded).
  ``quantize_epochs`` (QAT fine-tuning) and ``square_queries`` (the black-box
  ensemble of a quantized point) concern quantized points only; they are bound
  per quantized model and evaluation, not in ``identity``, so quantized points
  can be added to a finished sweep's run directory.
  """
  run_dir: str
  train: training.TrainConfig
  prune: Any  # pruning.PruneConfig (lazily imported: tfmot is heavy)
  augment: Any  # logits_augmentation.AugmentConfig
  eval: evaluation.EvalConfig
  sparsities: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.9, 0.95))
  logits_epsilons: tuple[float, ...] = (0.0, 20.0)
  methods: tuple[str, ...] = (STANDARD,)
  quantization: tuple[str, ...] = (NO_QUANTIZATION,)
  quantize_epochs: int = 1  # qat_int8: fine-tuning epochs under fake quantization
  square_queries: int = 5000  # a quantized point's Square budget (AutoAttack's)
  # The adversarial methods' attack (the adversarial-training flags; its method is each
  # point's); None: the spec's defaults. train.adversarial is set per point.
  adversarial: training.AdversarialSpec | None = None
  base_models: dict[str, str] = dataclasses.field(default_factory=dict)  # method -> SavedModel
  dataset: str = "mnist"
  data_dir: str | None = None
  manual_dir: str | None = None
  seed: int = 0
  deterministic: bool = True
  stages: tuple[str, ...] = STAGES
  shard_index: int = 0
  num_shards: int = 1
  lock_timeout: float = 600.0  # seconds without a heartbeat before a lock is stale
  command: str | None = None

  def validate(self) -> "SweepConfig":
    """Checks every field; returns self.

    Raises:
      UserError: a bad field, named.
    """
    need = config_checks.checker(UserError)
    need(bool(self.stages), "`stages` must name at least one stage; got an empty list.")
    for s in self.stages:
      need(s in STAGES, f"`stages` must be from {', '.join(STAGES)}; got {s!r}.")
    training.check_output_dir("run_dir", self.run_dir)
    need(len(self.sparsities) > 0, "`sparsities` must list at least one dense:conv pair.")
    for pair in self.sparsities:
      need(isinstance(pair, (tuple, list)) and len(pair) == 2,
           f"`sparsities` must hold (dense, conv) pairs; got {pair!r}.")
      for name, v in zip(("dense", "conv"), pair):
        need(isinstance(v, (int, float)) and 0 <= v < 1,
             f"`sparsities`: the {name} sparsity must be in [0, 1); got {v!r} in {pair!r}.")
    need(len(set(map(tuple, self.sparsities))) == len(self.sparsities),
         f"`sparsities` must not repeat a pair; got {list(self.sparsities)}.")
    need(len(self.logits_epsilons) > 0, "`logits_epsilons` must list at least one value (0: "
         "no augmentation).")
    for e in self.logits_epsilons:
      need(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0,
           f"`logits_epsilons` must all be finite and >= 0; got {e!r}.")
    need(len(set(self.logits_epsilons)) == len(self.logits_epsilons),
         f"`logits_epsilons` must not repeat; got {list(self.logits_epsilons)}.")
    available = methods_available()
    need(len(self.methods) > 0, "`methods` must name at least one training method.")
    for m in self.methods:
      if m != STANDARD and available == (STANDARD,):
        raise UserError(
            f"`methods`: {m!r} needs adversarial training, but this keras_defense's "
            f"training.TrainConfig has no `adversarial` field; only 'standard' is available.")
      need(m in available, f"`methods` must be from {', '.join(available)}; got {m!r}.")
    need(len(set(self.methods)) == len(self.methods),
         f"`methods` must not repeat; got {list(self.methods)}.")
    need(len(self.quantization) > 0, f"`quantization` must name at least one of "
         f"{', '.join(QUANTIZATIONS)}.")
    for q in self.quantization:
      need(q in QUANTIZATIONS,
           f"`quantization` must be from {', '.join(QUANTIZATIONS)}; got {q!r}.")
    need(len(set(self.quantization)) == len(self.quantization),
         f"`quantization` must not repeat; got {list(self.quantization)}.")
    need(isinstance(self.quantize_epochs, int) and self.quantize_epochs >= 0,
         f"`quantize_epochs` must be an integer >= 0; got {self.quantize_epochs!r}.")
    need(isinstance(self.square_queries, int) and self.square_queries >= 1,
         f"`square_queries` must be an integer >= 1; got {self.square_queries!r}.")
    for m, path in self.base_models.items():
      need(m in self.methods, f"`base_models` names method {m!r}, which is not in `methods` "
           f"({', '.join(self.methods)}).")
      need(bool(path), f"`base_models`: method {m!r} needs a SavedModel path; got {path!r}.")
    need(isinstance(self.num_shards, int) and self.num_shards >= 1,
         f"`num_shards` must be an integer >= 1; got {self.num_shards!r}.")
    need(isinstance(self.shard_index, int) and 0 <= self.shard_index < self.num_shards,
         f"`shard_index` must be in [0, num_shards) = [0, {self.num_shards}); got "
         f"{self.shard_index!r}.")
    need(self.lock_timeout > 0, f"`lock_timeout` must be > 0 seconds; got {self.lock_timeout}.")
    need(len(self.eval.epsilons) == 1,
         f"`epsilons` (the attack ε) must be exactly one value for a sweep; got "
         f"{list(self.eval.epsilons)}.")
    need(not self.eval.cw_attacks, f"`cw_attacks` must be empty for a sweep (C&W is not "
         f"ε-bounded); got {list(self.eval.cw_attacks)}.")
    need(len(self.eval.attacks) > 0, "`attacks` must name at least one of fgsm, bim.")
    need(self.augment.transform == "logits_augmentation",
         f"the augment config's `transform` must be 'logits_augmentation' (the sweep varies "
         f"`logits_epsilon`); got {self.augment.transform!r}.")
    for stage in ("train", "prune", "augment"):
      sub = getattr(self, stage)
      for field in ("dataset", "data_dir", "manual_dir"):
        need(getattr(sub, field) == getattr(self, field),
             f"the {stage} config's `{field}` is {getattr(sub, field)!r} but the sweep's is "
             f"{getattr(self, field)!r}: every stage must use the sweep's data.")
    data.split_name(self.dataset)
    training.check_adversarial(self.adversarial)
    self.train.validate()
    self.prune.validate()
    self.augment.validate()
    self.eval.validate()
    return self

  @property
  def epsilon(self) -> float:
    """The attack ε of every point."""
    return float(self.eval.epsilons[0])

  @property
  def quantized(self) -> bool:
    """True when the grid has quantized points (the report then shows bytes and agreement)."""
    return any(q != NO_QUANTIZATION for q in self.quantization)

  def points(self) -> list[Point]:
    """Every point, in grid order: method, sparsity pair, logits ε, then quantization."""
    return [Point(m, float(d), float(c), float(e), int(self.seed), q) for m in self.methods
            for d, c in self.sparsities for e in self.logits_epsilons
            for q in self.quantization]

  def shard(self) -> list[Point]:
    """This shard's points: block ``shard_index`` of ``num_shards`` contiguous blocks."""
    pts = self.points()
    n, k = len(pts), self.num_shards
    return pts[self.shard_index * n // k:(self.shard_index + 1) * n // k]

  def identity(self) -> dict[str, Any]:
    """What a run directory is bound to: everything but the grid, shards and stages.

    The configs as their flags name them (``training.config_dict``). The
    training method sets ``train.adversarial`` per point, so it is left out;
    the other adversarial flags are ``adversarial``'s (the sweep's attack for
    its adversarial methods). Pruning's robust-pruning flags
    (``ROBUST_PRUNING_FIELDS``) count only when
    ``prune.adversarial`` is set: they do nothing otherwise, and a plain sweep
    keeps the identity it had before pruning had them.
    """
    def plain(v, drop=()):
      d = training.config_dict(v)
      return {k: list(x) if isinstance(x, tuple) else x for k, x in d.items()
              if k not in ("verbose", "run_dir", "export_dir", "export_version",
                           "base_model_path", "report_path", "dense_sparsity",
                           "conv_sparsity", "logits_epsilon", *drop)}
    prune_drop = ROBUST_PRUNING_FIELDS if getattr(self.prune, "adversarial", None) is None else ()
    return json.loads(json.dumps({
        "dataset": self.dataset, "seed": self.seed, "deterministic": self.deterministic,
        "base_models": dict(sorted(self.base_models.items())),
        "train": plain(dataclasses.replace(self.train, adversarial=self.adversarial),
                       drop=("adversarial",)),
        "prune": plain(self.prune, drop=prune_drop), "augment": plain(self.augment),
        "eval": plain(self.eval)}, default=str))


def success_column(threat_model: str, attack: str, targeted: bool) -> str:
  """A point's success-rate key, e.g. ``adaptive_bim_targeted_success``."""
  return f"{threat_model}_{attack}{'_targeted' if targeted else ''}_success"


def success_columns(config: SweepConfig) -> list[str]:
  """The success-rate columns of the grid, in a stable order."""
  return [success_column(t, a, tg) for t in config.eval.threat_models
          for a in config.eval.attacks for tg in config.eval.targeted_modes]



def record_head(config: SweepConfig, p: Point, *, clean_acc: float, n_clean: int, n: int,
                n_robust: int, definition: str) -> dict[str, Any]:
  """The fields every point record starts with: key, coordinates, ε, accuracies (Wilson)."""
  lo, hi = statistics.wilson_interval(n_robust, n)
  return {"key": p.key, **p.coordinates(),
          "eps": config.epsilon, "threat_model": THREAT_MODEL, "n_examples": n,
          "clean_acc": clean_acc, "n_clean": n_clean,
          "robust_acc": n_robust / n, "robust_ci95": [lo, hi], "n_robust": n_robust,
          "robust_acc_definition": definition}
