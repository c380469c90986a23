"""Defenses side by side (issue 14): build or reuse each defended model, attack all alike.

``run(config)`` walks ``config.rows`` in order. A ``Row`` is a name and the
``Step``s that make its model, each step one defense from
``keras_defense.defenses``:

* ``train`` (``training.TrainConfig``: standard, adversarial or distillation
  training), ``prune`` (``pruning.PruneConfig``, plain or robust pruning),
  ``augment`` (``logits_augmentation.AugmentConfig``): the model is the step's
  ``<export_dir>/1``, reused when it exists, else built (resuming from the
  step's own ``run_dir``). A later step or row may use an earlier one's
  export as its base model (M1-AT prunes M0-AT; the distilled student reads
  its teacher).
* ``dropout`` (``DefensiveDropoutConfig`` on the SavedModel ``base``): the
  randomized model, exported to ``<run_dir>/models/<row key>/1``.
* ``saved``: an existing SavedModel, used as it is.

The first row is the reference (M0): compression ratios are relative to it and
the transfer threat model crafts on it. Every row gets the same evaluation:

* clean accuracy on the whole test split; weights, compression, zero-gradient
  fraction; the seconds its build took (``train_result.json`` /
  ``prune_result.json`` in the step's run directory, when there is one);
* the FGSM/BIM grid of ``evaluation.evaluate`` (grey-box, transfer from the
  reference, adaptive margin loss) at every ``eval.epsilons``;
* AutoAttack (``evaluate.run``, ``eval.autoattack_version``) at
  ``eval.autoattack_eps`` on the first ``eval.autoattack_size`` test images,
  the ε = 1 sanity run, and for randomized rows (Defensive Dropout) also the
  ``rand`` version (expectation over transformation) beside it;
* robust accuracy per image, worst case over AutoAttack (both versions for a
  randomized row) and every grid cell at that ε, with Wilson intervals;
* the masking warnings of ``diagnostics`` plus, for randomized rows, a warning
  where plain gradients leave more images robust than EOT;
* certified accuracy at every AutoAttack ε (``comparison_certification``, at
  report time from the saved models: IBP ∪ CROWN-IBP by default), n/a with
  the reason for randomized rows and models the bounds cannot read.

Run-directory layout::

  <run_dir>/comparison.json          the run's binding (the evaluation settings)
  <run_dir>/models/<key>/1           Defensive Dropout models built here
  <run_dir>/attack/cells/            the grid's cells (shared: the reference's are reused)
  <run_dir>/autoattack/<key>/<tag>/  evaluate.run per row (and <key>_rand, _sanity)
  <run_dir>/rows/<key>.json          one finished row (written last, atomically)
  <run_dir>/certified/<key>.json     its certified record (made at report time)
  <run_dir>/stale/<key>-<sha>/       a row's results set aside when its model changed

A rerun skips finished rows and resumes an interrupted one (its build from
the step's checkpoints, the grid from its last cell, AutoAttack from its last
(ε, attack)). A finished row whose model changed since (its SHA-256 is in the
row) is evaluated again: its row file, the grid cells that scored it and its
AutoAttack runs move to ``<run_dir>/stale/<key>-<old SHA-256[:12]>/`` first
(``comparison_rows``). If
the reference's model changed, every row's transfer cells are stale: the run
refuses and asks for a new run directory. ``defense_comparison_report.write``
renders the report; ``report_only`` renders it from the rows finished so far
(while another process is still working on the rest), listing the missing ones.

Example:
  >>> run(ComparisonConfig(run_dir="runs/mnist_defenses", report_dir="reports/mnist/defenses",
  ...                      rows=(Row("M0", (Step("saved", path="saved_models/mnist_m0/1"),)),
  ...                            Row("Dropout 0.1", (Step("dropout", path="saved_models/mnist_m0/1",
  ...                                config=DefensiveDropoutConfig(rate=0.1)),))),
  ...                      eval=evaluation.EvalConfig(epsilons=(0.3,), cw_attacks=())))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import time
from typing import Any

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense import defenses
from keras_defense.certify import bounds
from keras_defense.evaluation import diagnostics
from keras_defense.pipelines import bound_run
from keras_defense.pipelines import comparison_rows
from keras_defense.evaluation import grid as evaluation
from keras_defense.models import classifier as clf_lib
from keras_defense.models import export
from keras_defense.util import io_utils
from keras_defense import models as models_lib
from keras_defense.util import progress as progress_lib
from keras_defense.util import randomness
from keras_defense.evaluation import statistics
from keras_defense import training
from keras_defense.util.errors import UserError

KINDS = ("train", "prune", "augment", "dropout", "saved")
THREAT_MODEL = "Linf"
# Plain gradients overstate a randomized model's robustness when EOT leaves at
# least this fraction of the images fewer robust (Athalye et al. 2018, Sec. 4.2).
EOT_GAP = 0.02

Progress = progress_lib.Progress


@dataclasses.dataclass(frozen=True)
class Step:
  """One defense applied on the way to a row's model.

  Attributes:
    kind: one of ``KINDS``.
    config: TrainConfig / PruneConfig / AugmentConfig (train, prune, augment),
      DefensiveDropoutConfig (dropout); None for saved.
    path: dropout: the SavedModel it randomizes; saved: the SavedModel.
    source: where the step came from (a flagfile), for the report.
  """
  kind: str
  config: Any = None
  path: str | None = None
  source: str | None = None

  def validate(self, where: str) -> None:
    if self.kind not in KINDS:
      raise UserError(f"{where}: step kind must be one of {', '.join(KINDS)}; "
                      f"got {self.kind!r}.")
    if self.kind in ("dropout", "saved") and not self.path:
      raise UserError(f"{where}: a {self.kind} step needs a SavedModel path.")
    if self.kind in ("train", "prune", "augment"):
      if self.config is None or not getattr(self.config, "export_dir", None):
        raise UserError(f"{where}: a {self.kind} step's config must set `export_dir` "
                        f"(its model is <export_dir>/1, reused when it exists).")
    if self.kind != "saved":
      if self.config is None:
        raise UserError(f"{where}: a {self.kind} step needs its config.")
      self.config.validate()


@dataclasses.dataclass(frozen=True)
class Row:
  """A row of the table: its name and the steps that make its model."""
  name: str
  steps: tuple[Step, ...]

  @property
  def key(self) -> str:
    """The name in file paths and attack cells: lower case, runs of other characters -> _."""
    return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

  @property
  def randomized(self) -> bool:
    return any(s.kind == "dropout" for s in self.steps)


@dataclasses.dataclass
class ComparisonConfig:
  """The comparison. ``eval`` is kd-experiment's attack grid and AutoAttack settings."""
  run_dir: str
  rows: tuple[Row, ...]
  eval: evaluation.EvalConfig
  report_dir: str | None = None  # None: <run_dir>
  dataset: str = "mnist"
  data_dir: str | None = None
  manual_dir: str | None = None
  seed: int = 0
  deterministic: bool = True
  build: bool = True  # False: a row whose model is missing is an error, not built
  report_only: bool = False  # True: render the report from the finished rows, run nothing
  # Bound methods of the certified column (comparison_certification); () for none.
  certify: tuple[str, ...] = ("ibp", "crown_ibp")
  command: str | None = None

  def validate(self) -> "ComparisonConfig":
    """Checks every field and step; returns self. Raises UserError naming the field."""
    training.check_output_dir("run_dir", self.run_dir)
    if self.report_dir:
      training.check_output_dir("report_dir", self.report_dir)
    if not self.rows:
      raise UserError("`rows` must name at least one defense (the first is the reference).")
    keys = {}
    for row in self.rows:
      if not row.key:
        raise UserError(f"`rows`: the name {row.name!r} has no letter or digit.")
      if row.key in keys:
        raise UserError(f"`rows`: {row.name!r} and {keys[row.key]!r} have the same key "
                        f"{row.key!r}; name them apart.")
      keys[row.key] = row.name
      if not row.steps:
        raise UserError(f"`rows`: {row.name!r} has no step.")
      for i, step in enumerate(row.steps):
        step.validate(f"row {row.name!r}, step {i + 1}")
        for field in ("dataset", "data_dir", "manual_dir"):
          if step.config is not None and hasattr(step.config, field) and \
              getattr(step.config, field) != getattr(self, field):
            raise UserError(
                f"row {row.name!r}, step {i + 1} ({step.source or step.kind}): its "
                f"`{field}` is {getattr(step.config, field)!r} but the comparison's is "
                f"{getattr(self, field)!r}: every row must use the comparison's data.")
    if self.rows[0].randomized:
      raise UserError(f"`rows`: the first row ({self.rows[0].name!r}) is the reference "
                      f"model of the transfer attacks and must not be randomized.")
    data.split_name(self.dataset)
    self.eval.validate()
    if self.eval.cw_attacks:
      raise UserError(f"`cw_attacks` must be empty for the defenses comparison (its grid is "
                      f"ε-bounded); got {list(self.eval.cw_attacks)}.")
    bounds.check_methods(self.certify, "certify")
    if self.eval.autoattack_version == "none":
      raise UserError("`autoattack_version` must not be 'none': the comparison's verdict "
                      "is AutoAttack's.")
    return self

  @property
  def report_path(self) -> pathlib.Path:
    return pathlib.Path(self.report_dir or self.run_dir)

  def identity(self) -> dict[str, Any]:
    """What the run directory is bound to: data, seed and the evaluation (not the rows)."""
    ev = {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(self.eval).items()}
    return json.loads(json.dumps({"dataset": self.dataset, "seed": self.seed,
                                  "deterministic": self.deterministic, "eval": ev},
                                 default=str))


