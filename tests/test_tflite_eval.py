"""A .tflite is a model like any other: kd.load_model, kd-evaluate's black-box ensemble.

One tiny CNN trained on 1,000 shipped MNIST training images (as
test_quantization), exported as a SavedModel and quantized to a full-integer
.tflite with int8 I/O by keras_defense.compression; evaluated on 40 test images
at ε 0.3 with short attack budgets.
"""

import json
import pathlib

import numpy as np
import pytest

import keras_defense as kd
from keras_defense import attacks
from keras_defense import data
from keras_defense.compression import conversion
from keras_defense.evaluation import black_box
from keras_defense.evaluation import robustness
from keras_defense.evaluation import transfer_cache
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.models import classifier as clf_lib
from keras_defense.models import export
from keras_defense.models import tflite
from keras_defense.pipelines import evaluate
from keras_defense.util import numpy_model
from keras_defense.util import provenance
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

N = 40


def _tiny_model(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((28, 28, 1))
  h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
  h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(32, activation="relu")(h)
  outputs = keras.layers.Dense(10, name="logits")(h)
  return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(float Keras model, SavedModel path, .tflite path, test images, labels)."""
  x_train, y_train = data.load_arrays("mnist", "train", limit=1000)
  x_test, y_test = data.load_arrays("mnist", "test", limit=N)
  model = _tiny_model()
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
  root = tmp_path_factory.mktemp("tfl")
  path = export.export_saved_model(
      model, root / "tiny", version=1,
      provenance=provenance.model_provenance("train", data.info("mnist")))
  content = conversion.convert(path, "ptq_int8", representative=x_train[:100], int8_io=True)
  lite = root / "tiny_int8.tflite"
  lite.write_bytes(content)
  return model, str(path), str(lite), x_test, y_test


def test_load_model_runs_tflite_on_litert_with_int8_io(setup):
  model, _, lite, x, _ = setup
  m = kd.load_model(lite)
  assert isinstance(m, tflite.TFLiteModel) and m.input_dtype == np.int8
  logits = m(x)
  assert logits.shape == (N, 10) and logits.dtype == np.float32
  agree = np.mean(np.argmax(logits, -1) == np.argmax(model.predict(x, verbose=0), -1))
  assert agree >= 0.9


def test_square_runs_on_the_interpreter_and_gradients_are_refused(setup):
  _, _, lite, x, y = setup
  m = kd.load_model(lite)
  before = m.queries
  x_adv, counts = attacks.square(m, x[:8], y[:8], 0.3, queries=30, return_queries=True)
  assert np.abs(x_adv - x[:8]).max() <= 0.3 + 1e-6
  assert m.queries > before and counts.max() <= 30
  # Raised while the attack's step is traced (tf.function wraps it in a StagingError).
  with pytest.raises(Exception, match="no gradients"):
    attacks.pgd(m, x[:2], y[:2], 0.3, step_size=0.01, steps=2)


def test_classifier_of_a_tflite_is_forward_only(setup):
  _, _, lite, x, _ = setup
  clf = clf_lib.load_classifier(lite)
  assert clf.kind == "tflite" and "LiteRT" in clf.describe()
  xt = tf.constant(x[:4])
  with tf.GradientTape() as tape:
    tape.watch(xt)
    out = clf(xt)
  assert out.shape == (4, 10)
  with pytest.raises(numpy_model.NoGradientError):
    tape.gradient(out, xt)


def _config(tmp_path, lite, **kwargs):
  kwargs.setdefault("epsilons", (0.3,))
  kwargs.setdefault("batch_size", N)
  return RobustnessConfig(model=lite, run_dir=str(tmp_path / "run"), dataset="mnist",
                          n_examples=N, square_queries=50, **kwargs)


def test_black_box_ensemble_worst_case_and_report(setup, tmp_path):
  model, sm, lite, x, y = setup
  result = evaluate.run(_config(tmp_path, lite, surrogate=sm))
  assert result.attacks == [*black_box.TRANSFER, "square"]  # a float surrogate: no BPDA
  lite_model = tflite.TFLiteModel(lite)
  correct = lite_model.predict_classes(x) == y
  worst = robustness.robust_masks(tmp_path / "run")[0.3]
  assert worst.sum() == result.epsilons[0].robust
  # Per-image worst case <= each attack alone (all on the clean-correct images).
  fns = dict(black_box.plan_factory(_config(tmp_path / "alone", lite, surrogate=sm))(
      "standard", "linf", None))
  for name, fn in fns.items():
    if name == "square":
      continue  # queries-limited; its own robust count is checked through the report
    x_adv = fn(lite_model, x[correct], y[correct], 0.3, seed=0, batch_size=N,
               compute_dtype="float32")
    alone = correct.copy()
    alone[np.flatnonzero(correct)] = lite_model.predict_classes(x_adv) == y[correct]
    assert worst.sum() <= alone.sum(), name
  # The plain PGD transfer from the float parent: the ensemble is at least as strong.
  pgd_adv = attacks.pgd(model, x[correct], y[correct], 0.3, step_size=0.01, steps=40, seed=0)
  pgd_alone = correct.copy()
  pgd_alone[np.flatnonzero(correct)] = lite_model.predict_classes(pgd_adv) == y[correct]
  assert worst.sum() <= pgd_alone.sum()
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["model_kind"] == "tflite"
  assert results["black_box"]["surrogate"] == sm
  queries = results["black_box"]["queries"]
  square_step = result.epsilons[0].steps[-1]
  if square_step.attacked:
    assert queries["0.3"]["images"] == square_step.attacked
    assert 1 <= queries["0.3"]["max"] <= 50
  report = (tmp_path / "run" / "report.md").read_text()
  assert "Black-box evaluation" in report and "transfer-apgd-t" in report


def test_without_surrogate_square_alone(setup, tmp_path):
  _, _, lite, _, _ = setup
  result = evaluate.run(_config(tmp_path, lite, batch_size=None))  # kd-evaluate's default
  assert result.attacks == ["square"]
  report = (tmp_path / "run" / "report.md").read_text()
  assert "Square alone" in report
  # No gradient attack runs: the batch is the cap, not a gradient step measured on the .tflite.
  auto = json.loads((tmp_path / "run" / "results.json").read_text())["batch_size_auto"]
  assert auto["limited_by"].startswith("cap (no gradient attack")


def test_gradient_attacks_on_a_tflite_are_refused(setup, tmp_path):
  _, sm, lite, _, _ = setup
  with pytest.raises(UserError, match="no gradients"):
    evaluate.run(_config(tmp_path, lite, surrogate=sm, version="custom",
                         attacks=("apgd-ce",)))
  with pytest.raises(UserError, match="surrogate"):
    RobustnessConfig(model=sm, run_dir=str(tmp_path / "r"), surrogate=sm).validate()
  with pytest.raises(UserError, match="no gradients"):
    evaluate.run(_config(tmp_path / "b", lite, surrogate=lite))


def test_transfer_cache_crafts_each_image_once(setup, tmp_path):
  _, sm, lite, x, y = setup
  calls = []

  def craft(target, xb, yb, epsilon, *, seed, batch_size, compute_dtype):  # a stand-in attack
    calls.append(len(xb))
    return np.clip(xb + epsilon * (1 + seed) * np.sign(0.5 - xb), 0, 1)

  fn = transfer_cache.cached(craft, tmp_path / "c", "ab" * 32, "transfer-pgd", "linf")
  kw = {"seed": 0, "batch_size": 8, "compute_dtype": "float32"}
  first = fn(None, x[:10], y[:10], 0.3, **kw)
  again = fn(None, x[5:15], y[5:15], 0.3, **kw)  # 5 stored, 5 new: only those are crafted
  assert calls == [10, 5]
  np.testing.assert_array_equal(again[:5], first[5:])
  # Another seed or ε is another file; the same image twice in a call is stored once.
  fn(None, x[:3], y[:3], 0.3, **{**kw, "seed": 1})
  fn(None, np.concatenate([x[:2], x[:2]]), np.concatenate([y[:2], y[:2]]), 0.1, **kw)
  assert calls == [10, 5, 3, 4]
  with np.load(transfer_cache.cache_path(tmp_path / "c", "ab" * 32, "transfer-pgd", "linf",
                                         0.1, 0)) as z:
    assert len(z["keys"]) == 2
  # Through the plan: the transfer members write the cache of that surrogate file, BPDA none.
  config = _config(tmp_path, lite, surrogate=sm, transfer_cache=str(tmp_path / "tc"))
  fns = dict(black_box.plan_factory(config)("standard", "linf", None))
  a = fns["transfer-pgd"](None, x[:6], y[:6], 0.3, **kw)
  b = fns["transfer-pgd"](None, x[:6], y[:6], 0.3, **kw)
  np.testing.assert_array_equal(a, b)
  sha = clf_lib.fingerprint(sm)
  assert transfer_cache.cache_path(tmp_path / "tc", sha, "transfer-pgd", "linf", 0.3, 0).is_file()
  # The same file under another pixel convention is another surrogate.
  other = _config(tmp_path, lite, surrogate=sm, mean=(0.5,), std=(0.5,))
  assert transfer_cache.surrogate_key(sha, other.pixels()) != sha
  with pytest.raises(UserError, match="transfer_cache"):
    _config(tmp_path, lite, transfer_cache=str(tmp_path / "tc")).validate()


def test_deployment_report_rows_intervals_and_masking_warning(tmp_path):
  from keras_defense.reports import deployment_report  # pylint: disable=g-import-not-at-top
  def row(variant, robust, square=0):
    return {"parent": "M1-AT", "variant": variant, "runtime": "LiteRT", "bytes": 1000,
            "gzip_bytes": 800, "latency_seconds": 1e-4, "clean_correct": 99, "clean_n": 100,
            "agreement": 0.99,
            "robust": {"0.3": {"robust": robust, "n": 200,
                               "per_attack": {"transfer-pgd": 5, "square": square}}},
            "twin_robust": {"0.3": {"robust": 100, "n": 200, "per_attack": {}}}}
  rows = [row("float", 100), row("int8_ptq", 180), row("int8_qat", 100, square=30)]
  config = {"epsilons": (0.3,), "clean_size": 100, "robust_size": 200, "dataset": "mnist",
            "square_queries": 1000, "twin_attacks": None, "twin_version": "standard",
            "latency_repeats": 10, "fine_tune_epochs": 1, "train_limit": None,
            "command": "kd-experiment --flagfile=flags/mnist_deployment.flags"}
  paths = deployment_report.write(tmp_path, rows, config=config)
  md = pathlib.Path(paths["deployment.md"]).read_text()
  assert "90.0% [85.1, 93.4]" in md  # 180/200 with its Wilson interval
  assert "int8_ptq at ε 0.3: black-box robust 90.0% above its twin" in md
  assert "int8_qat at ε 0.3: Square broke 30" in md
  assert "float at" not in md
  assert len(pathlib.Path(paths["rows.csv"]).read_text().splitlines()) == 4


def test_fake_quant_gradient_is_bpda_straight_through():
  """tfmot's FakeQuant ops (forward: round to the int8 grid of [min, max]) have
  TensorFlow's registered gradient: identity inside [min, max], zero outside, i.e.
  the gradient of clip(x, min, max): BPDA's rounding-as-identity (black_box docs)."""
  x = tf.constant(np.linspace(-2.0, 2.0, 81, dtype=np.float32))
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0, num_bits=8)
  g = tape.gradient(y, x).numpy()
  inside = np.abs(x.numpy()) < 1.0 - 1e-6
  np.testing.assert_array_equal(g[inside], 1.0)
  np.testing.assert_array_equal(g[np.abs(x.numpy()) > 1.0 + 1e-6], 0.0)
  # It rounds: to the grid of step 2/255, so by at most half a step.
  assert 0 < np.abs(y.numpy() - np.clip(x.numpy(), -1, 1)).max() <= 1.0 / 255 + 1e-6


