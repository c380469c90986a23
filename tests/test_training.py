"""Tests for keras_defense.training.loop and the kd-train binary."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_defense import data
from keras_defense.models import export
from keras_defense import training
from keras_defense.util.compat import keras
import _helpers
import fake_cifar10

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_short_run_learns(tmp_path):
  config = training.TrainConfig(
      dataset="mnist", run_dir=str(tmp_path / "run"), epochs=2, train_limit=4000,
      test_limit=1000, validation_size=500, learning_rate=0.05,
      lr_decay_epochs=(1,), export_dir=str(tmp_path / "sm"), export_version=1,
      verbose=0)
  result = training.train(config)
  assert result.test_accuracy > 0.85  # chance is 0.10
  assert result.epochs_run == 2
  assert result.saved_model_path == str(tmp_path / "sm" / "1")
  saved = json.loads((tmp_path / "run" / "train_result.json").read_text())
  assert saved["test_accuracy"] == pytest.approx(result.test_accuracy)
  # TensorBoard got loss, accuracy and learning-rate scalars.
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard" / "train"))
  ea.Reload()
  tags = set(ea.Tags()["tensors"]) | set(ea.Tags()["scalars"])
  assert {"epoch_loss", "epoch_accuracy", "epoch_lr"} <= tags, tags


def test_step_schedule():
  lr = training.step_schedule(0.1, (5, 8), 0.5)
  assert [lr(e) for e in (0, 4, 5, 7, 8, 20)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


@pytest.mark.parametrize("field, value, match", [
    ("epochs", 0, "`epochs` must be >= 1"),
    ("model", "vgg", "`model` must be one of"),
    ("optimizer", "rmsprop", "`optimizer` must be one of"),
    ("learning_rate", -1.0, "`learning_rate` must be > 0"),
    ("lr_decay_factor", 0.0, r"`lr_decay_factor` must be in \(0, 1\]"),
    ("compute_dtype", "float16", "`compute_dtype` must be one of"),
])
def test_bad_config(field, value, match):
  config = training.TrainConfig(**{field: value})
  with pytest.raises(training.ConfigError, match=match):
    config.validate()


def test_unknown_or_unsupported_dataset_fails_before_training(tmp_path):
  # The model is picked from the dataset's image shape, so the dataset itself is
  # checked first: an unknown name, or images no C&W network takes.
  for dataset, match in (("imagenet_nope", "'imagenet_nope' is not a tensorflow-datasets"),
                         ("stl10", r"'stl10' is not supported as is: its images are 96x96x3")):
    with pytest.raises(data.DataError, match=match):
      training.train(training.TrainConfig(dataset=dataset, run_dir=str(tmp_path / dataset)))
    assert not (tmp_path / dataset).exists()


def test_cifar10_path_end_to_end_on_tiny_data(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  tarball = fake_cifar10.write_tarball(str(manual), per_batch=100, n_test=50)
  with fake_cifar10.patched_checksum(tarball):
    result = training.train(training.TrainConfig(
        dataset="cifar10", run_dir=str(tmp_path / "run"), epochs=4,
        batch_size=32, optimizer="adam", learning_rate=1e-3, validation_size=20,
        data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
        export_dir=str(tmp_path / "saved_models" / "cifar10_c0"), verbose=0))
  assert result.model.name == "cw_cifar10"
  # The fake classes differ in brightness; 480 images x 4 epochs learn it
  # (seen: 0.72 on the 50 test images; chance is 0.1, and 1 epoch of 180
  # images at SGD 0.01 stayed there at 0.12).
  assert result.test_accuracy > 0.4
  served = export.load_model(result.saved_model_path)
  x = np.zeros((2, 32, 32, 3), np.float32)
  np.testing.assert_allclose(served(x).numpy(), result.model(x).numpy(), atol=1e-5)


def test_bfloat16_training_learns_and_returns_a_float32_model(tmp_path, monkeypatch):
  built = []
  build = training.build_for_training

  def spy(*args, **kwargs):
    model = build(*args, **kwargs)
    built.append(model)
    return model

  monkeypatch.setattr(training.loop, "build_for_training", spy)  # where train looks it up
  result = training.train(training.TrainConfig(
      dataset="mnist", run_dir=str(tmp_path / "run"), epochs=2, train_limit=3000,
      test_limit=500, validation_size=0, lr_decay_epochs=(1,), compute_dtype="bfloat16",
      export_dir=str(tmp_path / "sm"), export_version=1, verbose=0))
  # Trained under mixed_bfloat16: bfloat16 compute, float32 variables...
  (trained,) = built
  assert trained.get_layer("conv1").compute_dtype == "bfloat16"
  assert trained.get_layer("conv1").variable_dtype == "float32"
  # ...handed back and exported in float32 with the trained weights, and the
  # global policy left as it was.
  assert keras.mixed_precision.global_policy().name == "float32"
  assert {l.dtype_policy.name for l in result.model.layers} == {"float32"}
  for a, b in zip(trained.get_weights(), result.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert result.test_accuracy > 0.7  # chance is 0.1
  served = export.load_model(result.saved_model_path)
  x, _ = data.load_arrays("mnist", "test", limit=100)
  np.testing.assert_allclose(served(x).numpy(), result.model(x).numpy(), atol=1e-5)


def _train_args(run_dir, export_dir, epochs):
  return [f"--flagfile={REPO / 'flags' / 'mnist_m0.flags'}",
          f"--run_dir={run_dir}", f"--export_dir={export_dir}",
          f"--epochs={epochs}", "--train_limit=1500", "--test_limit=500",
          "--validation_size=500", "--lr_decay_epochs=3", "--deterministic"]


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
  run_dir, export_dir = tmp_path / "run", tmp_path / "sm"
  backup = run_dir / "backup"
  with _helpers.BinaryServer(["train"], tmp_path / "out") as server:
    # Kill -9 once two epochs have been checkpointed, two before the end (the
    # learning-rate step at epoch 3 among them).
    server.kill_9_when("train", _train_args(run_dir, export_dir, 4),
                       lambda: training.resume_epoch(backup) >= 2, timeout=180,
                       what="two epoch checkpoints")
    assert not (run_dir / "train_result.json").exists()
    resumed_at = training.resume_epoch(backup)
    assert 2 <= resumed_at < 4
    _, err, code = server.run("train", _train_args(run_dir, export_dir, 4))
    assert code == 0, err[-2000:]
    resumed = json.loads((run_dir / "train_result.json").read_text())
    assert resumed["epochs_run"] == 4 - resumed_at  # the killed run's epochs were not redone
    assert (export_dir / "1" / "saved_model.pb").is_file()
    # The same seed and flags without the kill, in a process of its own: the same
    # numbers (epoch-seeded batch order, checkpointed weights/optimizer/RNG, op determinism).
    ref_dir = tmp_path / "reference"
    _, err, code = server.run("train", _train_args(ref_dir, tmp_path / "ref_sm", 4))
    assert code == 0, err[-2000:]
  reference = json.loads((ref_dir / "train_result.json").read_text())
  assert resumed["test_loss"] == reference["test_loss"]
  assert resumed["test_accuracy"] == reference["test_accuracy"]


def _without_tf_native_log(stderr):
  """stderr minus TensorFlow's C++ start-up log (printed before absl logging starts)."""
  return [line for line in stderr.splitlines()
          if not re.match(r"[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", line)
          and not line.startswith("WARNING: All log messages before absl::InitializeLog()")]


