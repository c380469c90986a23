"""kd-sweep on tiny real MNIST: points, csv, report, resume, kill -9, shards, HParams.

The grid: 1 method x 2 sparsity pairs (0:0, 0.5:0.5) x 2 logits ε (0, 20), one
seed, deterministic, so that every way of running it (whole, resumed after
kill -9, two concurrent shards) gives the same sweep.csv byte for byte.

Run as a script (``python tests/test_sweep.py RUN_DIR '{"num_shards": 2, ...}'``)
it runs the same sweep in a separate process: the kill -9 and shard tests use it
(through ``_helpers.BinaryServer``: forks of one child that imported the package once).
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import _helpers
from keras_defense.evaluation import grid as evaluation
from keras_defense.models import export
from keras_defense.util import file_lock
from keras_defense.defenses import logits_augmentation
from keras_defense.defenses import pruning
from keras_defense.evaluation import sweep_grid
from keras_defense.pipelines import sweep
from keras_defense import data
from keras_defense import training
from keras_defense.util.errors import UserError

_SMALL = dict(train_limit=1000, test_limit=300, validation_size=100, verbose=0)
KEYS = ["standard__d0_c0__eps0__s0", "standard__d0_c0__eps20__s0",
        "standard__d0.5_c0.5__eps0__s0", "standard__d0.5_c0.5__eps20__s0"]


def _config(run_dir, **overrides) -> sweep_grid.SweepConfig:
  adam = dict(optimizer="adam", learning_rate=1e-3, lr_decay_epochs=(100,))
  config = sweep_grid.SweepConfig(
      run_dir=str(run_dir),
      train=training.TrainConfig(epochs=1, batch_size=32, **adam, **_SMALL),
      prune=pruning.PruneConfig(finetune_epochs=1, pruning_end_epoch=0.5, pruning_frequency=2,
                                batch_size=64, **adam, **_SMALL),
      augment=logits_augmentation.AugmentConfig(test_limit=300),
      eval=evaluation.EvalConfig(attacks=("fgsm",), epsilons=(0.2,), eval_size=100,
                                 targeted_modes=(False,), cw_attacks=(), batch_size=100),
      sparsities=((0.0, 0.0), (0.5, 0.5)), logits_epsilons=(0.0, 20.0), deterministic=True)
  return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def script(tmp_path_factory):
  """Runs this file as a script (``python tests/test_sweep.py RUN_DIR OVERRIDES``) in a
  process of its own: a fork of one child that imported the package once."""
  with _helpers.BinaryServer([__file__], tmp_path_factory.mktemp("script"), timeout=300,
                             preload=["pytest", "keras_defense.pipelines.sweep"]) as server:
    yield server


def _script_args(run_dir, **overrides) -> list:
  return [run_dir, json.dumps(overrides)]


class _CountLoads:
  """``keras_defense.models.export`` as the sweep module sees it, counting ``load_model``
  calls per path (the loading itself is export's)."""

  def __init__(self):
    self.loads = {}

  def __getattr__(self, name):
    return getattr(export, name)

  def load_model(self, path, **kwargs):
    key = os.path.realpath(path)
    self.loads[key] = self.loads.get(key, 0) + 1
    return export.load_model(path, **kwargs)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """One uninterrupted, unsharded run: the reference."""
  run_dir = tmp_path_factory.mktemp("sweep") / "whole"
  counter = _CountLoads()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sweep, "export", counter)
    result = sweep.run(_config(run_dir))
  # The sweep loads each SavedModel once and keeps it (with the attack graphs traced
  # on it) for the run: M0 and 3 point models (the unpruned ε = 0 point's is M0), not
  # 2 loads per point. The kill -9 and shard tests run every point in processes of
  # their own and compare their sweep.csv with this run's byte for byte.
  assert sorted(counter.loads.values()) == [1, 1, 1, 1], counter.loads
  return run_dir, result


def test_loaded_models_are_kept_for_the_last_used_paths(tmp_path, monkeypatch):
  """``_Sweep.load_model``: one object per path while among the MODELS_KEPT last used."""
  loads = []
  monkeypatch.setattr(sweep, "export", type("Export", (), {"load_model": staticmethod(
      lambda path: loads.append(path) or object())}))
  monkeypatch.setattr(sweep, "MODELS_KEPT", 2)
  s = sweep._Sweep(_config(tmp_path), None)  # pylint: disable=protected-access
  a = s.load_model(str(tmp_path / "a"))
  assert s.load_model(str(tmp_path / "x" / ".." / "a")) is a  # the same real path
  s.load_model(str(tmp_path / "b"))
  assert s.load_model(str(tmp_path / "a")) is a  # a used last: b goes first
  s.load_model(str(tmp_path / "c"))
  assert s.load_model(str(tmp_path / "a")) is a
  s.load_model(str(tmp_path / "b"))
  assert [pathlib.Path(p).name for p in loads] == ["a", "b", "c", "b"]


