"""Tests for keras_defense.training.distribution and distributed attack evaluation.

Logical CPU devices must be configured before TensorFlow initialises its
devices, and MultiWorkerMirroredStrategy owns its process, so the mirrored and
multi-worker runs happen in child processes (``_WORKER`` below) that train a
tiny model a few steps, then run a small BIM grid (FGSM is BIM's one-step case
on the same compiled core) once on one device and
once under the strategy and report both. Select with
``pytest -k "distribut or mirrored or multi_worker"``.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from keras_defense import data
from keras_defense.training import distribution
from keras_defense import training

_WORKER = r'''
import json, sys
from keras_defense.training import distribution
name, out = sys.argv[1], sys.argv[2]
strategy = distribution.make_strategy(name, num_cpu_devices=2 if name == "mirrored" else None)
from keras_defense import data
from keras_defense.evaluation import grid as evaluation
from keras_defense import training
from keras_defense.util.compat import keras
run = sys.argv[3]
result = training.train(training.TrainConfig(
    run_dir=run + "/train", epochs=1, batch_size=64, train_limit=512, test_limit=100,
    validation_size=0, lr_decay_epochs=(2,), optimizer="adam", learning_rate=1e-3,
    dropout=0.0, strategy=name,
    num_cpu_devices=2 if name == "mirrored" else None, export_dir=run + "/sm",
    export_version=1, seed=0, verbose=0))
m0 = result.model
m1 = keras.models.clone_model(m0)
m1.set_weights([w * 3.0 for w in m0.get_weights()])  # another model to transfer to
x, y = data.load_arrays("mnist", "test")
x, y = x[:100], y[:100]
config = evaluation.EvalConfig(
    attacks=("bim",), epsilons=(0.3,), targeted_modes=(False, True),
    threat_models=("grey_box", "transfer"), bim_steps=3, cw_attacks=(), batch_size=50)
models = {"m0": m0, "m1": m1}
def counts(rows):
  return sorted([r["model"], r["attack"], r["targeted"], r["epsilon"], r["threat_model"],
                 r["n"], r["successes"], r["mean_linf"]] for r in rows)
# The one-device reference (every worker holds the same model: the chief's is enough).
single = (evaluation.evaluate(models, x, y, config, source="m0", num_classes=10)[0]
          if distribution.is_chief(strategy) else None)
dist, _ = evaluation.evaluate(models, x, y, config, source="m0", num_classes=10,
                              strategy=strategy)
# Each crafter's distributed step, traced once for both targeted modes.
from keras_defense.attacks import runtime
traces = sorted(step.experimental_get_tracing_count() for m in models.values()
                for key, step in runtime.model_cache(m).items() if key[0] == "distributed")
# kd-evaluate --strategy=mirrored: the attacks' batches split across the
# replicas give the one-device run's per-image outcomes (same seeds, batches).
evaluated = None
if name == "mirrored":
  import numpy as np
  from keras_defense.evaluation import robustness_config
  from keras_defense.pipelines import evaluate as evaluate_pipeline
  states = {}
  for s in ("default", "mirrored"):
    cfg = robustness_config.RobustnessConfig(
        model=run + "/sm/1", output_key="logits", run_dir=run + "/eval_" + s,
        epsilons=(0.1,), n_examples=25, version="custom", attacks=("apgd-ce",),
        batch_size=20, strategy=s, num_cpu_devices=2 if s == "mirrored" else None)
    res = evaluate_pipeline.run(cfg)
    state = np.load(run + "/eval_" + s + "/state/eps_0.1/00_apgd-ce.npz")
    states[s] = (res.clean_correct, [e.robust for e in res.epsilons],
                 state["robust"].tolist(), state["broken_idx"].tolist())
  summary = json.load(open(run + "/eval_mirrored/results.json"))
  evaluated = {"states": states, "strategy": summary.get("strategy"),
               "default_has_key": "strategy" in json.load(open(run + "/eval_default/results.json"))}
with open(out, "w") as f:
  json.dump({"evaluated": evaluated, "replicas": strategy.num_replicas_in_sync,
             "chief": distribution.is_chief(strategy), "epochs_run": result.epochs_run,
             "saved": result.saved_model_path,
             "single": single and counts(single), "distributed": counts(dist),
             "traces": traces}, f)
'''


@pytest.fixture(scope="module")
def worker_script(tmp_path_factory, tfds_dir):
  data.info("mnist")  # build the shipped MNIST once, before children share the dir
  path = tmp_path_factory.mktemp("distribution") / "worker.py"
  path.write_text(_WORKER)
  return path


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


def _check_equal_counts(report):
  assert report["epochs_run"] == 1
  assert len(report["single"]) == 2 * 3  # modes x (2 grey_box + 1 transfer) cells
  assert any(row[6] > 0 for row in report["single"])  # some attacks succeed
  assert report["distributed"] == report["single"]
  # One step per crafter (m0 and m1), one trace for both targeted modes.
  assert report["traces"] == [1, 1]


def test_mirrored_two_cpu_devices_train_and_attack_counts_equal(worker_script, tmp_path):
  out = tmp_path / "mirrored.json"
  subprocess.run([sys.executable, str(worker_script), "mirrored", str(out), str(tmp_path)],
                 env=_env(), check=True, timeout=420, capture_output=True)
  report = json.loads(out.read_text())
  assert report["replicas"] == 2
  assert report["saved"] == str(tmp_path / "sm" / "1")
  assert (tmp_path / "sm" / "1" / "saved_model.pb").is_file()
  _check_equal_counts(report)
  # kd-evaluate under the strategy: the same clean/robust counts and broken images.
  ev = report["evaluated"]
  assert ev["states"]["mirrored"] == ev["states"]["default"]
  clean, robust, _, broken = ev["states"]["default"]
  assert clean > robust[0] >= 0 and broken  # APGD broke some images, not all
  assert ev["strategy"] == "mirrored" and not ev["default_has_key"]


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def test_multi_worker_two_processes_on_loopback_counts_equal(worker_script, tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs, outs = [], []
  try:
    for index in range(2):
      tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
      out = tmp_path / f"worker{index}.json"
      outs.append(out)
      log = open(tmp_path / f"worker{index}.log", "w")  # pylint: disable=consider-using-with
      procs.append(subprocess.Popen(
          [sys.executable, str(worker_script), "multi_worker", str(out), str(tmp_path)],
          env=_env(TF_CONFIG=json.dumps(tf_config)), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 240
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
    for i, p in enumerate(procs):
      assert p.returncode == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
  chief, other = (json.loads(o.read_text()) for o in outs)
  assert chief["chief"] and not other["chief"]
  assert chief["replicas"] == other["replicas"] == 2
  # Only the chief wrote artifacts; the other worker's temp copies are gone.
  assert (tmp_path / "train" / "train_result.json").is_file()
  assert (tmp_path / "sm" / "1" / "saved_model.pb").is_file()
  assert not list(tmp_path.glob("**/workertemp_*/saved_model.pb"))
  assert other["saved"] == chief["saved"] == str(tmp_path / "sm" / "1")
  _check_equal_counts(chief)
  assert other["single"] is None and other["epochs_run"] == 1
  assert other["distributed"] == chief["distributed"] == chief["single"]


def test_distribution_default_strategy_is_tf_default():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert distribution.make_strategy("default") is tf.distribute.get_strategy()
  assert distribution.output_path("/a/b", distribution.make_strategy()) == "/a/b"


@pytest.mark.parametrize("name, kwargs, match", [
    ("mirroredd", {}, "`strategy` must be one of default, mirrored, multi_worker"),
    ("default", {"num_cpu_devices": 2}, "`num_cpu_devices` only applies to"),
    ("multi_worker", {}, "needs the TF_CONFIG environment variable"),
])
def test_distribution_bad_strategy(name, kwargs, match, monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(distribution.StrategyError, match=match):
    distribution.make_strategy(name, **kwargs)


@pytest.mark.parametrize("tf_config, match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "must have a 'cluster'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
     "'task' must name a job"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     r"index must be in \[0, 1\)"),
])
def test_multi_worker_bad_tf_config(tf_config, match, monkeypatch):
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(distribution.StrategyError, match=match):
    distribution.make_strategy("multi_worker")


def test_mirrored_after_devices_initialised_is_a_clear_error():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.constant(1.0)  # devices are initialised in the pytest process
  have = len(tf.config.list_logical_devices("CPU"))
  with pytest.raises(distribution.StrategyError, match="already initialised its devices"):
    distribution.configure_cpu_devices(have + 1)


def test_distribution_train_config_checks_strategy():
  with pytest.raises(training.ConfigError, match="`strategy` must be one of"):
    training.TrainConfig(strategy="tpu").validate()
  with pytest.raises(training.ConfigError, match="`num_cpu_devices` must be >= 1"):
    training.TrainConfig(strategy="default", num_cpu_devices=2).validate()
