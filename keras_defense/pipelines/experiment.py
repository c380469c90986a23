"""The reproduction: train M0 -> prune M1 -> augment M2 -> attack -> report.

Every stage keeps its artifacts in the run directory and records completion
in ``<run_dir>/stages/<stage>.json``; a rerun skips finished stages and
resumes an interrupted one (training and pruning from their last epoch
checkpoint, the attack grid from its last finished cell).

One dataset, every stage: ``ExperimentConfig.dataset`` (with its ``data_dir``
and ``manual_dir``) is the data of training, pruning, augmentation, attack and
report; a stage config naming another is an error, never silently used.
Model names are m0/m1/m2 (c0/c1/c2 for the CIFAR family); paths use
``data.slug(dataset)`` (<ds> below).

Run-directory layout::

  <run_dir>/m0, m1/                 training / pruning runs (checkpoints, TensorBoard)
  <run_dir>/saved_models/<ds>_m0/1  the three models, TF Serving layout (m1, m2 too)
  <run_dir>/compression/            M1's compression report
  <run_dir>/attack/cells/           one JSON per finished attack cell
  <run_dir>/attack/models.json      clean accuracy, compression, zero-gradient fraction
  <run_dir>/autoattack/<model>/     AutoAttack per model (evaluate.run: per-(ε, attack)
                                    state, results.json); <model>_sanity/ at ε = 1
  <run_dir>/results.json|csv, report.md, plots/, tensorboard/
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense import defenses
from keras_defense.evaluation import diagnostics
from keras_defense.training import distribution
from keras_defense.evaluation import grid as evaluation
from keras_defense.models import export
from keras_defense.util import io_utils
from keras_defense import models as models_lib
from keras_defense.util import progress as progress_lib
from keras_defense.evaluation import statistics
from keras_defense.util.provenance import versions
from keras_defense import training
from keras_defense.util.errors import UserError

STAGES = ("train", "prune", "augment", "attack", "autoattack", "report")


@dataclasses.dataclass
class ExperimentConfig:
  """The whole reproduction. Sub-configs come from the per-model flagfiles.

  ``dataset``, ``data_dir`` and ``manual_dir`` are the run's: every stage uses
  them, and ``validate`` refuses stage configs that name other values.
  """
  run_dir: str
  train: training.TrainConfig
  prune: Any  # pruning.PruneConfig (imported lazily: tfmot is heavy)
  augment: Any  # logits_augmentation.AugmentConfig
  eval: evaluation.EvalConfig
  dataset: str = "mnist"  # tfds name or folder:PATH, optionally @HxWxC (data.split_name)
  stages: tuple[str, ...] = STAGES
  reuse_saved_models: bool = False
  saved_models_dir: str = "saved_models"
  seed: int = 0
  deterministic: bool = True
  strategy: str = "default"  # distribution.STRATEGIES, for train, prune and attack
  num_cpu_devices: int | None = None  # mirrored without GPUs: logical CPU devices
  command: str | None = None
  data_dir: str | None = None
  manual_dir: str | None = None

  @property
  def slug(self) -> str:
    """The dataset's name in file paths (``data.slug``)."""
    return data.slug(self.dataset)

  @property
  def names(self) -> tuple[str, str, str]:
    p = "c" if data.split_name(self.dataset)[0].startswith("cifar") else "m"
    return (f"{p}0", f"{p}1", f"{p}2")

  def data_kwargs(self) -> dict:
    return {"data_dir": self.data_dir, "manual_dir": self.manual_dir}

  def validate(self) -> "ExperimentConfig":
    for s in self.stages:
      if s not in STAGES:
        raise UserError(f"`stages` must be from {', '.join(STAGES)}; got {s!r}.")
    if not self.stages:
      raise UserError("`stages` must name at least one stage; got an empty list.")
    training.check_strategy(self.strategy, self.num_cpu_devices)
    training.check_output_dir("run_dir", self.run_dir)
    data.split_name(self.dataset)  # a usable name, or DataError
    for stage in ("train", "prune", "augment"):
      sub = getattr(self, stage)
      for field in ("dataset", "data_dir", "manual_dir"):
        if getattr(sub, field) != getattr(self, field):
          raise UserError(
              f"the {stage} stage's `{field}` is {getattr(sub, field)!r} but the run's is "
              f"{getattr(self, field)!r}: every stage must use the run's data.")
    self.train.validate()
    self.prune.validate()
    self.augment.validate()
    self.eval.validate()
    return self