@pytest.fixture(scope="module")
def qat_setup(setup, tmp_path_factory):
  """(QAT twin SavedModel, its int8 .tflite): the tiny model fake-quantized by tfmot,
  fine-tuned one epoch, exported (the twin) and converted (what ships)."""
  from keras_defense.compression import qat  # pylint: disable=g-import-not-at-top
  model, _, _, _, _ = setup
  x_train, y_train = data.load_arrays("mnist", "train", limit=1000)
  q = qat.quantize_for_training(model)  # a copy: `model` stays float
  qat.fine_tune(q, tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(64), epochs=1,
                learning_rate=1e-4, verbose=0)
  root = tmp_path_factory.mktemp("qat")
  twin = export.export_saved_model(
      q, root / "twin", version=1,
      provenance=provenance.model_provenance("quantize", data.info("mnist")))
  lite = root / "qat_int8.tflite"
  lite.write_bytes(conversion.convert(q, "qat_int8", representative=x_train[:100]))
  return twin, str(lite)


def test_bpda_members_through_the_qat_twin(setup, qat_setup, tmp_path):
  _, sm, _, x, y = setup
  twin, lite = qat_setup
  assert black_box.is_qat_model(twin) and not black_box.is_qat_model(sm)
  # A QAT surrogate is the twin: its APGD members are the BPDA ones (not run twice).
  auto = _config(tmp_path / "auto", lite, surrogate=twin)
  assert black_box.qat_twin_path(auto) == twin
  assert black_box.attack_names(auto) == ("transfer-pgd", *black_box.BPDA, "square")
  assert black_box.attack_names(_config(tmp_path / "both", lite, surrogate=sm,
                                        qat_twin=twin)) == black_box.ATTACKS
  with pytest.raises(UserError, match="QAT twin"):
    black_box.attack_names(_config(tmp_path / "none", lite, surrogate=sm, version="custom",
                                   attacks=("bpda-apgd-ce",)))
  # BPDA alone at a small ε: examples crafted on the twin, counted on the interpreter.
  config = _config(tmp_path, lite, qat_twin=twin, version="custom",
                   attacks=black_box.BPDA, epsilons=(0.08,), batch_size=None)
  result = evaluate.run(config)
  assert result.attacks == list(black_box.BPDA)
  lite_model = tflite.TFLiteModel(lite)
  state = tmp_path / "run" / "state" / "eps_0.08"
  broken = 0
  for k, name in enumerate(black_box.BPDA):
    with np.load(state / f"{k:02d}_{name}.npz") as z:
      idx, x_adv = z["broken_idx"], z["x_adv"]
    broken += len(idx)
    if len(idx):
      assert np.abs(x_adv - x[idx]).max() <= 0.08 + 1e-6 and 0 <= x_adv.min() <= x_adv.max() <= 1
      # Really misclassified by the interpreter, not only by the twin.
      assert np.all(lite_model.predict_classes(x_adv) != y[idx])
  assert broken > 0  # BPDA finds something at ε 0.08 on a one-epoch tiny model
  assert result.epsilons[0].robust == int(robustness.robust_masks(tmp_path / "run")[0.08].sum())
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["black_box"]["qat_twin"] == twin
  assert results["batch_size_auto"]["per_image_bytes"] > 0  # sized on the twin's APGD step
  assert [s["attack"] for s in results["per_eps"][0]["attacks"]] == list(black_box.BPDA)
  assert "BPDA" in (tmp_path / "run" / "report.md").read_text()
