"""kd-evaluate across processes: shards plus --merge give one process's results.json.

A small tf_keras CNN (trained here on 2,000 shipped MNIST images) and 40 test
images in slices of 10 (``slice_size``), batch size 8; the ensemble is PGD-5
with a random start then a real APGD-CE of 5 iterations, so the random starts
would differ if an image's seed depended on the process that attacked it.
Two shards (in-process) plus ``evaluate.merge`` must equal one process,
timing fields aside; a shard killed with SIGKILL mid-run and rerun must too;
a merge with a shard missing or unfinished is refused, naming it.
"""

import dataclasses
import json
import pathlib
import shutil
import textwrap

import numpy as np
import pytest

import _helpers
from keras_defense import attacks
from keras_defense import data
from keras_defense.attacks import memory
from keras_defense.models import classifier
from keras_defense.evaluation import robustness
from keras_defense.evaluation import robustness_state
from keras_defense.pipelines import evaluate
from keras_defense.util.compat import keras
from keras_defense.util.errors import UserError


def plan(version, norm, names):
  """PGD-5 with a random start, then APGD-CE with 5 iterations: both seeded."""
  del version, names
  assert norm == "linf"

  def pgd(model, x, y, eps, *, seed, batch_size, compute_dtype):
    return attacks.pgd(model, x, y, eps, step_size=eps / 4, steps=5, seed=seed,
                       batch_size=batch_size, compute_dtype=compute_dtype)

  def apgd(model, x, y, eps, *, seed, batch_size, compute_dtype):
    return attacks.apgd(model, x, y, eps, steps=5, seed=seed, batch_size=batch_size,
                        compute_dtype=compute_dtype)

  return [("pgd", pgd), ("apgd-ce", apgd)]