def test_run_writes_one_json_per_point_the_csv_and_the_report(whole):
  run_dir, result = whole
  assert sorted(p.name for p in (run_dir / "points").iterdir()) == sorted(
      f"{k}.json" for k in KEYS)
  assert result.missing == [] and sorted(result.computed) == sorted(KEYS)
  points = {p["key"]: p for p in result.points}
  for p in points.values():
    for field in ("clean_acc", "robust_acc", "eps", "threat_model", "n_examples", "seed",
                  "method", "dense_sparsity", "conv_sparsity", "logits_epsilon",
                  "compression_ratio", "nonzero_params", "zero_gradient_fraction", "seconds"):
      assert field in p, field
    assert p["eps"] == 0.2 and p["threat_model"] == "Linf" and p["n_examples"] == 100
    assert p["robust_ci95"][0] <= p["robust_acc"] <= p["robust_ci95"][1]
    # The per-image worst case cannot beat the clean accuracy or any single attack.
    for s in p["success"].values():
      assert p["robust_acc"] <= 1 - s["successes"] / 100 + 1e-9
  m0, pruned = points[KEYS[0]], points[KEYS[2]]
  assert m0["clean_acc"] > 0.5  # M0 learned something
  assert m0["compression_ratio"] == pytest.approx(1.0, abs=1e-3)
  assert pruned["compression_ratio"] > 1.8  # half the weights zeroed
  # Augmentation keeps the zeros: same nonzero count as its pruned parent.
  assert points[KEYS[3]]["nonzero_params"] == pruned["nonzero_params"]
  csv_lines = (run_dir / "sweep.csv").read_text().splitlines()
  assert len(csv_lines) == 1 + 4
  assert "seconds" not in csv_lines[0]
  assert "quantization" not in csv_lines[0] and "bytes" not in csv_lines[0]  # as before it
  assert [line.split(",")[0] for line in csv_lines[1:]] == KEYS  # grid order
  report = (run_dir / "report.md").read_text()
  assert "4 of 4 points finished" in report and "Missing" not in report
  # The time section adds up what the run directory records.
  parent_s = [json.loads(f.read_text())["seconds"]
              for f in sorted((run_dir / "parents").glob("*/done.json"))]
  total_min = (sum(parent_s) + sum(p["seconds"] for p in points.values())) / 60
  assert (f"{total_min:.1f} min of compute in all: {len(parent_s)} parent models built"
          in report), report
  assert f"4 points evaluated in {sum(p['seconds'] for p in points.values()) / 60:.1f} min" \
      in report
  for plot in ("robust_vs_compression.png", "clean_vs_robust.png",
               "zero_gradient_vs_logits_eps.png"):
    assert (run_dir / "plots" / plot).stat().st_size > 5000
    assert f"plots/{plot}" in report
  sessions = sorted(p.name for p in (run_dir / "tensorboard" / "hparams").iterdir()
                    if p.is_dir())
  assert sessions == sorted(KEYS)
  assert not list((run_dir / "parents").glob("*/lock*"))  # every lock released



def test_run_dir_is_bound_to_its_settings_robust_pruning_fields_only_when_on(tmp_path):
  config = _config(tmp_path / "run")
  identity = config.identity()
  # Plain pruning: the robust-pruning fields do nothing, so they are not part of
  # the identity (a sweep made before pruning had them keeps its run directory).
  assert not set(sweep_grid.ROBUST_PRUNING_FIELDS) & set(identity["prune"])
  # The training attack of the adversarial methods: the sweep's, as flags name it.
  assert "adversarial" not in identity["train"] and identity["train"]["adv_epsilon"] == 0.3
  attack = dataclasses.replace(config, adversarial=training.AdversarialSpec("pgd", epsilon=0.1))
  assert attack.identity()["train"]["adv_epsilon"] == 0.1
  robust = dataclasses.replace(config, prune=dataclasses.replace(
      config.prune, adversarial=training.AdversarialSpec("fgsm_rs", epsilon=0.1)))
  assert robust.identity()["prune"]["adversarial"] == "fgsm_rs"
  assert robust.identity()["prune"]["adv_epsilon"] == 0.1
  sweep._bind(tmp_path, identity)  # pylint: disable=protected-access
  sweep._bind(tmp_path, identity)  # the same settings: accepted
  with pytest.raises(UserError, match=r"other settings \(prune\.adv_epsilon: None -> 0\.1, "
                     r"prune\.adversarial: None -> 'fgsm_rs', "):
    sweep._bind(tmp_path, robust.identity())  # pylint: disable=protected-access


