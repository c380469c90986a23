"""Robustness against compression: a grid of training method x sparsity x logits ε.

``run(config)`` evaluates every *point* of the grid

  method (standard, or an adversarial-training method of ``training.TrainConfig``)
  x (Dense sparsity, Conv sparsity) pairs (as given, not their product)
  x logits-augmentation ε (0: no augmentation)

on top of the existing stages, reusing trained *parents*: one M0 per method
(``training.train``, or a given SavedModel), one pruned model per (method,
sparsity) (``pruning.prune``; sparsity 0:0 is M0 itself, not fine-tuned), one
augmented model per (method, sparsity, ε) (``logits_augmentation.augment``;
ε = 0 is the pruned model itself). A point's attacks are the attack grid of
``evaluation.evaluate`` (FGSM/BIM, grey-box / transfer from M0 / adaptive) at
one ε, and AutoAttack through ``evaluate.run`` when
``eval.autoattack_version != "none"``.

Keys: a parent or point is named by its coordinates and the seed, e.g.
``standard__s0`` (M0), ``standard__d0.9_c0.95__s0`` (pruned),
``standard__d0.9_c0.95__eps20__s0`` (a point and its augmented model).

Run-directory layout::

  <run_dir>/sweep.json                 the run's binding (settings outside the grid)
  <run_dir>/parents/<key>/             model/1 (SavedModel), run/ (checkpoints),
                                       done.json (finished), lock (while building)
  <run_dir>/work/<method>__s<seed>/cells/   attack cells of every point of the method
  <run_dir>/work/<key>/autoattack/     evaluate.run of the point
  <run_dir>/points/<key>.json          one finished point (written last, atomically)
  <run_dir>/sweep.csv, report.md, plots/, tensorboard/   (sweep_report)

Resuming: a point whose JSON exists is skipped; a parent whose done.json
exists is reused; an interrupted parent resumes from its epoch checkpoint, an
interrupted point from its last attack cell / AutoAttack step.

Sharding: ``shard_index`` of ``num_shards`` takes a contiguous block of the
points in grid order (so shards share as few parents as possible). A parent
needed by several shards is built by the first to get there, under a lock file
(``file_lock``); the others wait and then reuse it. Shards write disjoint point
files; the attack cells of M0 they share are written atomically with identical
content. ``report`` merges whatever points exist and lists the missing ones.

Example:
  >>> result = run(SweepConfig(run_dir="runs/sweep", train=..., prune=..., augment=...,
  ...                          eval=evaluation.EvalConfig(epsilons=(0.1,), cw_attacks=())))
  >>> result.missing
  []
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from typing import Any, Callable

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense.evaluation import grid as evaluation
from keras_defense.models import export
from keras_defense.util import file_lock
from keras_defense.util import io_utils
from keras_defense import models as models_lib
from keras_defense.util import progress as progress_lib
from keras_defense.evaluation import statistics
from keras_defense import training
from keras_defense.util.errors import UserError

STAGES = ("train", "prune", "augment", "attack", "autoattack", "report")
STANDARD = "standard"
# PruneConfig's robust-pruning fields (defenses.pruning): part of a sweep's
# identity only when prune.adversarial is set.
ROBUST_PRUNING_FIELDS = training.ADVERSARIAL_FIELDS
THREAT_MODEL = "Linf"  # RobustBench's name of the L-inf ball every attack here uses
SOURCE = "m0"  # the attack grid's name of the method's M0 (transfer source)

Progress = progress_lib.Progress


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

  @property
  def sparsity_id(self) -> str:
    return f"d{_g(self.dense_sparsity)}_c{_g(self.conv_sparsity)}"

  @property
  def key(self) -> str:
    """``<method>__d<dense>_c<conv>__eps<ε>__s<seed>``: the point and its model."""
    return f"{self.method}__{self.sparsity_id}__eps{_g(self.logits_epsilon)}__s{self.seed}"

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
    return {"method": self.method, "dense_sparsity": float(self.dense_sparsity),
            "conv_sparsity": float(self.conv_sparsity),
            "logits_epsilon": float(self.logits_epsilon), "seed": int(self.seed)}


@dataclasses.dataclass
class SweepConfig:
  """The sweep. Sub-configs as kd-experiment's; field names match the kd-sweep flags.

  ``eval`` must hold exactly one ε (``eval.epsilons``: the radius of every
  point's attacks and AutoAttack) and no C&W attacks (not ε-bounded).
  """
  run_dir: str
  train: training.TrainConfig
  prune: Any  # pruning.PruneConfig (lazily imported: tfmot is heavy)
  augment: Any  # logits_augmentation.AugmentConfig
  eval: evaluation.EvalConfig
  sparsities: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.9, 0.95))
  logits_epsilons: tuple[float, ...] = (0.0, 20.0)
  methods: tuple[str, ...] = (STANDARD,)
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
    def need(cond, msg):
      if not cond:
        raise UserError(msg)
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
    self.train.validate()
    self.prune.validate()
    self.augment.validate()
    self.eval.validate()
    return self

  @property
  def epsilon(self) -> float:
    """The attack ε of every point."""
    return float(self.eval.epsilons[0])

  def points(self) -> list[Point]:
    """Every point, in grid order: method, then sparsity pair, then logits ε."""
    return [Point(m, float(d), float(c), float(e), int(self.seed)) for m in self.methods
            for d, c in self.sparsities for e in self.logits_epsilons]

  def shard(self) -> list[Point]:
    """This shard's points: block ``shard_index`` of ``num_shards`` contiguous blocks."""
    pts = self.points()
    n, k = len(pts), self.num_shards
    return pts[self.shard_index * n // k:(self.shard_index + 1) * n // k]

  def identity(self) -> dict[str, Any]:
    """What a run directory is bound to: everything but the grid, shards and stages.

    The training method sets ``train.adversarial`` per point, so it is left out.
    Pruning's robust-pruning fields (``ROBUST_PRUNING_FIELDS``) count only when
    ``prune.adversarial`` is set: they do nothing otherwise, and a plain sweep
    keeps the identity it had before pruning had them.
    """
    def plain(v, drop=()):
      d = dataclasses.asdict(v)
      return {k: list(x) if isinstance(x, tuple) else x for k, x in d.items()
              if k not in ("verbose", "run_dir", "export_dir", "export_version",
                           "base_model_path", "report_path", "dense_sparsity",
                           "conv_sparsity", "logits_epsilon", *drop)}
    prune_drop = ROBUST_PRUNING_FIELDS if getattr(self.prune, "adversarial", None) is None else ()
    return json.loads(json.dumps({
        "dataset": self.dataset, "seed": self.seed, "deterministic": self.deterministic,
        "base_models": dict(sorted(self.base_models.items())),
        "train": plain(self.train, drop=("adversarial",)),
        "prune": plain(self.prune, drop=prune_drop), "augment": plain(self.augment),
        "eval": plain(self.eval)}, default=str))


@dataclasses.dataclass
class SweepResult:
  """What ``run`` found: the grid's finished points (grid order) and the missing keys."""
  points: list[dict]
  missing: list[str]
  computed: list[str]  # keys of points computed by this call
  artifacts: dict[str, str]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class _Sweep:
  """Paths, parents and points of one run directory."""

  def __init__(self, config: SweepConfig, progress: Progress | None):
    self.c = config
    self.dir = pathlib.Path(config.run_dir)
    self.progress = progress or (lambda done, total, desc: None)
    self._test = None

  def point_path(self, key: str) -> pathlib.Path:
    return self.dir / "points" / f"{key}.json"

  def parent_dir(self, key: str) -> pathlib.Path:
    return self.dir / "parents" / key

  # --------------------------------------------------------------- parents

  def _parent(self, key: str, stage: str, build: Callable[[pathlib.Path], dict]) -> str:
    """The SavedModel of parent ``key``, built once (under its lock) if needed."""
    pdir = self.parent_dir(key)
    done = pdir / "done.json"
    if not done.is_file():
      if stage not in self.c.stages:
        raise UserError(f"parent model {key} has not been built in {str(self.dir)!r}; "
                        f"include {stage!r} in `stages`.")
      with file_lock.hold(pdir / "lock", stale_seconds=self.c.lock_timeout,
                          on_wait=lambda h: logging.info("waiting for %s, built by %s pid %s",
                                                         key, h.get("host"), h.get("pid"))):
        if not done.is_file():  # re-check: another shard may have finished it
          logging.info("building %s (%s)", key, stage)
          start = time.time()
          record = build(pdir)
          record["seconds"] = time.time() - start
          # Relative to the run directory, so a moved or copied run still finds it.
          record["saved_model"] = str(pathlib.Path(record["saved_model"]).relative_to(self.dir))
          io_utils.write_json(done, record)
    return str(self.dir / io_utils.read_json(done)["saved_model"])

  def m0(self, p: Point) -> str:
    if p.method in self.c.base_models:
      path = self.c.base_models[p.method]
      if not (pathlib.Path(path) / "saved_model.pb").is_file():
        raise UserError(f"`base_models`: no SavedModel at {path!r} for method {p.method!r}.")
      export.check_model_dataset(path, self.c.dataset, what="`base_models`")
      return path

    def build(pdir):
      cfg = dataclasses.replace(
          self.c.train, run_dir=str(pdir / "run"), export_dir=str(pdir / "model"),
          export_version=1, seed=self.c.seed, deterministic=self.c.deterministic,
          **({"adversarial": None if p.method == STANDARD else p.method}
             if "adversarial" in _train_fields() else {}))
      result = training.train(cfg)
      return {"saved_model": result.saved_model_path, **result.to_dict()}
    return self._parent(p.m0_key, "train", build)

  def pruned(self, p: Point) -> str:
    base = self.m0(p)
    if p.pruned_key == p.m0_key:
      return base

    def build(pdir):
      from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
      cfg = dataclasses.replace(
          self.c.prune, base_model_path=base, dense_sparsity=p.dense_sparsity,
          conv_sparsity=p.conv_sparsity, initial_sparsity=min(
              self.c.prune.initial_sparsity, p.dense_sparsity, p.conv_sparsity),
          run_dir=str(pdir / "run"), export_dir=str(pdir / "model"), export_version=1,
          report_path=str(pdir / "compression"), seed=self.c.seed,
          deterministic=self.c.deterministic)
      result = pruning.prune(cfg)
      return {"saved_model": result.saved_model_path,
              **{k: v for k, v in result.to_dict().items() if k != "saved_model_path"}}
    return self._parent(p.pruned_key, "prune", build)

  def model(self, p: Point) -> str:
    """The point's model: the augmented parent (the pruned one at logits ε = 0)."""
    base = self.pruned(p)
    if p.logits_epsilon == 0:
      return base

    def build(pdir):
      from keras_defense.defenses import logits_augmentation  # pylint: disable=g-import-not-at-top
      cfg = dataclasses.replace(self.c.augment, base_model_path=base,
                                logits_epsilon=p.logits_epsilon,
                                export_dir=str(pdir / "model"), export_version=1)
      result = logits_augmentation.augment(cfg)
      return {"saved_model": result.saved_model_path,
              **{k: v for k, v in result.to_dict().items() if k != "saved_model_path"}}
    return self._parent(p.key, "augment", build)

  # ----------------------------------------------------------------- points

  def test_arrays(self):
    if self._test is None:
      self._test = data.load_arrays(self.c.dataset, "test", limit=self.c.train.test_limit,
                                    data_dir=self.c.data_dir, manual_dir=self.c.manual_dir)
    return self._test

  def evaluate_point(self, p: Point) -> dict:
    """Builds what the point needs, attacks it, returns its record (not yet written)."""
    from keras_defense import attacks  # pylint: disable=g-import-not-at-top
    c, e = self.c, self.c.eval
    t0 = time.time()
    m0_path, path = self.m0(p), self.model(p)
    start = time.time()
    m0, model = export.load_model(m0_path), export.load_model(path)
    x, y = self.test_arrays()
    info = data.info(c.dataset, data_dir=c.data_dir, manual_dir=c.manual_dir)
    name = p.model_name
    cells = self.dir / "work" / p.m0_key / "cells"
    rows, _ = evaluation.evaluate({SOURCE: m0, name: model}, x, y, e, source=SOURCE,
                                  num_classes=info.num_classes, cells_dir=cells,
                                  progress=progress_lib.labelled(self.progress, f"{p.key} attacks"))
    n = len(x) if e.eval_size is None else min(len(x), int(e.eval_size))
    pred = attacks.predict_classes(model, x)
    correct = pred[:n] == y[:n]
    fooled, _ = evaluation.fooled_mask(cells, [SOURCE, name], SOURCE, e, model=name,
                                       epsilon=c.epsilon, n=n)
    robust = correct & ~fooled
    autoattack = None
    if e.autoattack_version != "none":
      autoattack, aa_robust = self._autoattack(p, path)
      n = min(n, len(aa_robust))
      robust = robust[:n] & aa_robust[:n]
    total0, _ = models_lib.count_weights(m0)
    total, nonzero = models_lib.count_weights(model)
    k = int(robust.sum())
    lo, hi = statistics.wilson_interval(k, n)
    success = {}
    for r in rows:
      if r["model"] == name:
        success[_success_column(r["threat_model"], r["attack"], r["targeted"])] = {
            k2: r[k2] for k2 in ("n", "successes", "success_rate", "ci_low", "ci_high")}
    return {
        "key": p.key, **p.coordinates(),
        "eps": c.epsilon, "threat_model": THREAT_MODEL, "n_examples": n,
        "clean_acc": float(np.mean(pred == y)), "n_clean": int(len(y)),
        "robust_acc": k / n, "robust_ci95": [lo, hi], "n_robust": k,
        "robust_acc_definition": (
            "per-image worst case at eps over every FGSM/BIM cell of the grid on this model"
            + (" and AutoAttack" if autoattack else "")),
        "autoattack": autoattack,
        "nonzero_params": nonzero, "total_params": total,
        "compression_ratio": total0 / max(nonzero, 1),
        "zero_gradient_fraction": float(attacks.zero_gradient_fraction(model, x[:n], y[:n])),
        "success": success, "saved_model": _relative(path, self.dir),
        "m0_saved_model": _relative(m0_path, self.dir),
        "seconds": time.time() - start, "build_seconds": start - t0,
    }

  def _autoattack(self, p: Point, path: str) -> tuple[dict, np.ndarray]:
    from keras_defense.evaluation import robustness  # pylint: disable=g-import-not-at-top
    from keras_defense.pipelines import evaluate  # pylint: disable=g-import-not-at-top
    c, e = self.c, self.c.eval
    info = data.info(c.dataset, data_dir=c.data_dir, manual_dir=c.manual_dir)
    n = info.num_test if e.autoattack_size is None else min(int(e.autoattack_size),
                                                            info.num_test)
    settings = {"version": e.autoattack_version, "eps": c.epsilon, "n": n,
                "batch_size": e.autoattack_batch_size, "seed": e.seed,
                "compute_dtype": e.compute_dtype}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    aa_dir = self.dir / "work" / p.key / "autoattack" / tag
    result = evaluate.run(robustness.RobustnessConfig(
        model=path, run_dir=str(aa_dir), dataset=c.dataset, norm="linf",
        epsilons=(c.epsilon,), n_examples=n, version=e.autoattack_version,
        output_key="logits", seed=e.seed, batch_size=e.autoattack_batch_size,
        compute_dtype=e.compute_dtype, data_dir=c.data_dir, manual_dir=c.manual_dir),
        progress=progress_lib.labelled(self.progress, f"{p.key} AutoAttack"))
    masks = robustness.robust_masks(aa_dir)
    mask = next(v for eps, v in masks.items() if np.isclose(eps, c.epsilon))
    lo, hi = statistics.wilson_interval(int(mask.sum()), len(mask))
    return {"version": e.autoattack_version, "n_examples": result.n,
            "clean_acc": result.clean_acc, "robust_acc": result.robust_acc[0],
            "robust_ci95": [lo, hi], "attacks": list(result.attacks),
            "dir": str(aa_dir.relative_to(self.dir))}, mask


def _relative(path: str, root: pathlib.Path) -> str:
  """``path`` relative to ``root`` when it lies inside it (else as given)."""
  try:
    return str(pathlib.Path(path).relative_to(root))
  except ValueError:
    return path


def _train_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(training.TrainConfig)}


def _success_column(threat_model: str, attack: str, targeted: bool) -> str:
  return f"{threat_model}_{attack}{'_targeted' if targeted else ''}_success"


def success_columns(config: SweepConfig) -> list[str]:
  """The success-rate columns of the grid, in a stable order."""
  return [_success_column(t, a, tg) for t in config.eval.threat_models
          for a in config.eval.attacks for tg in config.eval.targeted_modes]


def _bind(run_dir: pathlib.Path, identity: dict) -> None:
  """Writes sweep.json, or refuses a run directory made with other settings."""
  io_utils.bind_settings(run_dir / "sweep.json", identity, what="a sweep")


def load_points(config: SweepConfig) -> tuple[list[dict], list[str]]:
  """The grid's finished points (grid order, each once) and the keys still missing."""
  run_dir = pathlib.Path(config.run_dir)
  found, missing = [], []
  for p in config.points():
    path = run_dir / "points" / f"{p.key}.json"
    if path.is_file():
      found.append(io_utils.read_json(path))
    else:
      missing.append(p.key)
  return found, missing


def run(config: SweepConfig, *, progress: Progress | None = None) -> SweepResult:
  """Builds and evaluates this shard's points (skipping finished ones), then reports.

  Args:
    config: the sweep (validated here).
    progress: called as ``progress(done, total, description)``.

  Returns:
    A ``SweepResult`` over the whole grid (every shard's points found on disk).

  Raises:
    UserError: a bad config, a run directory of other settings, a parent
      missing and its stage not in ``stages``.
  """
  config.validate()
  sweep = _Sweep(config, progress)
  sweep.dir.mkdir(parents=True, exist_ok=True)
  _bind(sweep.dir, config.identity())
  training.setup_determinism(config.seed, config.deterministic)
  computed = []
  mine = config.shard()
  build_only = "attack" not in config.stages
  for i, p in enumerate(mine):
    sweep.progress(i, len(mine), p.key)
    if sweep.point_path(p.key).is_file():
      logging.info("point %s: finished, skipped", p.key)
      continue
    if build_only:
      if any(s in config.stages for s in ("train", "prune", "augment")):
        # Only the parents the requested stages make.
        if "augment" in config.stages:
          sweep.model(p)
        elif "prune" in config.stages:
          sweep.pruned(p)
        else:
          sweep.m0(p)
      continue
    logging.info("point %s: running", p.key)
    record = sweep.evaluate_point(p)
    io_utils.write_json(sweep.point_path(p.key), record)
    computed.append(p.key)
  sweep.progress(len(mine), len(mine), "points done")
  points, missing = load_points(config)
  artifacts = {}
  if "report" in config.stages:
    from keras_defense.reports import sweep_report  # pylint: disable=g-import-not-at-top
    # Shards ending together: one report at a time, each from the points on disk.
    with file_lock.hold(sweep.dir / "report.lock", stale_seconds=config.lock_timeout):
      points, missing = load_points(config)
      artifacts = sweep_report.write(config, points, missing)
  if missing:
    logging.warning("%d of %d points missing: %s", len(missing), len(config.points()),
                    ", ".join(missing))
  return SweepResult(points=points, missing=missing, computed=computed, artifacts=artifacts)
