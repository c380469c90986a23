"""Bad input everywhere a user can give it: one clear error, nothing touched.

One test per row of the bad-input table in docs/RELIABILITY.md (the ids match
its first column). Most cases run in-process through the flag parser, the
config ``validate()`` methods and the library functions; a representative
subset runs the real binaries, which must exit non-zero with an ``error:``
line and no Python traceback. Cases already tested elsewhere (data checksums,
attack argument checks, kd-train's own errors) are listed in the table with
the test that covers them, not repeated here.
"""

import hashlib
import pathlib
import shutil

from absl import flags
import numpy as np
import pytest

import _helpers
from keras_defense import attacks
from keras_defense import data
from keras_defense.evaluation import grid as evaluation
from keras_defense.pipelines import experiment
from keras_defense.models import export
from keras_defense import flags as kd_flags
from keras_defense.defenses import logits_augmentation
from keras_defense.defenses import pruning
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.util.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
M0 = REPO / "saved_models" / "mnist_m0" / "1"


def _parse(*args):
  """Parses ``args`` into a fresh copy of the binaries' flags."""
  fv = _helpers.fresh_flags()
  fv(["kd", *args])
  return fv


def _snapshot(root):
  """Path -> SHA-256 of every file under ``root`` (to prove nothing changed)."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


# --- flags ------------------------------------------------------------------
@pytest.mark.parametrize("case, args, match", [
    ("F1", ["--model=vgg"], r"flag --model=vgg: value should be one of <cw_cifar10\|cw_mnist>"),
    ("F2", ["--epsilons=-0.1"], r"--epsilons must all be in \(0, 1\]; got \['-0.1'\]"),
    ("F3", ["--epsilons="], r"--epsilons must list at least one epsilon"),
    ("F4", ["--epsilons=abc"], r"--epsilons: 'abc' is not a number or a fraction like 8/255"),
    ("F5", ["--epsilons=2"], r"--epsilons must all be in \(0, 1\]; got \['2'\]"),
    ("F6", ["--dense_sparsity=1.0"], r"--dense_sparsity must be in \[0, 1\)"),
    ("F7", ["--conv_sparsity=-0.1"], r"--conv_sparsity must be in \[0, 1\)"),
    ("F8", ["--bim_steps=0"], r"flag --bim_steps=0: 0 is not a positive integer"),
    ("F9", ["--finetune_epochs=0"], r"flag --finetune_epochs=0: 0 is not a positive integer"),
    ("F10", ["--logits_epsilon=-1"], r"flag --logits_epsilon=-1: -1.0 is not a non-negative number"),
    ("F11", ["--attacks=pgd2"], r"--attacks must be from fgsm, bim; got pgd2"),
    ("F12", ["--threat_models=white_box"],
     r"--threat_models must be from grey_box, transfer, adaptive; got white_box"),
    ("F13", ["--train_flagfile=/no/such.flags"], r"--train_flagfile must name an existing flagfile"),
])
def test_bad_flag_value(case, args, match):
  del case
  with pytest.raises(flags.IllegalFlagValueError, match=match):
    _parse(*args)


def test_F14_unknown_dataset_for_training(tmp_path):
  config = dataclass_replace(kd_flags.train_config(_parse("--dataset=imagenet_nope")),
                             run_dir=str(tmp_path / "run"))
  with pytest.raises(data.DataError, match=r"'imagenet_nope' is not a tensorflow-datasets dataset"):
    training.train(config)
  assert not (tmp_path / "run").exists()


def test_F15_unknown_dataset_for_pruning(tmp_path):
  config = dataclass_replace(kd_flags.prune_config(_parse("--dataset=imagenet_nope")),
                             base_model_path=str(M0), run_dir=str(tmp_path / "run"))
  with pytest.raises(data.DataError, match=r"'imagenet_nope' is not a tensorflow-datasets dataset"):
    pruning.prune(config)


def dataclass_replace(obj, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(obj, **kw)


# --- paths ------------------------------------------------------------------
@pytest.fixture
def a_file(tmp_path):
  f = tmp_path / "a_file"
  f.write_text("keep me\n")
  return f


def test_P1_run_dir_is_a_file(a_file):
  with pytest.raises(training.ConfigError,
                     match=r"`run_dir` '.*a_file' cannot be a directory: .* is not a directory"):
    training.TrainConfig(run_dir=str(a_file)).validate()
  assert a_file.read_text() == "keep me\n"


def test_P2_prune_run_dir_under_a_file(a_file):
  with pytest.raises(training.ConfigError, match=r"`run_dir` .* exists and is not a directory"):
    pruning.PruneConfig(run_dir=str(a_file / "run")).validate()


def test_P3_export_dir_is_a_file(a_file, tmp_path):
  with pytest.raises(training.ConfigError, match=r"`export_dir` '.*a_file' cannot be a directory"):
    training.TrainConfig(run_dir=str(tmp_path / "run"), export_dir=str(a_file)).validate()
  with pytest.raises(training.ConfigError, match=r"`export_dir`"):
    logits_augmentation.AugmentConfig(export_dir=str(a_file)).validate()
  with pytest.raises(UserError, match=r"`export_dir` '.*a_file' cannot hold a SavedModel"):
    export.export_saved_model(export.load_model(M0), a_file, version=1)
  assert a_file.read_text() == "keep me\n"


def test_P4_experiment_run_dir_is_a_file(a_file):
  config = experiment.ExperimentConfig(
      run_dir=str(a_file), train=training.TrainConfig(), prune=pruning.PruneConfig(),
      augment=logits_augmentation.AugmentConfig(), eval=evaluation.EvalConfig())
  with pytest.raises(UserError, match=r"`run_dir` '.*a_file' cannot be a directory"):
    experiment.run(config)


def test_P5_prune_base_model_missing(tmp_path):
  config = pruning.PruneConfig(base_model_path=str(tmp_path / "nope"),
                               run_dir=str(tmp_path / "run"))
  with pytest.raises(export.ModelLoadError, match=r"model path '.*nope' does not exist"):
    pruning.prune(config)
  assert not (tmp_path / "run").exists()  # nothing written


def test_P6_augment_base_model_missing(tmp_path):
  config = logits_augmentation.AugmentConfig(base_model_path=str(tmp_path / "nope"),
                                             export_dir=str(tmp_path / "sm"))
  with pytest.raises(export.ModelLoadError, match=r"model path '.*nope' does not exist"):
    logits_augmentation.augment(config)
  assert not (tmp_path / "sm").exists()


def test_P7_data_dir_is_a_file(a_file):
  with pytest.raises(data.DataError, match=r"could not prepare dataset 'mnist'.*Not a directory"):
    data.info("mnist", data_dir=str(a_file))
  assert a_file.read_text() == "keep me\n"


# --- models -----------------------------------------------------------------
@pytest.fixture
def m0_copy(tmp_path):
  d = tmp_path / "m0"
  shutil.copytree(M0, d)
  return d


def test_M1_missing_saved_model(tmp_path):
  with pytest.raises(export.ModelLoadError, match=r"model path '.*nope' does not exist; "
                     r"expected a SavedModel directory"):
    export.load_model(tmp_path / "nope")


def test_M2_folder_without_saved_model_pb(tmp_path):
  with pytest.raises(export.ModelLoadError, match=r"is not a SavedModel \(no saved_model.pb in it\)"):
    export.load_model(tmp_path)


def test_M3_corrupt_saved_model_pb(m0_copy):
  (m0_copy / "saved_model.pb").write_bytes(b"\x00garbage" * 50)
  with pytest.raises(export.ModelLoadError, match=r"could not load the model at .*corrupt"):
    export.load_model(m0_copy)


def test_M4_missing_variables(m0_copy):
  shutil.rmtree(m0_copy / "variables")
  with pytest.raises(export.ModelLoadError, match=r"could not load the model .*variables"):
    export.load_model(m0_copy)


def test_M5_truncated_variables(m0_copy):
  f = m0_copy / "variables" / "variables.data-00000-of-00001"
  f.write_bytes(f.read_bytes()[:1000])
  with pytest.raises(export.ModelLoadError, match=r"could not load the model at"):
    export.load_model(m0_copy)


def test_M6_garbage_h5_file(tmp_path):
  (tmp_path / "model.h5").write_bytes(b"not hdf5")
  with pytest.raises(export.ModelLoadError, match=r"could not load the model at '.*model.h5'"):
    export.load_model(tmp_path / "model.h5")


def _lambda_model():
  inputs = keras.Input((28, 28, 1))
  x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
  return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))


@pytest.mark.parametrize("case, name, kwargs", [
    ("M7", "model.keras", {}),
    ("M8", "model.h5", {}),
    ("M9", "saved", {"save_format": "tf"}),
])
def test_lambda_layers_are_refused_before_any_python_runs(tmp_path, case, name, kwargs):
  del case
  _lambda_model().save(tmp_path / name, **kwargs)
  with pytest.raises(export.ModelLoadError,
                     match=r"\(tf_keras (\(Keras 2\) \.(keras|h5) file, saved with Keras 2\.[0-9.]+|"
                           r"SavedModel)\): layer 'lambda(_\d+)?' is a Lambda: its Python code would "
                           r"run on load; refusing"):
    export.load_model(tmp_path / name)


_BUILT = []  # one entry per Doubling ever constructed


@keras.utils.register_keras_serializable(package="kd_test")
class Doubling(keras.layers.Layer):
  """A custom (non-Lambda) layer Keras *can* rebuild, being registered."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    _BUILT.append(self)

  def call(self, inputs):
    return inputs * 2.0