def test_rerun_recomputes_nothing(whole, monkeypatch):
  run_dir, _ = whole
  before = {p: p.stat().st_mtime_ns for p in (run_dir / "points").iterdir()}
  csv_before = (run_dir / "sweep.csv").read_text()

  def forbidden(*args, **kwargs):
    raise AssertionError("a finished sweep must not compute anything again")
  for module, name in ((training, "train"), (pruning, "prune"),
                       (logits_augmentation, "augment"), (evaluation, "evaluate")):
    monkeypatch.setattr(module, name, forbidden)
  result = sweep.run(_config(run_dir))
  assert result.computed == [] and result.missing == []
  assert {p: p.stat().st_mtime_ns for p in (run_dir / "points").iterdir()} == before
  assert (run_dir / "sweep.csv").read_text() == csv_before


def test_report_stage_names_missing_points_and_never_double_counts(whole, tmp_path,
                                                                   monkeypatch):
  run_dir, _ = whole
  partial = tmp_path / "partial"
  shutil.copytree(run_dir / "points", partial / "points")
  shutil.copy(run_dir / "sweep.json", partial / "sweep.json")
  (partial / "points" / f"{KEYS[1]}.json").unlink()
  # A stray copy of a point under another name is not counted twice.
  shutil.copy(partial / "points" / f"{KEYS[0]}.json", partial / "points" / "copy.json")
  monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("report trained"))
  result = sweep.run(_config(partial, stages=("report",)))
  assert result.missing == [KEYS[1]]
  assert [p["key"] for p in result.points] == [KEYS[0], KEYS[2], KEYS[3]]
  report = (partial / "report.md").read_text()
  assert "3 of 4 points finished" in report and KEYS[1] in report
  rows = (partial / "sweep.csv").read_text().splitlines()[1:]
  assert [r.split(",")[0] for r in rows] == [KEYS[0], KEYS[2], KEYS[3]]


def test_kill_9_mid_sweep_then_rerun_gives_the_identical_csv(whole, tmp_path, script):
  run_dir, _ = whole
  killed = tmp_path / "killed"
  # The reference's parents (M0, pruned, augmented) are reused: the points are killed.
  shutil.copytree(run_dir / "parents", killed / "parents")
  script.kill_9_when(__file__, _script_args(killed),
                     lambda: list((killed / "points").glob("*.json")), timeout=240,
                     what="a finished point")
  done = list((killed / "points").glob("*.json"))
  assert 1 <= len(done) < 4, "killed after the last point: nothing left to resume"
  result = sweep.run(_config(killed))
  assert result.missing == [] and len(result.computed) == 4 - len(done)
  assert (killed / "sweep.csv").read_text() == (run_dir / "sweep.csv").read_text()


def test_two_concurrent_shards_merge_into_the_unsharded_csv(whole, tmp_path, script):
  run_dir, _ = whole
  shared = tmp_path / "shared"
  script.start(__file__, _script_args(shared, shard_index=1, num_shards=2, stages=[
      "train", "prune", "augment", "attack"]))
  try:
    mine = sweep.run(_config(shared, shard_index=0, num_shards=2, stages=(
        "train", "prune", "augment", "attack")))
  except BaseException:
    script.kill()
    raise
  finally:
    _, stderr, code = script.wait()
  assert code == 0, stderr[-3000:]
  assert sorted(mine.computed) == KEYS[:2]
  assert set(mine.missing) <= set(KEYS[2:])  # the other shard may not have finished yet
  # M0, needed by both shards, was trained once: one run folder, one done record.
  assert (shared / "parents" / "standard__s0" / "done.json").is_file()
  assert not list((shared / "parents").glob("*/lock*"))
  merged = sweep.run(_config(shared, stages=("report",)))
  assert merged.missing == []
  assert (shared / "sweep.csv").read_text() == (run_dir / "sweep.csv").read_text()


