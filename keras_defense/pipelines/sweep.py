"""Robustness against compression: the sweep's execution over its grid.

``run(config)`` evaluates every point of the grid (``evaluation.sweep_grid``:
method x (Dense, Conv) sparsity pair x logits ε, and the points' keys) on top
of the existing stages, reusing trained *parents*: one M0 per method
(``training.train``, or a given SavedModel), one pruned model per (method,
sparsity) (``pruning.prune``; sparsity 0:0 is M0 itself, not fine-tuned), one
augmented model per (method, sparsity, ε) (``logits_augmentation.augment``;
ε = 0 is the pruned model itself). A point's attacks are the attack grid of
``evaluation.evaluate`` (FGSM/BIM, grey-box / transfer from M0 / adaptive) at
one ε, and AutoAttack through ``evaluate.run`` when
``eval.autoattack_version != "none"``; ``reports.sweep_report`` writes the report.

A quantized point (``quantization`` ptq_int8 / qat_int8) is its float point's
model converted by ``compression.quantize`` (kd-quantize's library; stage
``quantize``; qat_int8 also exports its QAT twin) into a ``.tflite``, a parent
like the others. It has no gradients, so its attack stage is kd-evaluate's
black-box ensemble (``evaluation.black_box`` through ``evaluate.run``) on the
LiteRT interpreter: transfer from the float point, BPDA through the QAT twin
(qat_int8), Square; robust accuracy is that ensemble's per-image worst case on
the AutoAttack images, with clean accuracy on the interpreter, top-1 agreement
with the float point, and the bytes (raw, gzip) of what ships
(``sweep_quantization``).

Run-directory layout::

  <run_dir>/sweep.json                 the run's binding (settings outside the grid)
  <run_dir>/parents/<key>/             model/1 (SavedModel), run/ (checkpoints),
                                       done.json (finished), lock (while building)
  <run_dir>/work/<method>__s<seed>/cells/   attack cells of every point of the method
  <run_dir>/work/<key>/autoattack/     evaluate.run of the point
  <run_dir>/parents/<key>__<q>/        a quantized point's model.tflite (+ twin/1 for qat_int8)
  <run_dir>/work/<key>__<q>/black_box/ its black-box evaluate.run
  <run_dir>/points/<key>.json          one finished point (written last, atomically)
  <run_dir>/sweep.csv, report.md, plots/, tensorboard/   (sweep_report)

Loaded models: each SavedModel is loaded once per run and the object kept
(``_Sweep.load_model``, by real path, the last ``MODELS_KEPT`` used): M0 serves
every point of its method (the transfer source, and the model of the unpruned
ε = 0 point), a float model its quantized points, and a kept object keeps the
attack graphs traced on it (``attacks.runtime``'s per-model cache), so they
are traced once per model, not once per point.

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

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense import defenses
from keras_defense.evaluation import grid as evaluation
from keras_defense.pipelines import bound_run
from keras_defense.models import export
from keras_defense.util import file_lock
from keras_defense.util import io_utils
from keras_defense import models as models_lib
from keras_defense.util import progress as progress_lib
from keras_defense.evaluation import statistics
from keras_defense.evaluation import sweep_grid
from keras_defense.evaluation.sweep_grid import Point
from keras_defense.evaluation.sweep_grid import SweepConfig
from keras_defense.compression import measurement
from keras_defense.pipelines import sweep_quantization
from keras_defense.reports import sweep_report
from keras_defense import training
from keras_defense.util.errors import UserError

SOURCE = "m0"  # the attack grid's name of the method's M0 (transfer source)

Progress = progress_lib.Progress

# Loaded models kept by a run. Grid order (method, sparsity, logits ε, quantization)
# uses M0 at every point of its method and a float model at its consecutive
# quantized points, so the last few used hold every model needed again, while a
# long grid does not hold all its models in memory.
MODELS_KEPT = 4


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
    self._models: collections.OrderedDict[str, Any] = collections.OrderedDict()

  def load_model(self, path: str) -> Any:
    """The SavedModel at ``path`` (``export.load_model``), loaded once and kept while it
    is among the ``MODELS_KEPT`` last used, so its traced attack graphs are reused."""
    key = os.path.realpath(path)
    if key in self._models:
      self._models.move_to_end(key)
    else:
      self._models[key] = export.load_model(path)
      while len(self._models) > MODELS_KEPT:
        self._models.popitem(last=False)
    return self._models[key]

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
          **({"adversarial": self._attack(p.method)}
             if "adversarial" in _train_fields() else {}))
      result = defenses.train(cfg)
      return {"saved_model": result.saved_model_path, **result.to_dict()}
    return self._parent(p.m0_key, "train", build)

  def _attack(self, method: str) -> training.AdversarialSpec | None:
    """The training attack of ``method``: None for standard training."""
    if method == sweep_grid.STANDARD:
      return None
    return dataclasses.replace(self.c.adversarial or training.AdversarialSpec(method),
                               method=method)

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
    """The point's float model: the augmented parent (the pruned one at logits ε = 0); of a
    quantized point, the float model it converts."""
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
    return self._parent(p.float_key, "augment", build)

  # ----------------------------------------------------------------- points

  def test_arrays(self):
    if self._test is None:
      self._test = data.load_arrays(self.c.dataset, "test", limit=self.c.train.test_limit,
                                    data_dir=self.c.data_dir, manual_dir=self.c.manual_dir)
    return self._test

  def quantized(self, p: Point) -> tuple[str, str | None]:
    """A quantized point's .tflite and QAT twin (None for ptq_int8), built once."""
    base = self.model(p.float_point())
    path = self._parent(p.key, "quantize",
                        lambda pdir: sweep_quantization.build(self.c, p, base, pdir))
    return sweep_quantization.check_built(self.c, p, self.parent_dir(p.key), path)

  def evaluate_point(self, p: Point) -> dict:
    """Builds what the point needs, attacks it, returns its record (not yet written)."""
    from keras_defense import attacks  # pylint: disable=g-import-not-at-top
    if p.quantized:
      return sweep_quantization.evaluate(self, p)
    c, e = self.c, self.c.eval
    t0 = time.time()
    m0_path, path = self.m0(p), self.model(p)
    start = time.time()
    m0, model = self.load_model(m0_path), self.load_model(path)
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
    success = {}
    for r in rows:
      if r["model"] == name:
        success[sweep_grid.success_column(r["threat_model"], r["attack"], r["targeted"])] = {
            k2: r[k2] for k2 in ("n", "successes", "success_rate", "ci_low", "ci_high")}
    return {
        **sweep_grid.record_head(
            c, p, clean_acc=float(np.mean(pred == y)), n_clean=int(len(y)), n=n, n_robust=k,
            definition=("per-image worst case at eps over every FGSM/BIM cell of the grid on "
                        "this model" + (" and AutoAttack" if autoattack else ""))),
        "autoattack": autoattack,
        "nonzero_params": nonzero, "total_params": total,
        "compression_ratio": total0 / max(nonzero, 1),
        "zero_gradient_fraction": float(attacks.zero_gradient_fraction(model, x[:n], y[:n])),
        "success": success, "saved_model": io_utils.relative_to(path, self.dir),
        "bytes": measurement.file_bytes(measurement.saved_model_variables(path)),
        "gzip_bytes": measurement.gzipped_bytes(measurement.saved_model_variables(path)),
        "m0_saved_model": io_utils.relative_to(m0_path, self.dir),
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
        compute_dtype=e.compute_dtype, data_dir=c.data_dir, manual_dir=c.manual_dir,
        slice_size=max(1, n)),  # one slice, as auto_attack and the committed points
        progress=progress_lib.labelled(self.progress, f"{p.key} AutoAttack"))
    masks = robustness.robust_masks(aa_dir)
    mask = next(v for eps, v in masks.items() if np.isclose(eps, c.epsilon))
    lo, hi = statistics.wilson_interval(int(mask.sum()), len(mask))
    return {"version": e.autoattack_version, "n_examples": result.n,
            "clean_acc": result.clean_acc, "robust_acc": result.robust_acc[0],
            "robust_ci95": [lo, hi], "attacks": list(result.attacks),
            "dir": str(aa_dir.relative_to(self.dir))}, mask