class _Run:
  """Stage bookkeeping for one run directory."""

  def __init__(self, config: ExperimentConfig):
    self.config = config
    self.dir = pathlib.Path(config.run_dir)
    self.stage_dir = self.dir / "stages"

  def done(self, stage: str) -> dict | None:
    path = self.stage_dir / f"{stage}.json"
    return io_utils.read_json(path) if path.is_file() else None

  def finish(self, stage: str, record: dict) -> dict:
    io_utils.write_json(self.stage_dir / f"{stage}.json", record)
    return record

  def model_path(self, index: int) -> str:
    name = self.config.names[index]
    if self.config.reuse_saved_models:
      path = pathlib.Path(self.config.saved_models_dir) / f"{self.config.slug}_{name}" / "1"
      if not (path / "saved_model.pb").is_file():
        raise UserError(
            f"--reuse_saved_models: no SavedModel at {str(path)!r}; train it first "
            f"or run without --reuse_saved_models.")
      export.check_model_dataset(path, self.config.dataset, what="--reuse_saved_models")
      return str(path)
    record = self.done(STAGES[index])
    if record is None:
      raise UserError(
          f"stage {STAGES[index]!r} has not finished in {str(self.dir)!r}, so "
          f"{name} does not exist yet; include it in --stages.")
    return record["saved_model"]

  def export_dir(self, index: int) -> str:
    return str(self.dir / "saved_models" / f"{self.config.slug}_{self.config.names[index]}")


def _stage_config(run: _Run, stage: str, *, base_model_path: str | None = None):
  """The config a stage really runs with: the run's data, paths and strategy."""
  c = run.config
  common = dict(dataset=c.dataset, **c.data_kwargs())
  if stage == "train":
    return dataclasses.replace(c.train, **common, run_dir=str(run.dir / c.names[0]),
                               export_dir=run.export_dir(0), export_version=1,
                               strategy=c.strategy, num_cpu_devices=c.num_cpu_devices)
  if stage == "prune":
    return dataclasses.replace(
        c.prune, **common, base_model_path=base_model_path or run.model_path(0),
        run_dir=str(run.dir / c.names[1]), export_dir=run.export_dir(1), export_version=1,
        report_path=str(run.dir / "compression" / f"{c.slug}_{c.names[1]}"),
        strategy=c.strategy, num_cpu_devices=c.num_cpu_devices)
  return dataclasses.replace(c.augment, **common,
                             base_model_path=base_model_path or run.model_path(1),
                             export_dir=run.export_dir(2), export_version=1)


def _stage_train(run: _Run) -> dict:
  result = defenses.train(_stage_config(run, "train"))
  return {"saved_model": result.saved_model_path, **result.to_dict()}


def _stage_prune(run: _Run) -> dict:
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
  result = pruning.prune(_stage_config(run, "prune"))
  return {"saved_model": result.saved_model_path,
          **{k: v for k, v in result.to_dict().items() if k != "saved_model_path"}}


def _stage_augment(run: _Run) -> dict:
  from keras_defense.defenses import logits_augmentation  # pylint: disable=g-import-not-at-top
  result = logits_augmentation.augment(_stage_config(run, "augment"))
  return {"saved_model": result.saved_model_path,
          **{k: v for k, v in result.to_dict().items() if k != "saved_model_path"}}