def test_autoattack_enters_the_worst_case(whole, tmp_path):
  """One point (M0) with AutoAttack standard on 10 images, M0 reused from the reference.

  At ε 0.3 (the grid's 0.2 elsewhere), where APGD-CE alone breaks every image FGSM left
  on this M0 (seen: FGSM left 2 of the 9 it classifies): the later AutoAttack members
  attack nothing, so they cost no tracing here (at 0.2, 4 images survived APGD-CE and
  APGD-T, FAB-T and Square broke none of them in ~25 s).
  """
  run_dir, _ = whole
  config = _config(tmp_path / "aa", sparsities=((0.0, 0.0),), logits_epsilons=(0.0,))
  config = dataclasses.replace(config, eval=dataclasses.replace(
      config.eval, epsilons=(0.3,), autoattack_version="standard", autoattack_size=10,
      autoattack_batch_size=10))
  shutil.copytree(run_dir / "parents" / "standard__s0", tmp_path / "aa" / "parents" /
                  "standard__s0")
  (point,) = sweep.run(config).points
  aa = point["autoattack"]
  assert aa["version"] == "standard" and aa["n_examples"] == 10
  assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert point["n_examples"] == 10  # the worst case covers the images both ran on
  assert point["robust_acc"] <= aa["robust_acc"] <= aa["clean_acc"]
  # ... and the grid alone left images AutoAttack broke, so a worst case without
  # AutoAttack would be higher: the check above can fail.
  fooled, _ = evaluation.fooled_mask(tmp_path / "aa" / "work" / "standard__s0" / "cells",
                                     ["m0", "d0_c0_eps0"], "m0", config.eval,
                                     model="d0_c0_eps0", epsilon=0.3, n=10)
  pred = np.load(tmp_path / "aa" / aa["dir"] / "state" / "clean.npz")["pred"]
  _, y = data.load_arrays("mnist", "test", limit=10)
  assert np.mean((pred == y) & ~fooled) > point["robust_acc"]
  header, row = (tmp_path / "aa" / "sweep.csv").read_text().splitlines()
  value = row.split(",")[header.split(",").index("autoattack_robust_acc")]
  assert float(value) == aa["robust_acc"]
  assert "AutoAttack" in (tmp_path / "aa" / "report.md").read_text()


def test_quantized_point_is_the_tflite_attacked_black_box(whole, tmp_path):
  """One pruned point as qat_int8 (prune-preserving QAT, 1 epoch), the parents reused from
  the reference; the .tflite is attacked by the black-box ensemble on 10 images."""
  from keras_defense.compression import measurement  # pylint: disable=g-import-not-at-top
  from keras_defense.evaluation import black_box  # pylint: disable=g-import-not-at-top
  from keras_defense.evaluation import robustness  # pylint: disable=g-import-not-at-top
  from keras_defense.models import tflite  # pylint: disable=g-import-not-at-top
  run_dir, _ = whole
  config = _config(tmp_path / "q", sparsities=((0.5, 0.5),), logits_epsilons=(0.0,),
                   quantization=("qat_int8",), square_queries=10)
  config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, eval_size=10))
  shutil.copytree(run_dir / "parents", tmp_path / "q" / "parents")
  (point,) = sweep.run(config).points
  assert point["key"] == KEYS[2] + "__qat_int8" and point["quantization"] == "qat_int8"
  parent = tmp_path / "q" / "parents" / point["key"]
  assert (parent / "model.tflite").is_file() and black_box.is_qat_model(parent / "twin" / "1")
  bb = point["black_box"]
  assert bb["attacks"] == list(black_box.ATTACKS)  # transfer from the float point, BPDA, Square
  assert point["n_examples"] == 10 and point["zero_gradient_fraction"] is None
  assert point["robust_ci95"][0] <= point["robust_acc"] <= point["robust_ci95"][1]
  # Robust means: the interpreter classifies it correctly and no member fooled it there.
  mask = robustness.robust_masks(tmp_path / "q" / bb["dir"])[0.2]
  x, y = data.load_arrays("mnist", "test", limit=10)
  pred = tflite.TFLiteModel(parent / "model.tflite").predict_classes(x)
  assert int(mask.sum()) == point["n_robust"] and np.all(pred[mask] == y[mask])
  assert point["n_robust"] + sum(bb["broken"].values()) == int(np.sum(pred == y))
  # The transfer examples are stored for the other quantized points of the same float point.
  assert list((tmp_path / "q" / "work" / "transfer_cache").rglob("transfer-pgd-*.npz"))
  float_model = tmp_path / "q" / point["float_saved_model"]
  assert point["bytes"] == (parent / "model.tflite").stat().st_size
  assert 0 < point["gzip_bytes"] and point["bytes"] < 0.5 * measurement.file_bytes(
      measurement.saved_model_variables(float_model))
  assert point["agreement"] >= 0.9
  header, row = (tmp_path / "q" / "sweep.csv").read_text().splitlines()
  cols, values = header.split(","), row.split(",")
  assert cols[6] == "quantization" and cols[-3:] == ["bytes", "gzip_bytes", "agreement"]
  assert values[6] == "qat_int8" and float(values[-1]) == point["agreement"]
  report = (tmp_path / "q" / "report.md").read_text()
  assert "quantization: qat_int8" in report and "BPDA" in report
  assert f"{point['bytes']:,}" in report
  assert sweep.run(config).computed == []  # resumed: nothing recomputed
  with pytest.raises(UserError, match="was built with"):
    sweep.run(dataclasses.replace(config, quantize_epochs=2))