def _bind(run_dir: pathlib.Path, identity: dict) -> None:
  io_utils.bind_settings(run_dir / "comparison.json", identity, what="a defenses comparison")


def _version_dir(config) -> pathlib.Path:
  return pathlib.Path(config.export_dir) / "1"


def _result_seconds(step: Step) -> float | None:
  """The build's wall seconds from its run directory's result file, if it has one."""
  run_dir = getattr(step.config, "run_dir", None)
  if not run_dir:
    return None
  for name in ("train_result.json", "prune_result.json"):
    path = pathlib.Path(run_dir) / name
    if path.is_file():
      seconds = io_utils.read_json(path).get("wall_seconds")
      return None if seconds is None else float(seconds)
  return None


class _Comparison:
  """Builds and evaluates rows of one comparison."""

  def __init__(self, config: ComparisonConfig, progress: Progress | None):
    self.c = config
    self.dir = pathlib.Path(config.run_dir)
    self.progress = progress or (lambda *_: None)
    self._test = None
    self._info = None

  @property
  def info(self):
    if self._info is None:
      self._info = data.info(self.c.dataset, data_dir=self.c.data_dir,
                             manual_dir=self.c.manual_dir)
    return self._info

  def test_arrays(self):
    if self._test is None:
      self._test = data.load_arrays(self.c.dataset, "test", data_dir=self.c.data_dir,
                                    manual_dir=self.c.manual_dir)
    return self._test

  def row_path(self, row: Row) -> pathlib.Path:
    return comparison_rows.row_path(self.dir, row.key)

  # ------------------------------------------------------------------ models

  def step_model(self, row: Row, step: Step) -> tuple[str, dict]:
    """The step's SavedModel (built if missing and allowed) and how it was got."""
    if step.kind == "saved":
      return self._existing(row, step.path, step), {"built": False, "seconds": None}
    if step.kind == "dropout":
      return self._dropout(row, step)
    path = _version_dir(step.config)
    if (path / "saved_model.pb").is_file():
      export.check_model_dataset(path, self.c.dataset, what=f"row {row.name!r}")
      return str(path), {"built": False, "seconds": _result_seconds(step)}
    if not self.c.build:
      raise UserError(f"row {row.name!r}: no SavedModel at {str(path)!r} and building is "
                      f"off; build it ({step.source or step.kind}) or allow building.")
    config = dataclasses.replace(step.config, export_version=1)
    logging.info("row %s: building %s (%s)", row.name, path, step.source or step.kind)
    start = time.time()
    if step.kind == "train":
      result = defenses.train(config)
    elif step.kind == "prune":
      from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
      result = pruning.prune(config)
    else:
      from keras_defense.defenses import logits_augmentation  # pylint: disable=g-import-not-at-top
      result = logits_augmentation.augment(config)
    return result.saved_model_path, {"built": True, "seconds": time.time() - start}

  def _existing(self, row: Row, path: str, step: Step) -> str:
    if not (pathlib.Path(path) / "saved_model.pb").is_file():
      raise UserError(f"row {row.name!r}: no SavedModel at {path!r} "
                      f"({step.source or step.kind}).")
    export.check_model_dataset(path, self.c.dataset, what=f"row {row.name!r}")
    return str(path)

  def _dropout(self, row: Row, step: Step) -> tuple[str, dict]:
    from keras_defense.defenses import base  # pylint: disable=g-import-not-at-top
    from keras_defense.defenses import dropout  # pylint: disable=g-import-not-at-top
    out = self.dir / "models" / row.key
    if (out / "1" / "saved_model.pb").is_file():
      return str(out / "1"), {"built": False, "seconds": None}
    base_path = self._existing(row, step.path, step)
    start = time.time()
    model, record = dropout.defensive_dropout(
        export.load_model(base_path), base.DataSpec(self.c.dataset), step.config)
    facts = export.read_provenance(base_path) or {}
    prov = {**facts, "stage": "defensive_dropout", "base_model": base_path,
            "defense": json.loads(json.dumps(record, default=str))}
    saved = export.export_saved_model(model, out, version=1, provenance=prov)
    return saved, {"built": True, "seconds": time.time() - start}

  def model(self, row: Row) -> tuple[str, list[dict]]:
    """Builds (or reuses) every step of ``row``; returns its model and the steps' records."""
    path, records = None, []
    for step in row.steps:
      path, record = self.step_model(row, step)
      records.append({"kind": step.kind, "source": step.source, "saved_model": path, **record})
    return path, records

  # -------------------------------------------------------------- evaluation

  def _autoattack(self, row: Row, path: str, version: str, suffix: str = ""
                  ) -> tuple[dict, dict | None]:
    from keras_defense.evaluation import robustness  # pylint: disable=g-import-not-at-top
    from keras_defense.pipelines import evaluate  # pylint: disable=g-import-not-at-top
    e = self.c.eval
    n = self.info.num_test if e.autoattack_size is None else min(int(e.autoattack_size),
                                                                 self.info.num_test)
    settings = {"version": version, "epsilons": list(e.autoattack_eps), "n": n,
                "batch_size": e.autoattack_batch_size, "seed": e.seed,
                "compute_dtype": e.compute_dtype, "sanity": [e.sanity_epsilon, e.sanity_size]}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    root = self.dir / "autoattack" / f"{row.key}{suffix}" / tag
    common = dict(model=path, dataset=self.c.dataset, norm="linf", version=version,
                  output_key="logits", seed=e.seed, batch_size=e.autoattack_batch_size,
                  compute_dtype=e.compute_dtype, data_dir=self.c.data_dir,
                  manual_dir=self.c.manual_dir,
                  slice_size=max(1, n))  # one slice, as auto_attack and the committed rows
    label = f"{row.name}{' EOT' if suffix else ''}"
    evaluate.run(robustness.RobustnessConfig(
        run_dir=str(root / "main"), epsilons=tuple(e.autoattack_eps), n_examples=n, **common),
        progress=progress_lib.labelled(self.progress, f"{label} AutoAttack"))
    main = io_utils.read_json(root / "main" / "results.json")
    main["dir"] = str((root / "main").relative_to(self.dir))
    main["masks"] = {f"{k:g}": v for k, v in robustness.robust_masks(root / "main").items()}
    sanity = None
    if e.sanity_size:
      evaluate.run(robustness.RobustnessConfig(
          run_dir=str(root / "sanity"), epsilons=(e.sanity_epsilon,),
          n_examples=min(int(e.sanity_size), n), **common),
          progress=progress_lib.labelled(self.progress, f"{label} sanity"))
      sanity = io_utils.read_json(root / "sanity" / "results.json")
    return main, sanity

  def evaluate(self, row: Row, path: str, reference: str) -> dict:
    """The row's record: facts, grid success, AutoAttack, worst case, warnings."""
    from keras_defense import attacks  # pylint: disable=g-import-not-at-top
    c, e = self.c, self.c.eval
    ref_key = self.c.rows[0].key
    x, y = self.test_arrays()
    model = export.load_model(path)
    ref = model if row.key == ref_key else export.load_model(reference)
    models = {ref_key: ref} if row.key == ref_key else {ref_key: ref, row.key: model}
    cells = self.dir / "attack" / "cells"
    grid_rows, _ = evaluation.evaluate(
        models, x, y, e, source=ref_key, num_classes=self.info.num_classes, cells_dir=cells,
        progress=progress_lib.labelled(self.progress, f"{row.name} FGSM/BIM"))
    grid_rows = [r for r in grid_rows if r["model"] == row.key]
    n_grid = len(x) if e.eval_size is None else min(len(x), int(e.eval_size))
    total0, _ = models_lib.count_weights(ref)
    total, nonzero = models_lib.count_weights(model)
    # Each pass of a randomized model draws its own masks, the same in a resumed run.
    randomness.reseed(model, c.seed, "clean accuracy")
    pred = attacks.predict_classes(model, x)
    randomness.reseed(model, c.seed, "zero-gradient fraction")
    facts = {"clean_accuracy": float(np.mean(pred == y)), "n_test": int(len(y)),
             "total_weights": total, "nonzero_weights": nonzero,
             "compression": total0 / max(nonzero, 1),
             "zero_gradient_fraction": float(attacks.zero_gradient_fraction(
                 model, x[:n_grid], y[:n_grid]))}
    main, sanity = self._autoattack(row, path, e.autoattack_version)
    eot = None
    if row.randomized and e.autoattack_version != "rand":
      eot, _ = self._autoattack(row, path, "rand", suffix="_rand")
    warnings = diagnostics.masking_warnings(
        [dict(r, model=row.name) for r in grid_rows], {row.name: facts})
    warnings += diagnostics.autoattack_warnings({row.name: (main, sanity)})
    per_eps = {}
    for eps in e.autoattack_eps:
      tag = f"{eps:g}"
      aa = np.asarray(main["masks"][tag], bool)
      n = len(aa)
      eot_robust = None
      if eot is not None:
        eot_mask = np.asarray(eot["masks"][tag], bool)
        eot_robust = int(eot_mask.sum())
        if int(aa.sum()) - eot_robust >= EOT_GAP * n:
          warnings.append(
              f"{row.name}: at ε={eps:g}, AutoAttack with plain gradients leaves "
              f"{int(aa.sum())} of {n} images robust but with expectation over "
              f"transformation (version rand) only {eot_robust}: plain gradients of this "
              f"randomized model overstate its robustness.")
        aa = aa & eot_mask
      robust, n_worst, cells_used = aa, n, 0
      if e.attacks and any(np.isclose(eps, g) for g in e.epsilons):
        n_worst = min(n, n_grid)
        fooled, keys = evaluation.fooled_mask(cells, list(models), ref_key, e, model=row.key,
                                              epsilon=eps, n=n_worst)
        robust, cells_used = aa[:n_worst] & ~fooled, len(keys)
      k = int(robust.sum())
      lo, hi = statistics.wilson_interval(k, n_worst)
      aa_k = int(aa.sum())
      aa_lo, aa_hi = statistics.wilson_interval(aa_k, n)
      per_eps[tag] = {"eps": float(eps), "n_examples": n, "autoattack_n_robust": aa_k,
                      "autoattack_robust_acc": aa_k / n, "autoattack_ci95": [aa_lo, aa_hi],
                      "eot_n_robust": eot_robust,
                      "worst_case_n": n_worst, "worst_case_n_robust": k,
                      "worst_case_robust_acc": k / n_worst, "worst_case_ci95": [lo, hi],
                      "grid_cells": cells_used}
    for result in (main, eot):
      if result is not None:
        result.pop("masks", None)
    return {"name": row.name, "key": row.key, "randomized": row.randomized,
            "clean_acc": facts["clean_accuracy"], "facts": facts,
            "threat_model": THREAT_MODEL, "per_eps": per_eps, "grid": grid_rows,
            "n_grid": n_grid, "autoattack": main, "autoattack_eot": eot, "sanity": sanity,
            "warnings": warnings}