def describe_models(config: ExperimentConfig, models: dict, paths: dict, x, y) -> dict:
  """Clean accuracy (full test set), weights, compression, zero-gradient fraction."""
  from keras_defense import attacks  # pylint: disable=g-import-not-at-top
  n0 = config.names[0]
  total0, _ = models_lib.count_weights(models[n0])
  p = config.prune
  aug = config.augment
  descriptions = {
      config.names[0]: "unprotected C&W CNN",
      config.names[1]: (f"pruned: {100 * p.dense_sparsity:.1f}% Dense / "
                        f"{100 * p.conv_sparsity:.1f}% Conv zeroed (tfmot)"),
      config.names[2]: (f"{config.names[1]} + {aug.transform} "
                        f"(eps={aug.epsilon:g})"),
  }
  n_eval = len(x) if config.eval.eval_size is None else min(len(x), config.eval.eval_size)
  facts = {}
  for name, model in models.items():
    total, nonzero = models_lib.count_weights(model)
    pred = attacks.predict_classes(model, x)
    facts[name] = {
        "clean_accuracy": float(np.mean(pred == y)), "n_test": int(len(y)),
        "total_weights": total, "nonzero_weights": nonzero,
        "compression": total0 / max(nonzero, 1),
        "zero_gradient_fraction": float(attacks.zero_gradient_fraction(
            model, x[:n_eval], y[:n_eval])),
        "saved_model": paths[name], "description": descriptions[name]}
  return facts


def _stage_attack(run: _Run, progress=None) -> dict:
  c = run.config
  paths = {name: run.model_path(i) for i, name in enumerate(c.names)}
  models = {name: export.load_model(p) for name, p in paths.items()}
  x, y = data.load_arrays(c.dataset, "test", **c.data_kwargs())
  info = data.info(c.dataset, **c.data_kwargs())
  facts_path = run.dir / "attack" / "models.json"
  if facts_path.is_file():
    facts = io_utils.read_json(facts_path)
  else:
    facts = describe_models(c, models, paths, x, y)
    io_utils.write_json(facts_path, facts)
  rows, _ = evaluation.evaluate(models, x, y, c.eval, source=c.names[0],
                                num_classes=info.num_classes,
                                cells_dir=run.dir / "attack" / "cells", progress=progress,
                                strategy=None if c.strategy == "default" else
                                distribution.make_strategy(
                                    c.strategy, num_cpu_devices=c.num_cpu_devices))
  return {"rows": len(rows)}


def _autoattack_settings(e: evaluation.EvalConfig) -> dict:
  """What decides the AutoAttack stage's numbers (its record and folder are keyed by it)."""
  return {"version": e.autoattack_version, "epsilons": list(e.autoattack_eps),
          "size": e.autoattack_size, "batch_size": e.autoattack_batch_size,
          "sanity_epsilon": e.sanity_epsilon, "sanity_size": e.sanity_size,
          "seed": e.seed, "compute_dtype": e.compute_dtype}


def _autoattack_dir(run: _Run) -> pathlib.Path:
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256(json.dumps(_autoattack_settings(run.config.eval),
                                  sort_keys=True).encode()).hexdigest()[:10]
  return run.dir / "autoattack" / key


def _stage_autoattack(run: _Run, progress=None) -> dict:
  """AutoAttack on every model at the AutoAttack ε, and the ε = 1 sanity check.

  Each model's evaluation is an ``evaluate.run`` in
  ``<run_dir>/autoattack/<settings key>/<model>``, resumable per (ε, attack).
  """
  from keras_defense.evaluation import robustness  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import evaluate  # pylint: disable=g-import-not-at-top
  c = run.config
  e = c.eval
  settings = _autoattack_settings(e)
  if e.autoattack_version == "none":
    return {"models": {}, "settings": settings, "dir": None}
  root = _autoattack_dir(run)
  info = data.info(c.dataset, **c.data_kwargs())
  n = info.num_test if e.autoattack_size is None else min(int(e.autoattack_size), info.num_test)
  # One slice (robustness_state): the whole sample attacked together, as auto_attack does
  # and as the committed reports were made; slices matter only to kd-evaluate's shards.
  common = dict(dataset=c.dataset, norm="linf", version=e.autoattack_version,
                output_key="logits", seed=e.seed, batch_size=e.autoattack_batch_size,
                compute_dtype=e.compute_dtype, slice_size=max(1, n), **c.data_kwargs())
  models = {}
  for i, name in enumerate(c.names):
    path = run.model_path(i)
    main = evaluate.run(robustness.RobustnessConfig(
        model=path, run_dir=str(root / name),
        epsilons=e.autoattack_eps, n_examples=n, **common),
        progress=progress_lib.labelled(progress, f"AutoAttack {name}"))
    models[name] = {"dir": str(root / name), "robust_acc": main.robust_acc}
    if e.sanity_size:
      sanity = evaluate.run(robustness.RobustnessConfig(
          model=path, run_dir=str(root / f"{name}_sanity"),
          epsilons=(e.sanity_epsilon,), n_examples=min(int(e.sanity_size), n), **common),
          progress=progress_lib.labelled(progress, f"AutoAttack {name} sanity"))
      models[name]["sanity_dir"] = str(root / f"{name}_sanity")
      models[name]["sanity_robust_acc"] = sanity.robust_acc[0]
  # Relative to the run directory, so a moved or copied run still finds it.
  return {"models": models, "settings": settings, "dir": str(root.relative_to(run.dir))}