def test_point_keys_gain_a_suffix_only_when_quantized():
  p = sweep_grid.Point("standard", 0.9, 0.95, 20.0, 0)
  assert p.key == "standard__d0.9_c0.95__eps20__s0" and "quantization" not in p.coordinates()
  q = dataclasses.replace(p, quantization="ptq_int8")
  assert q.key == p.key + "__ptq_int8" and q.float_point() == p
  config = _config("/tmp/unused", quantization=("none", "ptq_int8"))
  assert [pt.key for pt in config.points()][:2] == [KEYS[0], KEYS[0] + "__ptq_int8"]


@pytest.mark.parametrize("overrides, field", [
    (dict(sparsities=((1.0, 0.5),)), "sparsities"),
    (dict(sparsities=((0.5, 0.5), (0.5, 0.5))), "sparsities"),
    (dict(logits_epsilons=(-1.0,)), "logits_epsilons"),
    (dict(logits_epsilons=()), "logits_epsilons"),
    (dict(methods=("bogus",)), "methods"),
    (dict(shard_index=2, num_shards=2), "shard_index"),
    (dict(num_shards=0), "num_shards"),
    (dict(base_models={"pgd_unknown": "x"}), "base_models"),
    (dict(stages=("points",)), "stages"),
    (dict(lock_timeout=0.0), "lock_timeout"),
    (dict(quantization=("int4",)), "quantization"),
    (dict(quantization=()), "quantization"),
    (dict(quantize_epochs=-1), "quantize_epochs"),
    (dict(square_queries=0), "square_queries"),
])
def test_bad_config_is_a_clear_error_naming_the_field(tmp_path, overrides, field):
  with pytest.raises(UserError, match=f"`{field}`"):
    _config(tmp_path / "run", **overrides).validate()


def test_bad_eval_config_is_a_clear_error(tmp_path):
  config = _config(tmp_path / "run")
  with pytest.raises(UserError, match="`epsilons`.*exactly one"):
    dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, epsilons=(0.1, 0.2))).validate()
  with pytest.raises(UserError, match="`cw_attacks`"):
    dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, cw_attacks=("cw_l2",))).validate()


def test_adversarial_methods_follow_train_config(tmp_path, monkeypatch):
  has_field = "adversarial" in {f.name for f in dataclasses.fields(training.TrainConfig)}
  if has_field:
    _config(tmp_path / "run", methods=("standard", training.ADVERSARIAL_METHODS[0])).validate()
  monkeypatch.setattr(sweep_grid, "methods_available", lambda: ("standard",))
  with pytest.raises(UserError, match="no `adversarial` field"):
    _config(tmp_path / "run", methods=("standard", "pgd")).validate()


def test_a_changed_setting_is_refused_in_an_existing_run_dir(whole):
  run_dir, _ = whole
  config = _config(run_dir)
  changed = dataclasses.replace(config, eval=dataclasses.replace(config.eval, eval_size=50))
  with pytest.raises(UserError, match="eval.eval_size: 100 -> 50"):
    sweep.run(changed)


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock = tmp_path / "lock"
  import socket  # pylint: disable=g-import-not-at-top
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                              "nonce": "old"}))
  start = time.time()
  with file_lock.hold(lock, stale_seconds=600) as me:
    assert json.loads(lock.read_text())["nonce"] == me["nonce"]
  assert time.time() - start < 5 and not lock.exists()