@pytest.mark.parametrize("name, kwargs", [
    ("model.keras", {}), ("model.h5", {}), ("saved", {"save_format": "tf"})])
def test_custom_layer_classes_are_refused_too(tmp_path, name, kwargs):
  inputs = keras.Input((4,))
  keras.Model(inputs, keras.layers.Dense(2)(Doubling()(inputs))).save(tmp_path / name, **kwargs)
  _BUILT.clear()
  # Registered, so Keras itself would load it and run Doubling.__init__.
  with pytest.raises(export.ModelLoadError,
                     match=r"layer 'doubling(_\d+)?' is a '(kd_test>)?Doubling', which is not "
                           r"a built-in Keras class; refusing"):
    export.load_model(tmp_path / name)
  assert _BUILT == []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished 1-epoch cw_mnist training run directory."""
  run_dir = tmp_path_factory.mktemp("trained") / "run"
  training.train(training.TrainConfig(run_dir=str(run_dir), epochs=1, train_limit=300,
                                      test_limit=100, validation_size=100, verbose=0))
  return run_dir


def test_M10_run_dir_of_another_architecture(trained_run):
  before = _snapshot(trained_run)
  config = training.TrainConfig(run_dir=str(trained_run), model="cw_cifar10", epochs=1,
                                train_limit=300, test_limit=100, validation_size=100,
                                verbose=0)
  with pytest.raises(training.ConfigError,
                     match=r"`run_dir` '.*' holds another run \(model='cw_mnist'\); this one "
                           r"has model='cw_cifar10'.*pass a new `run_dir`"):
    training.train(config)
  assert _snapshot(trained_run) == before


# --- tensors handed to the library -----------------------------------------
_X = np.full((4, 28, 28, 1), 0.5, np.float32)
_Y = np.array([0, 1, 2, 3])
_EVAL = evaluation.EvalConfig(attacks=("fgsm",), epsilons=(0.1,), cw_attacks=(),
                              threat_models=("grey_box",), targeted_modes=(False,))


@pytest.fixture(scope="module")
def m0():
  return export.load_model(M0)


@pytest.mark.parametrize("case, call, error, match", [
    ("T1", lambda m: attacks.fgsm(m, np.full_like(_X, np.inf), _Y, 0.1), ValueError,
     r"`x` must not contain NaN or inf; found 3136 such values"),
    ("T2", lambda m: attacks.fgsm(m, (_X * 255).astype(np.uint8), _Y, 0.1), TypeError,
     r"`x` must hold floating-point images \(float32 NHWC\); got dtype uint8"),
    ("T3", lambda m: attacks.fgsm(m, _X, np.array([0, 1, 2, 10]), 0.1), ValueError,
     r"`y` must be class ids in \[0, 10\); got values in \[0, 10\]"),
    ("T4", lambda m: attacks.fgsm(m, _X, np.array([0, 1, 2, -1]), 0.1), ValueError,
     r"`y` must be class ids in \[0, 10\); got values in \[-1, 2\]"),
    ("T5", lambda m: attacks.fgsm(m, _X, _Y[:3], 0.1), ValueError,
     r"`y` must have one label per image: expected 4 labels to match `x`; got 3"),
    ("T6", lambda m: attacks.fgsm(m, _X, _Y, -0.1), ValueError, r"`epsilon` must be >= 0; got -0.1"),
    ("T7", lambda m: attacks.fgsm(m, np.zeros((4, 32, 32, 3), np.float32), _Y, 0.1), ValueError,
     r"expected shape=\(None, 28, 28, 1\), found shape=\(.*32, 32, 3\)"),
    ("T8", lambda m: evaluation.evaluate({"m0": m}, _X[0], _Y, _EVAL, source="m0",
                                         num_classes=10), ValueError,
     r"`x` must be a rank-4 NHWC batch \(N, H, W, C\); got shape \(28, 28, 1\)"),
    ("T9", lambda m: evaluation.evaluate({"m0": m}, _X * 3, _Y, _EVAL, source="m0",
                                         num_classes=10), ValueError,
     r"`x` must lie in \[clip_min, clip_max\] = \[0, 1\]; got values in \[1.5, 1.5\]"),
    ("T10", lambda m: evaluation.evaluate({"m0": m}, _X, np.array([0, 1, 2, 11]), _EVAL,
                                          source="m0", num_classes=10), ValueError,
     r"`y` must be class ids in \[0, 10\); got values in \[0, 11\]"),
    ("T11", lambda m: logits_augmentation.augment_logits(m, epsilon=float("nan")), ValueError,
     r"`epsilon` must be a finite float >= 0; got nan"),
    ("T12", lambda m: evaluation.EvalConfig(epsilons=()).validate(), UserError,
     r"`epsilons` must list at least one epsilon; got an empty list"),
])
def test_bad_tensor_or_argument(m0, case, call, error, match):
  del case
  with pytest.raises(error, match=match):
    call(m0)


# --- the binaries -------------------------------------------------------------
def test_binaries_refuse_bad_input_without_traceback(tmp_path, a_file, trained_run):
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "saved_model.pb").write_bytes(b"garbage")
  trained_before = _snapshot(trained_run)
  cases = {  # id: (binary, args, exit code, text in stderr)
      "B1": ("experiment", ["--epsilons=-0.1"], 1, "--epsilons must all be in (0, 1]"),
      "B2": ("experiment", ["--train_flagfile=/no/such.flags"], 1,
             "--train_flagfile must name an existing flagfile"),
      "B3": ("prune", ["--dense_sparsity=1.0"], 1, "--dense_sparsity must be in [0, 1)"),
      "B4": ("prune", [f"--base_model_path={tmp_path / 'nope'}", f"--run_dir={tmp_path / 'r4'}"],
             2, "error: model path"),
      "B5": ("augment", [f"--base_model_path={corrupt}", f"--export_dir={tmp_path / 'e5'}"],
             2, "error: could not load the model at"),
      "B6": ("train", [f"--run_dir={a_file}"], 2, "error: `run_dir`"),
      "B7": ("train", [f"--run_dir={trained_run}", "--model=cw_cifar10", "--epochs=1"], 2,
             "error: `run_dir` " + repr(str(trained_run)) + " holds another run"),
      # A message with its own "Fix:" line still prints as one line.
      "B8": ("train", [f"--data_dir={a_file}", f"--run_dir={tmp_path / 'r8'}"], 2,
             "error: could not prepare dataset 'mnist'"),
  }
  # One TensorFlow import for the eight: each case runs in a fork taken after it.
  procs = dict(zip(cases, _helpers.run_binaries(
      [(name, args) for name, args, _, _ in cases.values()], tmp_path / "binaries")))
  for k, (_, _, code, text) in cases.items():
    _, stderr, returncode = procs[k]
    assert returncode == code, (k, stderr[-2000:])
    assert text in stderr, (k, stderr[-2000:])
    assert "Traceback" not in stderr, (k, stderr[-2000:])
    if code == 2:
      errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
      assert len(errors) == 1 and text in errors[0], (k, stderr[-2000:])
  assert "Fix:" in [l for l in procs["B8"][1].splitlines() if l.startswith("error: ")][0]
  # Nothing already written was touched, nothing new was half-written.
  assert a_file.read_text() == "keep me\n"
  assert _snapshot(trained_run) == trained_before
  assert not (tmp_path / "r4").exists() and not (tmp_path / "e5").exists()
  assert not (tmp_path / "r8").exists()