def autoattack_summary(aa_dir: pathlib.Path | None, run_dir: pathlib.Path, names,
                       config: ExperimentConfig) -> dict:
  """Per model: AutoAttack's results.json, its sanity check, and the per-image worst case.

  The worst case at an ε counts an image robust only if AutoAttack and every
  FGSM/BIM cell of the grid at that ε (every threat model, untargeted and
  targeted) failed on it; it covers the images both ran on (the first
  ``min(eval_size, autoattack_size)``).

  Args:
    aa_dir: the AutoAttack stage's folder (its record's "dir"), or None.
    run_dir: the run directory (its attack cells).
    names: the models, source first.
    config: the run's config.
  """
  from keras_defense.evaluation import robustness  # pylint: disable=g-import-not-at-top
  out = {}
  if aa_dir is None:
    return out
  cells = run_dir / "attack" / "cells"
  for name in names:
    d = pathlib.Path(aa_dir) / name
    if not (d / "results.json").is_file():
      continue
    results = io_utils.read_json(d / "results.json")
    sanity_file = pathlib.Path(aa_dir) / f"{name}_sanity" / "results.json"
    masks = robustness.robust_masks(d)
    worst = {}
    for eps, aa_robust in masks.items():
      if not any(np.isclose(eps, g) for g in config.eval.epsilons) or not config.eval.attacks:
        continue
      n_grid = len(aa_robust) if config.eval.eval_size is None else int(config.eval.eval_size)
      n = min(len(aa_robust), n_grid)
      fooled, keys = evaluation.fooled_mask(cells, list(names), names[0], config.eval,
                                            model=name, epsilon=eps, n=n)
      robust = aa_robust[:n] & ~fooled
      lo, hi = statistics.wilson_interval(int(robust.sum()), n)
      worst[f"{eps:g}"] = {"eps": eps, "n": n, "n_robust": int(robust.sum()),
                           "robust_acc": float(robust.mean()), "ci95": [lo, hi],
                           "autoattack_robust_acc_same_images": float(aa_robust[:n].mean()),
                           "grid_cells": len(keys)}
    out[name] = {"autoattack": results,
                 "sanity": io_utils.read_json(sanity_file) if sanity_file.is_file() else None,
                 "worst_case": worst}
  return out


def _stage_report(run: _Run, start_time: float) -> dict:
  from keras_defense.reports import experiment_report  # pylint: disable=g-import-not-at-top
  c = run.config
  facts_path = run.dir / "attack" / "models.json"
  if not facts_path.is_file():
    raise UserError(f"no attack results in {str(run.dir)!r} ({facts_path} is missing); "
                    f"run the 'attack' stage first.")
  facts = io_utils.read_json(facts_path)
  names = list(c.names)
  cells = run.dir / "attack" / "cells"
  groups = evaluation.build_groups(names, names[0], c.eval)
  rows, examples = [], []
  for g in groups:
    for plan in g.plans:
      key = evaluation.cell_key(plan, g.attack, g.targeted, g.epsilon)
      if not (cells / f"{key}.json").is_file():
        raise UserError(f"attack cell {key} is missing in {str(cells)!r}; run the "
                        f"'attack' stage first.")
      rows.append(io_utils.read_json(cells / f"{key}.json"))
      examples.extend(evaluation.load_example(cells, key))
  aa_record = run.done("autoattack") or {}
  aa_dir = aa_record.get("dir")
  autoattack = autoattack_summary(None if aa_dir is None else run.dir / aa_dir,
                                  run.dir, names, c)
  warnings = diagnostics.masking_warnings(rows, facts) + diagnostics.autoattack_warnings(
      {name: (s["autoattack"], s["sanity"]) for name, s in autoattack.items()})
  for w in warnings:
    logging.warning("GRADIENT MASKING: %s", w)
  stage_seconds = {s: (run.done(s) or {}).get("stage_seconds") for s in STAGES}
  wall = sum(v for v in stage_seconds.values() if v) + (time.time() - start_time)
  config_dict = _config_dict(run)
  config_dict["stage_seconds"] = stage_seconds
  # The command that made the run: the first stage's (a report re-rendered
  # later by `--stages=report` keeps it).
  commands = [(run.done(s) or {}).get("command") for s in STAGES[:-1]]
  command = next((cmd for cmd in commands if cmd), c.command)
  info = data.info(c.dataset, validation_size=c.train.validation_size, **c.data_kwargs())
  paths = experiment_report.write_report(
      str(run.dir), rows=rows, models=facts, warnings=warnings, config=config_dict,
      versions=versions(), examples=examples, wall_seconds=wall, command=command,
      title=c.dataset.upper() if "/" not in c.dataset and ":" not in c.dataset else c.dataset,
      dataset=info.to_dict(), autoattack=autoattack)
  return {"artifacts": paths, "warnings": warnings}