@dataclasses.dataclass
class ComparisonResult:
  rows: list[dict]
  missing: list[str]
  computed: list[str]
  artifacts: dict[str, str]


def run(config: ComparisonConfig, *, progress: Progress | None = None) -> ComparisonResult:
  """Builds or reuses every row's model, evaluates the rows not yet finished, reports.

  Raises:
    UserError: a bad config, a run directory of other settings, a missing model.
  """
  bound_run.start(config, _bind)
  comp = _Comparison(config, progress)
  computed = []
  reference = None
  for i, row in enumerate(() if config.report_only else config.rows):
    comp.progress(i, len(config.rows), row.name)
    if comp.row_path(row).is_file():
      kept = io_utils.read_json(comp.row_path(row))
      why = comparison_rows.changed(kept)
      if why is None:
        logging.info("row %s: finished, skipped", row.name)
        reference = reference or kept["saved_model"]
        continue
      if i == 0:
        raise UserError(
            f"row {row.name!r} is the reference, and {why}: every row's transfer cells in "
            f"{str(comp.dir)!r} were crafted on the old model. Fix: a new `run_dir` (or "
            f"put the old model back).")
      where = comparison_rows.set_aside(comp.dir, row.key, kept)
      logging.warning("row %s: %s; its old results moved to %s, evaluating it again.",
                      row.name, why, where)
    start = time.time()
    path, steps = comp.model(row)
    reference = reference or path
    built = time.time()
    sha256 = clf_lib.fingerprint(path)
    record = comp.evaluate(row, path, reference)
    record.update({"saved_model": path, "model_sha256": sha256, "steps": steps,
                   "command": config.command,
                   "build_seconds": sum(s["seconds"] or 0 for s in steps)
                   if any(s["seconds"] is not None for s in steps) else None,
                   "built_here_seconds": built - start,
                   "evaluation_seconds": time.time() - built})
    io_utils.write_json(comp.row_path(row), record)
    computed.append(row.name)
  comp.progress(len(config.rows), len(config.rows), "rows done")
  rows, missing = comparison_rows.load_rows(config.run_dir, config.rows)
  if config.certify:  # from the saved models alone: also at the report stage
    from keras_defense.pipelines import comparison_certification as cc  # pylint: disable=g-import-not-at-top
    comp.progress(len(config.rows), len(config.rows), "certifying")
    rows = cc.certify_rows(config, rows)
  from keras_defense.reports import defense_comparison_report  # pylint: disable=g-import-not-at-top
  artifacts = defense_comparison_report.write(config, rows, missing)
  return ComparisonResult(rows=rows, missing=missing, computed=computed, artifacts=artifacts)