def test_an_empty_lock_left_by_a_writer_that_died_is_taken_over_once_stale(tmp_path):
  lock = tmp_path / "lock"
  lock.write_text("")  # died between O_EXCL create and writing its record
  old = time.time() - 100
  os.utime(lock, (old, old))
  with file_lock.hold(lock, stale_seconds=10, poll_seconds=0.05) as me:
    assert json.loads(lock.read_text())["nonce"] == me["nonce"]
  assert not list(tmp_path.iterdir())  # lock and takeover marker removed


def test_lock_waits_for_a_live_holder_and_times_out_a_silent_one(tmp_path):
  lock = tmp_path / "lock"
  # A live holder on another host: only its heartbeat (mtime) says it is alive.
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "nonce": "live"}))
  waited = []
  start = time.time()
  with file_lock.hold(lock, stale_seconds=1.0, poll_seconds=0.05, on_wait=waited.append):
    pass
  assert waited and waited[0]["nonce"] == "live"
  assert 0.9 < time.time() - start < 10


@pytest.mark.parametrize("value", [["0.9"], ["0.5:1.0"], ["a:b"]])
def test_sparsities_flag_validator_names_the_flag(value):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  with pytest.raises(flags.ValidationError, match="--sparsities must be dense:conv pairs"):
    kd_flags.sweep._check_sparsities(value)  # pylint: disable=protected-access
  assert kd_flags.sweep._check_sparsities(["0:0", "0.9:0.95"])  # pylint: disable=protected-access


def test_a_missing_base_model_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "no_model")
  with pytest.raises(UserError, match="`base_models`: no SavedModel at"):
    sweep.run(_config(tmp_path / "run", base_models={"standard": missing}))


def test_tensorboard_serves_the_hparams_sessions(whole, tmp_path):
  """A real TensorBoard server (loopback, a free port) lists one session per point."""
  run_dir, _ = whole
  exe = pathlib.Path(sys.executable).with_name("tensorboard")
  if not exe.is_file():
    pytest.skip("no tensorboard executable next to the interpreter")
  proc = subprocess.Popen([str(exe), "--logdir", str(run_dir / "tensorboard"), "--host",
                           "127.0.0.1", "--port", "0", "--load_fast", "false"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    port, deadline, log = None, time.time() + 90, []
    while port is None:
      assert time.time() < deadline and proc.poll() is None, "".join(log)[-2000:]
      line = proc.stderr.readline()
      log.append(line)
      m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
      port = m and int(m.group(1))
    base = f"http://127.0.0.1:{port}/data"
    body = json.dumps({"experimentName": ""}).encode()
    sessions = None
    while time.time() < deadline:  # the first load of the logdir takes a moment
      listing = json.load(urllib.request.urlopen(f"{base}/plugins_listing", timeout=10))
      req = urllib.request.Request(f"{base}/plugin/hparams/session_groups", data=json.dumps(
          {"experimentName": "", "startIndex": 0, "sliceSize": 100, "allowedStatuses": [
              "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
           "colParams": []}).encode(), headers={"Content-Type": "application/json"})
      groups = json.load(urllib.request.urlopen(req, timeout=10))
      sessions = sorted(g["name"] for g in groups.get("sessionGroups", []))
      if listing.get("hparams", {}).get("enabled") and len(sessions) == 4:
        break
      time.sleep(1)
    assert listing["hparams"]["enabled"]
    exp = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{base}/plugin/hparams/experiment", data=body,
        headers={"Content-Type": "application/json"}), timeout=10))
    names = {h["name"] for h in exp["hparamInfos"]}
    assert {"method", "dense_sparsity", "conv_sparsity", "logits_epsilon", "seed"} <= names
    metrics = {m["name"]["tag"] for m in exp["metricInfos"]}
    assert {"clean_acc", "robust_acc", "compression_ratio", "zero_gradient_fraction"} <= metrics
    assert len(sessions) == 4, sessions
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


if __name__ == "__main__":
  # python tests/test_sweep.py RUN_DIR '{"shard_index": 1, ...}': the same sweep, run here.
  kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  if "stages" in kwargs:
    kwargs["stages"] = tuple(kwargs["stages"])
  sweep.run(_config(sys.argv[1], **kwargs))
  os._exit(0)  # pylint: disable=protected-access