def _config_dict(run: _Run) -> dict:
  """The run's configuration as the stages really ran it (effective data and model paths)."""
  c = run.config

  def effective(stage: str, index: int):
    try:
      base = None if index < 0 else run.model_path(index)
    except UserError:  # that model does not exist yet: show the config as given
      return getattr(c, stage)
    return _stage_config(run, stage, base_model_path=base)

  def plain(v):
    if dataclasses.is_dataclass(v):
      return {k: plain(x) for k, x in training.config_dict(v).items()}
    if isinstance(v, tuple):
      return list(v)
    return v
  return {"run_dir": c.run_dir, "dataset": c.dataset, "stages": list(c.stages),
          "reuse_saved_models": c.reuse_saved_models, "seed": c.seed,
          "deterministic": c.deterministic, "train": plain(effective("train", -1)),
          "prune": plain(effective("prune", 0)), "augment": plain(effective("augment", 1)),
          "eval": plain(c.eval)}


def run(config: ExperimentConfig, *, progress=None) -> dict:
  """Runs the requested stages, skipping finished ones; returns the stage records.

  Raises:
    UserError: bad config, missing models or data.
  """
  config.validate()
  # Before any TF op: logical CPU devices for a mirrored strategy.
  strategy = distribution.make_strategy(config.strategy, num_cpu_devices=config.num_cpu_devices)
  if not distribution.is_chief(strategy):  # a non-chief worker keeps its own copy
    config = dataclasses.replace(
        config, run_dir=distribution.output_path(config.run_dir, strategy))
  run_ = _Run(config)
  if config.reuse_saved_models:  # every reused model is of the run's dataset, before any write
    for index in range(len(config.names)):
      run_.model_path(index)
  run_.dir.mkdir(parents=True, exist_ok=True)
  training.setup_determinism(config.seed, config.deterministic)
  records = {}
  for stage in STAGES:
    if stage not in config.stages:
      continue
    if config.reuse_saved_models and stage in ("train", "prune", "augment"):
      logging.info("stage %s: reusing %s", stage, run_.model_path(STAGES.index(stage)))
      continue
    record = run_.done(stage)
    if (stage == "autoattack" and record is not None
        and record.get("settings") != _autoattack_settings(config.eval)):
      logging.info("stage autoattack: settings changed since it finished, running it again")
      record = None
    if stage != "report" and record is not None:
      logging.info("stage %s: already finished, skipped", stage)
      records[stage] = record
      continue
    logging.info("stage %s: running", stage)
    start = time.time()
    if stage == "train":
      record = _stage_train(run_)
    elif stage == "prune":
      record = _stage_prune(run_)
    elif stage == "augment":
      record = _stage_augment(run_)
    elif stage == "attack":
      record = _stage_attack(run_, progress_lib.labelled(progress, "attack grid"))
    elif stage == "autoattack":
      record = _stage_autoattack(run_, progress)
    else:
      record = _stage_report(run_, start)
    record["stage_seconds"] = time.time() - start
    record["command"] = config.command
    records[stage] = run_.finish(stage, record)
  return records