def config(model, run_dir, **kw):
  return robustness.RobustnessConfig(
      model=str(model), run_dir=str(run_dir), epsilons=(0.05, 0.15), n_examples=40,
      batch_size=8, slice_size=10, compute_dtype="float32", **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  x, y = data.load_arrays("mnist", "train", limit=1000)
  path = tmp_path_factory.mktemp("model") / "cnn.keras"
  _helpers.small_cnn(keras, x, y, batch_size=50).save(path)
  return path


@pytest.fixture(scope="module", autouse=True)
def fixed_versions():
  # Other work in a shared checkout may commit meanwhile: compare the numbers.
  versions = robustness.provenance.versions()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(robustness.provenance, "versions", lambda: versions)
    yield


@pytest.fixture(scope="module", autouse=True)
def one_model_per_file():
  """In this process, each model file is loaded once (its compiled attack steps are
  cached on it, so the many runs below do not retrace them); the subprocess loads
  its own."""
  load, loaded = classifier.load_classifier, {}

  def cached(path, **kw):
    key = (str(path), tuple(sorted(kw.items())))
    if key not in loaded:
      loaded[key] = load(path, **kw)
    return loaded[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(robustness.clf_lib, "load_classifier", cached)
    yield


@pytest.fixture(scope="module")
def whole(model, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("whole")
  return run_dir, evaluate.run(config(model, run_dir), attack_plan=plan).to_dict()


def _shard(model, run_dir, index, count=2):
  return evaluate.run(config(model, run_dir, shard_index=index, num_shards=count),
                      attack_plan=plan)


def _same_state(a: pathlib.Path, b: pathlib.Path):
  files = sorted(p.relative_to(a / "state") for p in (a / "state").rglob("*.npz"))
  assert files == sorted(p.relative_to(b / "state") for p in (b / "state").rglob("*.npz"))
  for rel in files:
    x, y = robustness_state.load_npz(a / "state" / rel), robustness_state.load_npz(
        b / "state" / rel)
    for k in x:
      if k != "seconds":
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{rel}: {k}")


def test_two_shards_then_merge_equal_one_process(model, whole, tmp_path):
  whole_dir, expected = whole
  # The attacks did something at both radii, and the random starts mattered.
  assert 0 < expected["robust_acc"][1] < expected["robust_acc"][0] < expected["clean_acc"]
  run_dir = tmp_path / "sharded"
  first = _shard(model, run_dir, 0)
  assert first.shard == {"index": 0, "count": 2, "images": [0, 20]} and first.n == 20
  assert not (run_dir / "results.json").exists()   # a shard reports nothing itself
  second = _shard(model, run_dir, 1)
  assert second.shard["images"] == [20, 40]
  merged = evaluate.merge(str(run_dir), attack_plan=plan).to_dict()
  assert _helpers.without_timing(merged) == _helpers.without_timing(expected)
  on_disk = json.loads((run_dir / "results.json").read_text())
  assert _helpers.without_timing(on_disk) == _helpers.without_timing(expected)
  assert (run_dir / "report.md").read_text().count("## ε =") == 2
  _same_state(run_dir, whole_dir)
  # The shard counts add up to the whole's.
  assert first.clean_correct + second.clean_correct == expected["n_clean_correct"]


_KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from keras_defense.pipelines import evaluate
    import test_evaluate_shards as t

    def slow_plan(*args):  # the same attacks, a second apart: killable between steps
      def slow(fn):
        def run(*a, **kw):
          time.sleep(1.0)
          return fn(*a, **kw)
        return run
      return [(name, slow(fn)) for name, fn in t.plan(*args)]

    evaluate.run(t.config(sys.argv[1], sys.argv[2], shard_index=1, num_shards=2),
                 attack_plan=slow_plan)
""")


def test_shard_killed_with_sigkill_then_rerun_merges_the_same(model, whole, tmp_path):
  _, expected = whole
  run_dir = tmp_path / "killed"
  _shard(model, run_dir, 0)
  shard_state = robustness_state.shard_dir(run_dir, 1, 2) / "state"
  _helpers.kill_9_script_when(_KILLABLE, [model, run_dir, pathlib.Path(__file__).parent],
                              lambda: list(shard_state.glob("eps_*/*.npz")), timeout=120)
  finished = {p: p.stat().st_mtime_ns for p in shard_state.glob("eps_*/*.npz")}
  assert 1 <= len(finished) < 4
  shard0 = {p: p.stat().st_mtime_ns for p in (run_dir / "shards" / "0-of-2").rglob("*")}
  with pytest.raises(UserError, match=r"shard 1-of-2: unfinished, missing eps_.*rerun it"):
    evaluate.merge(str(run_dir), attack_plan=plan)
  _shard(model, run_dir, 1)   # resumes after the killed run's finished steps
  assert {p: p.stat().st_mtime_ns for p in finished} == finished
  merged = evaluate.merge(str(run_dir), attack_plan=plan).to_dict()
  assert _helpers.without_timing(merged) == _helpers.without_timing(expected)
  # The other shard's work was untouched by the kill and the rerun.
  assert {p: p.stat().st_mtime_ns for p in shard0} == shard0


def test_merge_refuses_missing_and_mismatched_shards(model, tmp_path):
  run_dir = tmp_path / "partial"
  with pytest.raises(UserError, match=r"--merge found no shard under"):
    evaluate.merge(str(run_dir), attack_plan=plan)
  _shard(model, run_dir, 0)
  with pytest.raises(UserError, match=r"cannot merge .*shard 1-of-2 \(images 20-39\): not "
                     r"started"):
    evaluate.merge(str(run_dir), attack_plan=plan)
  assert not (run_dir / "results.json").exists()
  # A shard of another evaluation (another seed) in the same run directory.
  other = tmp_path / "other"
  evaluate.run(dataclasses.replace(config(model, other, shard_index=1, num_shards=2), seed=1),
               attack_plan=plan)
  shutil.copytree(other / "shards" / "1-of-2", run_dir / "shards" / "1-of-2")
  with pytest.raises(UserError, match=r"shard 1-of-2: another evaluation \(seed=1 \(merge: 0\)"):
    evaluate.merge(str(run_dir), attack_plan=plan)
  # Shards of two different splits.
  (run_dir / "shards" / "0-of-3").mkdir()
  with pytest.raises(UserError, match=r"shards of different --num_shards \(2, 3\)"):
    evaluate.merge(str(run_dir), attack_plan=plan)


def test_slices_and_shards():
  assert robustness_state.slices(25, 10) == [(0, 10), (10, 20), (20, 25)]
  assert [robustness_state.shard_images(25, 10, i, 2) for i in range(2)] == [(0, 10), (10, 25)]
  assert robustness_state.slice_seed(7, 0) == 7
  seeds = {robustness_state.slice_seed(7, s) for s in range(1, 100)}
  assert len(seeds) == 99 and 7 not in seeds and all(0 <= s < 2**31 for s in seeds)
  with pytest.raises(UserError, match=r"`num_shards`=4 is more than the 3 slices.*"
                     r"--num_shards<=3, or --slice_size<=6"):
    robustness_state.shard_images(25, 10, 0, 4)
  with pytest.raises(UserError, match=r"`shard_index` must be in \[0, num_shards=2\); got 2"):
    config("m", "r", shard_index=2, num_shards=2).validate()
  with pytest.raises(UserError, match=r"`merge` combines the shards already run"):
    config("m", "r", num_shards=2, merge=True).validate()


def test_batch_size_from_memory(model, tmp_path):
  m = keras.models.load_model(model)
  per_image = memory.per_image_bytes(m, (28, 28, 1))
  # The conv's output (13x13x8) and more, forward and backward, plus the attack's copies.
  assert per_image > memory.STATE_COPIES * 28 * 28 * 4 + 13 * 13 * 8 * 4
  batch, details = memory.choose_batch_size(m, (28, 28, 1), available=per_image * 100)
  assert (batch, details["limited_by"]) == (48, "memory")   # 50 floored to a multiple of 8
  assert memory.choose_batch_size(m, (28, 28, 1), available=10**12)[0] == 500
  assert memory.available_bytes() > 0
  # kd-evaluate without --batch_size: chosen once, recorded in results.json.
  res = evaluate.run(dataclasses.replace(config(model, tmp_path / "auto"), batch_size=None,
                                         epsilons=(0.05,), n_examples=10),
                     attack_plan=plan).to_dict()
  assert res["batch_size"] == res["batch_size_auto"]["batch_size"] == 500
  assert res["batch_size_auto"]["per_image_bytes"] == per_image
  assert json.loads((tmp_path / "auto" / "state" / "batch_size.json").read_text()) == \
      res["batch_size_auto"]