def _train_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(training.TrainConfig)}



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
  bound_run.start(config, _bind)
  sweep = _Sweep(config, progress)
  computed = []
  mine = config.shard()
  build_only = "attack" not in config.stages
  for i, p in enumerate(mine):
    sweep.progress(i, len(mine), p.key)
    if p.quantized and (sweep.parent_dir(p.key) / "done.json").is_file():
      # Built with these settings (finished points too: the report would mix them).
      sweep_quantization.check_built(config, p, sweep.parent_dir(p.key), "")
    if sweep.point_path(p.key).is_file():
      logging.info("point %s: finished, skipped", p.key)
      continue
    if build_only:
      # Only the parents the requested stages make (a quantized point's float ones by
      # train/prune/augment, its .tflite by quantize).
      if "quantize" in config.stages and p.quantized:
        sweep.quantized(p)
      elif any(s in config.stages for s in ("train", "prune", "augment")):
        if "augment" in config.stages:
          sweep.model(p.float_point())
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
    # Shards ending together: one report at a time, each from the points on disk.
    with file_lock.hold(sweep.dir / "report.lock", stale_seconds=config.lock_timeout):
      points, missing = load_points(config)
      artifacts = sweep_report.write(config, points, missing)
  if missing:
    logging.warning("%d of %d points missing: %s", len(missing), len(config.points()),
                    ", ".join(missing))
  return SweepResult(points=points, missing=missing, computed=computed, artifacts=artifacts)