@pytest.fixture(scope="module")
def binary_runs(tmp_path_factory):
  """kd-train with a bad flag, then with a missing MNIST folder: one TensorFlow import."""
  tmp = tmp_path_factory.mktemp("binaries")
  missing = tmp / "nope"
  runs = _helpers.run_binaries(
      [("train", ["--epochs=0"]),
       ("train", ["--dataset=mnist", f"--manual_dir={missing}", f"--data_dir={tmp / 'tfds'}",
                  f"--run_dir={tmp / 'run'}"])], tmp / "out")
  return dict(zip(("bad_flag", "user_error"), runs))


def test_binary_bad_flag_is_one_line_no_traceback(binary_runs):
  stdout, stderr, returncode = binary_runs["bad_flag"]
  # docs/RELIABILITY.md, section 2: absl's one-line flag error, exit 1.
  assert returncode == 1
  assert "Traceback" not in stderr
  assert stdout == ""
  assert _without_tf_native_log(stderr) == [
      "FATAL Flags parsing error: flag --epochs=0: 0 is not a positive integer",
      "Pass --helpshort or --helpfull to see help on flags."], stderr


def test_binary_user_error_is_one_line_no_traceback(binary_runs):
  _, stderr, returncode = binary_runs["user_error"]
  assert returncode == 2
  assert "error: MNIST folder" in stderr and "Traceback" not in stderr


_MOVED_MODULES = {"distribution": "training.distribution", "io_utils": "util.io_utils",
                  "provenance": "util.provenance", "compat": "util.compat",
                  "errors": "util.errors"}


def _training_module_at(commit, monkeypatch):
  """keras_defense/training.py as it was at ``commit``, imported under another name."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:keras_defense/training.py"],
                            capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip(f"git history with commit {commit} is not available")
  # The modules it imports moved into packages (issue 24's layout); the code is the same.
  for old, new in _MOVED_MODULES.items():
    source = source.replace(f"from keras_defense import {old}\n",
                            f"from keras_defense.{new.rpartition('.')[0]} import {old}\n")
    source = source.replace(f"from keras_defense.{old} import", f"from keras_defense.{new} import")
  spec = importlib.util.spec_from_loader(f"training_at_{commit}", loader=None)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
  exec(compile(source, f"training.py@{commit}", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def test_standard_training_is_unchanged_by_the_defense_fields(tmp_path, monkeypatch):
  # Commit f775e11 is the last training.py before the trained defenses
  # (adversarial training, distillation) joined the loop; with them off, the
  # same seed must give the same weights, bit for bit (the MNIST reproduction).
  before = _training_module_at("f775e11", monkeypatch)
  kwargs = dict(dataset="mnist", epochs=1, train_limit=512, test_limit=100,
                validation_size=100, batch_size=64, verbose=0)
  old = before.train(before.TrainConfig(run_dir=str(tmp_path / "old"), **kwargs))
  new = training.train(training.TrainConfig(run_dir=str(tmp_path / "new"), **kwargs))
  assert new.defense is None and "defense" not in new.to_dict()
  for a, b in zip(old.model.get_weights(), new.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert new.test_loss == old.test_loss
  assert json.loads((tmp_path / "new" / "run.json").read_text()) == json.loads(
      (tmp_path / "old" / "run.json").read_text())
