"""Crash safety and reproducibility of the whole pipeline, with real processes.

``kd-experiment`` on a tiny configuration is killed with SIGKILL twice (once
while pruning, once inside the attack grid) and rerun; its ``results.json``
must hold the same rows and model facts as an uninterrupted run with the same
seed (``seconds`` aside), which also checks that two processes with the same
seed and flags give identical numbers; the groups of attack cells the killed
run finished are kept, not recomputed. Every run is a process of its own, forked
from one child that imported the package once (``_helpers.BinaryServer``).
"""

import json

import pytest

import _helpers
from keras_defense import data
from keras_defense.evaluation import grid as evaluation

# The tiny data and the training flags the train and prune stages share.
_DATA = """--dataset=mnist
--train_limit=1500
--test_limit=500
--validation_size=500
--lr_decay_epochs=100
--seed=0
"""
_TRAIN = _DATA + """--epochs=1
"""
_PRUNE = _DATA + """--finetune_epochs=1
--pruning_end_epoch=0.5
--pruning_frequency=5
--dense_sparsity=0.5
--conv_sparsity=0.5
--optimizer=adam
--learning_rate=0.001
"""
_AUGMENT = """--dataset=mnist
--logits_epsilon=20
--test_limit=500
"""


@pytest.fixture(scope="module")
def flagfiles(tmp_path_factory):
  data.info("mnist")  # build the hermetic tfds copy once, before the children run
  d = tmp_path_factory.mktemp("flags")
  for name, text in (("train", _TRAIN), ("prune", _PRUNE), ("augment", _AUGMENT)):
    (d / f"{name}.flags").write_text(text)
  return d


def _args(flagfiles, run_dir):
  """kd-experiment's command line on the tiny configuration."""
  return [f"--run_dir={run_dir}", f"--train_flagfile={flagfiles / 'train.flags'}",
          f"--prune_flagfile={flagfiles / 'prune.flags'}",
          f"--augment_flagfile={flagfiles / 'augment.flags'}",
          "--eval_size=100", "--epsilons=0.3", "--attacks=fgsm,bim", "--bim_steps=3",
          "--targeted_modes=untargeted", "--cw_attacks=", "--seed=0",
          "--deterministic", "--attack_batch_size=50",
          # The AutoAttack stage is robustness.run, whose kill -9 resume
          # tests/test_evaluate.py covers; here it would only add tracing time.
          "--autoattack_version=none"]


def _run(server, args):
  _, stderr, code = server.run("experiment", args)
  assert code == 0, stderr[-3000:]


def _numbers(run_dir):
  results = json.loads((run_dir / "results.json").read_text())
  rows = [{k: v for k, v in r.items() if k != "seconds"} for r in results["rows"]]
  return rows, results["models"], results


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_results(tmp_path, flagfiles):
  clean, crashed = tmp_path / "clean", tmp_path / "crashed"
  # Each run is a process of its own, forked from one that imported the package once.
  with _helpers.BinaryServer(["experiment"], tmp_path / "server", timeout=600) as server:
    _run(server, _args(flagfiles, clean))

    # Kill 1: in the pruning stage, once it has loaded M0 and claimed its run
    # directory, before its first epoch checkpoint. (A kill after an epoch
    # checkpoint resumes from it with the same weights but a restarted shuffle
    # order and dropout RNG, so the final numbers differ slightly: see
    # docs/RELIABILITY.md.)
    server.kill_9_when("experiment", _args(flagfiles, crashed),
                       (crashed / "m1" / "run.json").is_file, timeout=300,
                       what="the pruning stage")
    assert (crashed / "stages" / "train.json").is_file()
    assert not (crashed / "stages" / "prune.json").exists()
    assert not any((crashed / "m1" / "backup").rglob("*.index")), "killed too late"
    # Kill 2: inside the attack grid, once its first group of cells (one crafted
    # batch, scored on each model it targets) is on disk.
    cells = crashed / "attack" / "cells"
    groups = [[cells / f"{evaluation.cell_key(p, g.attack, g.targeted, g.epsilon)}.json"
               for p in g.plans] for g in evaluation.build_groups(
                   ["m0", "m1", "m2"], "m0", evaluation.EvalConfig(
                       attacks=("fgsm", "bim"), epsilons=(0.3,), targeted_modes=(False,),
                       cw_attacks=()))]
    server.kill_9_when("experiment", _args(flagfiles, crashed),
                       lambda: all(f.is_file() for f in groups[0]), timeout=300,
                       what="a finished group of attack cells")
    assert not (crashed / "stages" / "attack.json").exists()
    # No half-written artifact is left under its final name. (A kill inside a
    # write may leave a hidden .tmp sibling, which nothing reads.)
    for path in crashed.rglob("*.json"):
      json.loads(path.read_text())
    finished = [f for g in groups if all(f.is_file() for f in g) for f in g]
    before = {f: f.stat().st_mtime_ns for f in finished}
    assert 0 < len(before) < sum(map(len, groups)), "killed too late"
    _run(server, _args(flagfiles, crashed))
    # The rerun kept the groups the killed run finished: not recomputed. (A
    # group cut off mid-way is computed again, whole.)
    assert {f: f.stat().st_mtime_ns for f in finished} == before

  rows, models, results = _numbers(crashed)
  clean_rows, clean_models, _ = _numbers(clean)
  assert len(rows) == 2 * 8  # fgsm/bim x (3 grey_box + 2 transfer + 3 adaptive)
  assert rows == clean_rows
  for facts in (models, clean_models):
    for f in facts.values():
      f.pop("saved_model")  # paths differ between the two run dirs
  assert models == clean_models
  # Every report records seeds, versions and flags.
  assert results["config"]["seed"] == 0 and results["config"]["deterministic"] is True
  assert results["config"]["train"]["seed"] == 0
  assert {"tensorflow", "tf_keras", "tfmot", "numpy", "python"} <= set(results["versions"])
  assert "--deterministic" in results["command"]
