"""Worst-case robust accuracy of any classifier under an attack ensemble, resumable.

The protocol of AutoAttack (Croce & Hein, ICML 2020,
https://arxiv.org/abs/2003.01690) and RobustBench: the first ``n_examples``
test images; an image counts as robust at ε only if it is classified correctly
and *every* attack of the ensemble fails on it. For each ε the attacks of
``autoattack.plan(version, norm, attacks)`` run in order, each only on the
images still robust, so the robust accuracy after an attack is cumulative and
the last one is the per-image worst case.

The ε are processed in increasing order and an image broken at a smaller ε
starts out broken at the larger ones (its adversarial lies in both balls):
the same worst-case numbers for less work. Those images are counted in their
own row ("broken at a smaller ε").

Crash safety: after every (ε, attack) the per-image state (robust mask, the
indices of the images that attack broke and their adversarials) is written
atomically to ``<run_dir>/state/eps_<ε>/<k>_<attack>.npz``; a rerun with the
same configuration loads the finished steps and continues with the next one,
so a kill -9 costs at most one (ε, attack) and gives the same result
(``results.json``, written by ``pipelines.evaluate.run``; timing fields, the keys
ending in ``seconds``, aside). The run directory is bound to its configuration
and model bytes (``run.json``).

Slices and shards (``robustness_state``): the images are attacked in slices of
``slice_size`` (each slice's calls and seeds its own), so ``num_shards``
processes, each taking whole slices into ``<run_dir>/shards/<i>-of-<n>/``,
and ``merge`` give exactly one process's per-image outcomes.

Example:
  >>> config = RobustnessConfig(model="saved_models/mnist_m0/1", output_key="logits",
  ...                           run_dir="runs/eval_m0", epsilons=(0.3,), n_examples=1000)
  >>> result = run(config)
  >>> result.robust_acc
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from keras_defense.models import classifier as clf_lib
from keras_defense.evaluation import black_box
from keras_defense.data import test_images as inputs
from keras_defense.evaluation import replicas
from keras_defense.evaluation import robustness_state as state_lib
from keras_defense.training import distribution
from keras_defense.util import io_utils
from keras_defense.util import provenance
from keras_defense.util import randomness
from keras_defense.attacks import memory
from keras_defense.attacks import runtime
from keras_defense.evaluation import robustness_config as rob_config
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.evaluation.robustness_result import AttackStep
from keras_defense.evaluation.robustness_result import EpsilonResult
from keras_defense.evaluation.robustness_result import RobustnessResult

EXAMPLES_PER_EPSILON = 8  # worst-case adversarials shown per ε in the grid
# Float32 rounding allowed at the ε-ball's edge (as autoattack.auto_attack).
_TOLERANCE = 1e-6

AttackFn = Callable[..., np.ndarray]
Plan = Sequence[tuple[str, AttackFn]]
Progress = Callable[[float, int, str], None]


def _real_plan(version: str, norm: str, attacks: Sequence[str] | None) -> Plan:
  from keras_defense.attacks import autoattack  # pylint: disable=g-import-not-at-top
  return autoattack.plan(version, norm, attacks)


def _bind_run_dir(run_dir: pathlib.Path, identity: dict[str, Any], sha256: str,
                  extra: dict[str, Any] | None = None) -> dict:
  """Writes run.json (with ``extra``), or refuses a run directory that holds another run."""
  record = {"config": identity, "model_sha256": sha256}
  path = run_dir / "run.json"
  if path.exists():
    old = io_utils.read_json(path)
    mine = {k: old.get(k) for k in record}
    if mine != record:
      old_cfg = dict(old.get("config", {}), model_sha256=old.get("model_sha256"))
      new_cfg = dict(identity, model_sha256=sha256)
      diff = ", ".join(f"{k}={old_cfg.get(k)!r} -> {new_cfg.get(k)!r}"
                       for k in sorted(set(old_cfg) | set(new_cfg))
                       if old_cfg.get(k) != new_cfg.get(k))
      raise UserError(f"`run_dir` {str(run_dir)!r} holds another evaluation ({diff}); its "
                      f"saved state cannot be resumed by this one. Fix: pass a new "
                      f"`run_dir` or delete that one.")
    return old
  record.update(extra or {})
  io_utils.write_json(path, record)
  return record


def _resolve_compute_dtype(run_dir: pathlib.Path, record: dict, model: Any,
                           config: RobustnessConfig, image_shape: Sequence[int]) -> str:
  """The dtype the attacks use, chosen once per run directory (kept in run.json).

  "auto" times both dtypes (``runtime.resolve_compute_dtype``, at the attack
  batch size); a resumed run must not pick differently.
  """
  if "compute_dtype" in record:
    return record["compute_dtype"]
  dtype = runtime.resolve_compute_dtype(model, config.compute_dtype, tuple(image_shape),
                                        batch_size=config.batch_size)
  io_utils.write_json(run_dir / "run.json", dict(record, compute_dtype=dtype))
  return dtype


_save_npz = state_lib.save_npz
_load_npz = state_lib.load_npz


def _inside_threat_model(x: np.ndarray, x_adv: np.ndarray, eps: float, norm: str,
                         attack: str) -> np.ndarray:
  """Bool (N,): ``x_adv`` inside the ε-ball and [0, 1] (float32 rounding allowed).

  The same test as ``autoattack.auto_attack``: an adversarial outside the
  threat model does not count as broken.

  Raises:
    RuntimeError: the attack returned the wrong shape or non-finite values.
  """
  if x_adv.shape != x.shape or not np.all(np.isfinite(x_adv)):
    raise RuntimeError(f"attack {attack!r} returned shape {x_adv.shape} (or non-finite "
                       f"values) for images of shape {x.shape}.")
  d = (x_adv.astype(np.float64) - x).reshape(len(x), -1)
  dist = np.abs(d).max(axis=1) if norm == "linf" else np.sqrt((d * d).sum(axis=1))
  flat = x_adv.reshape(len(x), -1)
  in_box = (flat.min(axis=1) >= 0.0) & (flat.max(axis=1) <= 1.0)
  return (dist <= eps * (1 + _TOLERANCE) + _TOLERANCE) & in_box


_eps_dir = state_lib.eps_dir


class _Evaluation:
  """The per-image state of one run and the steps that advance it."""

  def __init__(self, config: RobustnessConfig, clf: clf_lib.Classifier, x: np.ndarray,
               y: np.ndarray, plan: Plan, progress: Progress | None, *,
               state: pathlib.Path, first_image: int = 0, attack_model: Any = None):
    self.config = config
    self.clf = clf
    self.x, self.y = x, y
    self.plan = list(plan)
    self.progress = progress or (lambda done, total, desc: None)
    self.state = state
    # (local start, local stop, global slice number) of this process's slices.
    self.slices = [(lo - first_image, hi - first_image, (lo) // config.slice_size)
                   for lo, hi in state_lib.slices(first_image + len(y), config.slice_size)
                   if lo >= first_image]
    # Attacks differentiate the Keras model itself when there is one (bfloat16
    # clones need it); otherwise the Classifier callable; under a strategy,
    # either split across its replicas (``replicas.Replicated``).
    self.attack_model = attack_model if attack_model is not None else (
        clf.keras_model if clf.keras_model is not None else clf)
    self.total_steps = len(config.epsilons) * len(self.plan)
    self.steps_done = 0
    self.clean_pred = np.zeros(0, np.int64)  # set by clean()
    self._argmax = None
    self.compute_dtype = "float32"  # resolved by run()

  def predict(self, x: np.ndarray) -> np.ndarray:
    """Argmax of the logits, int64 (N,), in batches of one compiled function."""
    if self._argmax is None:
      model = self.attack_model
      spec = tf.TensorSpec([None, *self.x.shape[1:]], tf.float32)
      self._argmax = tf.function(lambda xb: tf.argmax(model(xb), -1), input_signature=[spec])
    if not len(x):
      return np.zeros(0, np.int64)
    return runtime.in_batches(self._argmax, self.config.batch_size, x).astype(np.int64)

  def clean(self) -> tuple[np.ndarray, float]:
    """Clean predictions (saved once, so a resumed run counts the same images)."""
    path = self.state / "clean.npz"
    if path.exists():
      st = _load_npz(path)
      self.clean_pred = st["pred"]
      return st["pred"], float(st["seconds"])
    start = time.perf_counter()
    randomness.reseed(self.clf, self.config.seed, "clean")
    self.clean_pred = np.concatenate([self.predict(self.x[lo:hi])
                                      for lo, hi, _ in self.slices])
    seconds = time.perf_counter() - start
    _save_npz(path, pred=self.clean_pred, seconds=np.float64(seconds))
    return self.clean_pred, seconds

  def _attack(self, name: str, fn: AttackFn, eps: float, robust: np.ndarray,
              adv: np.ndarray) -> dict[str, np.ndarray]:
    """Runs one attack on the images still robust; returns its state.

    One call per slice on its images still robust, with the slice's seed
    (``robustness_state``): with one slice, the call ``autoattack.auto_attack``
    makes, so the attack's own batching and per-batch seeds are the same as
    there.
    """
    c = self.config
    todo = np.flatnonzero(robust)
    robust = robust.copy()
    start = time.perf_counter()
    broken, outside = np.zeros(0, np.int64), 0
    self.progress(self.steps_done, self.total_steps,
                  f"ε={eps:g} {name} on {len(todo)} images: robust "
                  f"{100 * len(todo) / len(self.y):.1f}%")
    for lo, hi, number in self.slices:
      mine = todo[(todo >= lo) & (todo < hi)]
      if not len(mine):
        continue
      # A randomized model draws the same masks in this step whether the run
      # is fresh or resumed (earlier steps loaded, not recomputed), and
      # whichever shard runs the slice.
      randomness.reseed(self.clf, c.seed, eps, name, *([number] if number else []))
      x_adv = np.asarray(fn(self.attack_model, self.x[mine], self.y[mine], eps,
                            seed=state_lib.slice_seed(c.seed, number),
                            batch_size=c.batch_size, compute_dtype=self.compute_dtype),
                         dtype=np.float32)
      legal = _inside_threat_model(self.x[mine], x_adv, eps, c.norm, name)
      n_out = int((~legal).sum())
      if n_out:
        logging.warning("%s returned %d images outside the %s ball of radius %g or [0, 1]; "
                        "they do not count as broken.", name, n_out, c.norm, eps)
      outside += n_out
      fooled = legal & (self.predict(x_adv) != self.y[mine])
      broken = np.concatenate([broken, mine[fooled]])
      robust[mine[fooled]] = False
      adv[mine[fooled]] = x_adv[fooled]
    return {"robust": robust, "broken_idx": broken.astype(np.int64), "x_adv": adv[broken],
            "attacked": np.int64(len(todo)), "outside_threat_model": np.int64(outside),
            "seconds": np.float64(time.perf_counter() - start)}

  def epsilon(self, eps: float, robust: np.ndarray, adv: np.ndarray,
              clean_correct: int) -> tuple[EpsilonResult, np.ndarray]:
    """Runs (or loads) every attack at ``eps``, starting from ``robust``."""
    inherited = clean_correct - int(robust.sum())
    steps = []
    for k, (name, fn) in enumerate(self.plan):
      path = self.state / _eps_dir(eps) / f"{k:02d}_{name}.npz"
      if path.exists():
        st = _load_npz(path)
        adv[st["broken_idx"]] = st["x_adv"]
        logging.info("ε=%g %s: resumed from %s", eps, name, path)
      else:
        st = self._attack(name, fn, eps, robust, adv)
        _save_npz(path, **st)
      robust = st["robust"]
      steps.append(AttackStep(attack=name, attacked=int(st["attacked"]),
                              broken=len(st["broken_idx"]), robust=int(robust.sum()),
                              outside_threat_model=int(st["outside_threat_model"]),
                              seconds=float(st["seconds"])))
      self.steps_done += 1
      self.progress(self.steps_done, self.total_steps,
                    f"ε={eps:g} {name}: robust {100 * robust.sum() / len(self.y):.1f}%")
    return EpsilonResult(eps=eps, broken_at_smaller_eps=inherited, steps=steps,
                         robust=int(robust.sum()),
                         seconds=sum(s.seconds for s in steps),
                         examples=self.examples(robust, adv)), robust

  def examples(self, robust: np.ndarray, adv: np.ndarray) -> dict[str, np.ndarray]:
    """The first few broken images: clean, worst-case adversarial, predictions."""
    correct_before = self.clean_pred == self.y
    idx = np.flatnonzero(correct_before & ~robust)[:EXAMPLES_PER_EPSILON]
    x_adv = adv[idx].copy()
    randomness.reseed(self.clf, self.config.seed, "examples")
    pred_adv = self.predict(x_adv)
    return {"index": idx, "x": self.x[idx], "x_adv": x_adv, "y": self.y[idx],
            "pred_clean": self.clean_pred[idx], "pred_adv": pred_adv}


def run(config: RobustnessConfig, *, progress: Progress | None = None,
        attack_plan: Callable[[str, str, Sequence[str] | None], Plan] | None = None
        ) -> RobustnessResult:
  """Evaluates the model's worst-case robust accuracy at every ε, resuming saved state.

  Writes only the run's own state (``run.json``, ``state/``); the artifacts
  (results.json, report.md, TensorBoard, the grid) are written above, by
  ``pipelines.evaluate.run``, which calls this and then ``reports.robustness_report``.

  Args:
    config: what to evaluate (validated here).
    progress: called as ``progress(done, total, description)`` before and
      after every (ε, attack) step, ``done`` of ``total`` steps finished; the
      description holds the running robust accuracy.
    attack_plan: ``(version, norm, attacks) -> [(name, fn)]``; default
      ``keras_defense.attacks.autoattack.plan``.

  Returns:
    A ``RobustnessResult``.

  Raises:
    UserError: a bad config, model, signature, input spec, output or run
      directory, all before any attack runs or anything is written;
      ``scan.UnsafeModelError`` for a SavedModel holding ops that touch the
      outside world and are not in ``allow_ops``, before it is loaded.
  """
  wall_start = time.perf_counter()
  config.validate()
  run_dir = pathlib.Path(config.run_dir)
  blocker = io_utils.file_in_the_way(run_dir)
  if blocker is not None:
    raise UserError(f"`run_dir` {str(run_dir)!r} cannot be a directory: {str(blocker)!r} "
                    f"exists and is not a directory.")
  # Built before the model is loaded: logical CPU devices must be configured
  # before TensorFlow initialises its devices.
  strategy = (None if config.strategy == "default" else distribution.make_strategy(
      config.strategy, num_cpu_devices=config.num_cpu_devices))
  # Scanned for side-effect ops before it is loaded, and before run_dir is touched.
  clf = clf_lib.load_classifier(config.model, signature=config.signature,
                                output_key=config.output_key,
                                allow_ops=config.allow_ops).use_pixels(config.pixels())
  images = inputs.load_test_images(config.dataset, n_examples=config.n_examples,
                                   model_shape=clf.input_shape, data_dir=config.data_dir,
                                   manual_dir=config.manual_dir)
  clf.check_input(images.image_shape, dataset=config.dataset)
  try:
    plan = list((attack_plan or _real_plan)(config.version, config.norm, config.attacks))
  except (ValueError, TypeError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(str(e)) from e
  x, y = images.x, images.y
  clf.use_output(clf_lib.detect_output(clf, x[:min(len(x), 256)],
                                       num_classes=inputs.resolve_num_classes(images,
                                                                              clf.scores)))
  if clf.output == clf_lib.PROBABILITIES:
    logging.warning("%s outputs probabilities (rows >= 0 summing to 1): attacking log(p).",
                    config.model)
  if config.compute_dtype == "bfloat16" and clf.keras_model is None:
    raise UserError("`compute_dtype` 'bfloat16' needs a tf_keras model file with logits "
                    "output taking [0, 1] pixels (its layers are cloned in bfloat16); a "
                    "SavedModel signature, a Keras 3 file, a probability output or another "
                    "pixel convention runs in float32. Fix: use float32.")
  sha256 = clf_lib.fingerprint(config.model)
  attack_model = clf.keras_model if clf.keras_model is not None else clf
  if strategy is not None:
    attack_model = replicas.Replicated(attack_model, strategy)
    logging.info("--strategy=%s: every attack batch is split across %d replicas (%s)",
                 config.strategy, attack_model.num_replicas, ", ".join(attack_model.devices))
  auto = None
  if config.batch_size is None:
    config, auto = _auto_batch_size(config, _sized_model(config, clf, attack_model),
                                    images.image_shape)
  identity = dict(config.identity(), **images.identity)
  first, shard = 0, None
  if config.num_shards > 1:
    first, stop = state_lib.shard_images(len(y), config.slice_size, config.shard_index,
                                         config.num_shards)
    shard = {"index": config.shard_index, "count": config.num_shards, "images": [first, stop]}
    x, y = x[first:stop], y[first:stop]
    run_dir = state_lib.shard_dir(run_dir, config.shard_index, config.num_shards)
    identity = dict(identity, shard=shard)
    logging.info("shard %d of %d: images %d-%d of %d", config.shard_index,
                 config.num_shards, first, stop - 1, len(images.y))
  record = _bind_run_dir(run_dir, identity, sha256,
                         extra={"settings": dataclasses.asdict(config)} if shard else None)
  if config.merge and "compute_dtype" not in record:
    dtype = state_lib.combine(run_dir, identity=identity, model_sha256=sha256, n=len(y),
                              slice_size=config.slice_size, epsilons=config.epsilons,
                              attacks=[name for name, _ in plan])
    record = dict(record, compute_dtype=dtype)
    io_utils.write_json(run_dir / "run.json", record)

  ev = _Evaluation(config, clf, x, y, plan, progress, state=run_dir / "state",
                   first_image=first, attack_model=attack_model)
  ev.compute_dtype = _resolve_compute_dtype(run_dir, record, ev.attack_model, config,
                                            images.image_shape)
  ev.progress(0, ev.total_steps, "clean accuracy")
  pred, clean_seconds = ev.clean()
  robust = pred == y
  clean_correct = int(robust.sum())
  adv = x.copy()
  results = []
  for eps in sorted(float(e) for e in config.epsilons):
    result, robust = ev.epsilon(eps, robust, adv, clean_correct)
    results.append(result)
    logging.info("ε=%g: robust accuracy %.4f", eps, result.robust / len(y))
  return RobustnessResult(
      config=config, attacks=[name for name, _ in plan], n=len(y),
      clean_correct=clean_correct, output=clf.output, model_kind=clf.kind,
      model_sha256=sha256, compute_dtype=ev.compute_dtype, epsilons=results,
      clean_seconds=clean_seconds, wall_seconds=time.perf_counter() - wall_start,
      versions=provenance.versions(), batch_size_auto=auto, shard=shard)


def _sized_model(config: RobustnessConfig, clf: clf_lib.Classifier, attack_model: Any
                 ) -> Any | None:
  """The model whose attack step sizes the batch: the model itself; for a .tflite (no
  gradients) its surrogate or QAT twin, where the gradient attacks run; None for Square
  alone (forward passes only)."""
  if clf.kind != "tflite":
    return attack_model
  if config.surrogate:
    return black_box.load_surrogate(config)
  if config.qat_twin:
    return black_box.load_surrogate(config, config.qat_twin, what="qat_twin")
  return None


def _auto_batch_size(config: RobustnessConfig, model: Any | None, image_shape: Sequence[int]
                     ) -> tuple[RobustnessConfig, dict]:
  """``config`` with the batch size chosen from memory (``attacks.memory``), and how.

  Chosen once per run directory (``state/batch_size.json``, created
  exclusively): a resumed run, and every shard sharing the run directory, uses
  the first choice, so their slices are batched alike. ``model`` None (no
  gradient attack runs): the cap.
  """
  path = pathlib.Path(config.run_dir) / "state" / "batch_size.json"
  if not path.is_file():
    if model is None:
      batch = rob_config.DEFAULT_BATCH_SIZE
      details = {"batch_size": batch, "per_image_bytes": 0,
                 "available_bytes": memory.available_bytes(), "fraction": None, "cap": batch,
                 "limited_by": "cap (no gradient attack: forward passes only)"}
    else:
      batch, details = memory.choose_batch_size(model, image_shape,
                                                cap=rob_config.DEFAULT_BATCH_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
      with open(path, "x", encoding="utf-8") as f:  # the first process's choice stands
        json.dump(details, f)
        f.flush()
        os.fsync(f.fileno())
    except FileExistsError:
      pass
  for _ in range(100):  # a concurrent creator may not have written it yet
    try:
      details = io_utils.read_json(path)
      break
    except ValueError:
      time.sleep(0.05)
  logging.info("batch size %d chosen from memory: %.1f MB per image, %.0f MB available, "
               "limited by %s (state/batch_size.json)", details["batch_size"],
               details["per_image_bytes"] / 2**20, (details["available_bytes"] or 0) / 2**20,
               details["limited_by"])
  return dataclasses.replace(config, batch_size=int(details["batch_size"])), details


def robust_masks(run_dir: str | os.PathLike) -> dict[float, np.ndarray]:
  """Per-image worst-case outcome of a finished (or partial) run: {ε: bool (n,) robust}.

  Read from the saved state: for each ε, the robust mask after the last
  attack that finished there. An ε with no finished attack is left out.
  """
  state = pathlib.Path(run_dir) / "state"
  masks = {}
  for eps_dir in sorted(state.glob("eps_*")) if state.is_dir() else []:
    steps = sorted(eps_dir.glob("[0-9][0-9]_*.npz"))
    if steps:
      masks[float(eps_dir.name[len("eps_"):])] = _load_npz(steps[-1])["robust"].astype(bool)
  return masks
