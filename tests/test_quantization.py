"""Tests of keras_defense.compression and models.tflite: PTQ, QAT, clustering, LiteRT.

One tiny CNN trained on 1,000 shipped MNIST training images, exported as a
SavedModel (two serving signatures, like every model we ship); the PTQ and QAT
flatbuffers are run on LiteRT and compared with it on 300 test images.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _helpers
from keras_defense import compression
from keras_defense import data
from keras_defense.compression import conversion
from keras_defense.compression import measurement
from keras_defense.compression import qat
from keras_defense.models import export
from keras_defense.models import tflite
from keras_defense.util import provenance
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError


def _tiny_model(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((28, 28, 1))
  h = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
  h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(h)
  h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(32, activation="relu", name="dense1")(h)
  outputs = keras.layers.Dense(10, name="logits")(h)
  return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(float model, its SavedModel path, train images, train labels, test images)."""
  x_train, y_train = data.load_arrays("mnist", "train", limit=1000)
  x_test, _ = data.load_arrays("mnist", "test", limit=300)
  model = _tiny_model()
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
  path = export.export_saved_model(
      model, tmp_path_factory.mktemp("sm") / "tiny", version=1,
      provenance=provenance.model_provenance("train", data.info("mnist")))
  return model, path, x_train, y_train, x_test


def _agreement(model, content, x):
  return measurement.agreement(model.predict(x, verbose=0),
                                           tflite.TFLiteModel(content)(x))


@pytest.mark.parametrize("method", conversion.PTQ_METHODS)
def test_ptq_method_runs_on_litert_and_agrees(setup, method):
  model, path, x_train, _, x_test = setup
  content = conversion.convert(path, method, representative=x_train[:100])
  lite = tflite.TFLiteModel(content)
  assert lite.input_dtype == np.float32 and lite.output_dtype == np.float32
  assert _agreement(model, content, x_test) >= 0.95
  if method == "ptq_int8":  # full integer: the convolutions run in int8
    assert "QUANTIZE" in lite.ops and "DEQUANTIZE" in lite.ops


def test_only_serving_default_is_converted(setup):
  _, path, x_train, _, _ = setup
  one = conversion.convert(path, "ptq_int8", representative=x_train[:20])
  both_converter = tf.lite.TFLiteConverter.from_saved_model(path)  # every signature
  both_converter.optimizations = [tf.lite.Optimize.DEFAULT]
  both_converter.representative_dataset = conversion.representative_dataset(x_train[:20])
  both = both_converter.convert()
  from ai_edge_litert.interpreter import Interpreter
  assert list(Interpreter(model_content=one).get_signature_list()) == ["serving_default"]
  assert len(Interpreter(model_content=both).get_signature_list()) == 2
  # The weights are stored once, not once per signature (issue 27, M1-AT: 335 KB
  # against 1.59 MB).
  assert len(one) < 0.6 * len(both)


def test_int8_io_round_trip(setup):
  model, path, x_train, _, x_test = setup
  float_io = tflite.TFLiteModel(conversion.convert(path, "ptq_int8",
                                                   representative=x_train[:100]))
  int8_io = tflite.TFLiteModel(conversion.convert(path, "ptq_int8", int8_io=True,
                                                  representative=x_train[:100]))
  assert int8_io.input_dtype == np.int8 and int8_io.output_dtype == np.int8
  scale, zero_point = int8_io._output["quantization"]  # pylint: disable=protected-access
  a, b = float_io(x_test), int8_io(x_test)
  # The same int8 network; only the boundary (de)quantization moved into the caller.
  assert np.max(np.abs(a - b)) <= 2 * scale + 1e-6
  assert np.mean(np.argmax(b, -1) == np.argmax(model.predict(x_test, verbose=0), -1)) >= 0.95
  in_scale, in_zero = int8_io._input["quantization"]  # pylint: disable=protected-access
  q = tflite.quantize(x_test[:10], in_scale, in_zero, np.int8)
  assert q.dtype == np.int8
  assert np.max(np.abs(tflite.dequantize(q, in_scale, in_zero) - x_test[:10])) <= in_scale / 2 + 1e-6


def test_qat_one_epoch_converts(setup):
  model, _, x_train, y_train, x_test = setup
  q = qat.quantize_for_training(model, preserve="none")
  train = tf.data.Dataset.from_tensor_slices((x_train[:512], y_train[:512])).batch(64)
  losses = qat.fine_tune(q, train, epochs=1, verbose=0)
  assert len(losses) == 1 and np.isfinite(losses[0])
  content = conversion.convert(q, "qat_int8", representative=x_train[:50])
  assert _agreement(model, content, x_test) >= 0.9


def _range_values(model):
  """The quantization ranges of a QAT model, in layer order."""
  return [v.numpy() for v in model.non_trainable_variables
          if v.name.endswith(("_min:0", "_max:0"))]


def _with_pruned_filters(model):
  """``model`` with conv1's and conv2's first filters all zero and a bias of 0.3 each."""
  pruned = keras.models.clone_model(model)
  pruned.set_weights(model.get_weights())
  for name in ("conv1", "conv2"):
    kernel, bias = pruned.get_layer(name).get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.3
    pruned.get_layer(name).set_weights([kernel, bias])
  return pruned


def test_qat_ranges_are_calibrated_like_ptq(setup):
  """Before any fine-tuning, the QAT flatbuffer is PTQ's: same ranges, same logits.

  Uncalibrated, tfmot's ranges start at [-6, 6] (weights and activations) and
  the int8 network is another one: the control below. The model has two filters
  pruned to zero with a bias: their weight range must not be [0, 0], whose int32
  bias overflows in the converter.
  """
  model, _, x_train, _, x_test = setup
  model = _with_pruned_filters(model)
  rep = x_train[:100]
  ptq = tflite.TFLiteModel(conversion.convert(model, "ptq_int8", representative=rep))(x_test)
  scale = float(np.max(np.abs(ptq))) / 127  # ~ one output step
  uncalibrated = qat.quantize_for_training(model, preserve="none")
  far = tflite.TFLiteModel(conversion.convert(uncalibrated, "qat_int8", representative=rep))
  assert np.max(np.abs(far(x_test) - ptq)) > 10 * scale  # the control: the test can fail
  q = qat.quantize_for_training(model, preserve="none")
  assert qat.calibrate_ranges(q, rep, batch_size=100) >= 5  # 4 kernels, 4 activations, input
  lite = tflite.TFLiteModel(conversion.convert(q, "qat_int8", representative=rep))
  assert np.max(np.abs(lite(x_test) - ptq)) <= 3 * scale
  assert np.mean(np.argmax(lite(x_test), -1) == np.argmax(ptq, -1)) >= 0.99
  lo, hi = (v.numpy() for v in q.get_layer("quant_conv1").weights
            if v.name.endswith(("kernel_min:0", "kernel_max:0")))
  assert hi[0] > 0 and lo[0] < 0 and hi[0] == np.max(np.maximum(-lo, hi))  # the widest
  np.testing.assert_array_equal(lite.predict_classes(x_test),
                                np.argmax(q(x_test, training=False), -1))
  # The ranges are the running min/max over the batches: any batching gives the same, to
  # within half a step (1/510 of the range): a later layer sees its input through the
  # upstream ranges as they stood at each batch.
  batched = qat.quantize_for_training(model, preserve="none")
  qat.calibrate_ranges(batched, rep, batch_size=32)
  a, b = _range_values(q), _range_values(batched)
  assert len(a) == len(b) >= 10
  for one, other in zip(a, b):
    np.testing.assert_allclose(one, other, rtol=1 / 510)
  with pytest.raises(UserError, match="must not be empty"):
    qat.calibrate_ranges(q, rep[:0])
  with pytest.raises(UserError, match="batch_size"):
    qat.calibrate_ranges(q, rep, batch_size=0)


def test_robust_qat_trains_on_each_attack(setup):
  """Robust QAT's loss is the attacked one: above the clean CE when the model stands still."""
  model, _, x_train, y_train, _ = setup
  q = qat.quantize_for_training(model, preserve="none")
  x, y = x_train[:64], y_train[:64]
  train = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
  # One clean epoch at a learning rate of 1e-9 calibrates the fake-quant ranges and leaves the
  # weights as they are; the robust epochs below keep them too, so their loss is the attack's.
  qat.fine_tune(q, train, epochs=1, learning_rate=1e-9, verbose=0)
  clean_ce = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
      y, q(x, training=False), from_logits=True)))
  for method in ("pgd", "fgsm_rs", "trades"):
    attack = qat.fine_tuning_attack(method, epsilon=0.2, steps=None if method == "fgsm_rs" else 3)
    (loss,) = qat.fine_tune(q, train, epochs=1, learning_rate=1e-9, adversarial=attack,
                            verbose=0)
    assert loss > clean_ce + 0.5, (method, loss, clean_ce)
  with pytest.raises(UserError, match="adv_steps"):
    qat.fine_tune(q, train, epochs=1, adversarial=qat.fine_tuning_attack("fgsm_rs", steps=3))
  with pytest.raises(UserError, match="`adversarial` must be None or one of"):
    qat.fine_tune(q, train, epochs=1, adversarial=qat.fine_tuning_attack("bim"))
  with pytest.raises(UserError, match="training.AdversarialSpec"):
    qat.fine_tune(q, train, epochs=1, adversarial="pgd")


def test_prune_preserving_qat_keeps_zeros(setup):
  model, _, x_train, y_train, _ = setup
  pruned = keras.models.clone_model(model)
  pruned.set_weights([np.where(np.abs(w) < np.quantile(np.abs(w), 0.8), 0.0, w)
                      if w.ndim > 1 else w for w in model.get_weights()])
  assert qat.preserve_for(pruned) == "sparsity" and qat.preserve_for(model) == "none"
  q = qat.quantize_for_training(pruned, preserve="sparsity")
  train = tf.data.Dataset.from_tensor_slices((x_train[:256], y_train[:256])).batch(64)
  qat.fine_tune(q, train, epochs=1, learning_rate=1e-3, verbose=0)
  kernels = [w.numpy() for w in q.weights if w.name.endswith("kernel:0")]
  assert kernels and all(np.mean(k == 0) >= 0.79 for k in kernels)


def test_clustering_leaves_at_most_16_values(setup):
  model, _, x_train, y_train, _ = setup
  before = [w.copy() for w in model.get_weights()]
  clustered = compression.cluster_model(model, number_of_clusters=16)
  train = tf.data.Dataset.from_tensor_slices((x_train[:256], y_train[:256])).batch(64)
  qat.fine_tune(clustered, train, epochs=1, verbose=0)
  stripped = compression.strip_clustering(clustered)
  # The caller's model is not fine-tuned along (tfmot's wrappers share the layers they wrap).
  assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
  counts = compression.unique_weight_counts(stripped)
  assert set(counts) == {"conv1", "conv2", "dense1", "logits"}
  assert all(2 <= c <= 16 for c in counts.values()), counts
  with pytest.raises(UserError, match="`number_of_clusters` must be an integer >= 2; got 1"):
    compression.cluster_model(model, number_of_clusters=1)


def _flex_flatbuffer():
  @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
  def f(x):
    spectrum = tf.signal.fft(tf.complex(x, tf.zeros_like(x)))  # no builtin FFT of complex
    return {"logits": tf.math.real(spectrum)}
  converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                         tf.lite.OpsSet.SELECT_TF_OPS]
  return converter.convert()


def test_flex_ops_are_refused_by_name(tmp_path):
  content = _flex_flatbuffer()
  assert any(op.startswith("Flex") for op in tflite.operator_names(content))
  path = tmp_path / "flex.tflite"
  path.write_bytes(content)
  with pytest.raises(tflite.UnsupportedOpsError, match=r"Flex \(select-TF\) ops .*FlexFFT"):
    tflite.TFLiteModel(path)


def test_bad_inputs(setup, tmp_path):
  _, path, x_train, _, _ = setup
  with pytest.raises(UserError, match="`method` must be one of .*got 'int4'"):
    conversion.convert(path, "int4")
  with pytest.raises(UserError, match="needs representative training images"):
    conversion.convert(path, "ptq_int8")
  with pytest.raises(UserError, match="`int8_io` needs a full-integer method"):
    conversion.convert(path, "ptq_dynamic", int8_io=True)
  with pytest.raises(UserError, match="does not exist"):
    tflite.TFLiteModel(tmp_path / "missing.tflite")
  (tmp_path / "junk.tflite").write_bytes(b"\0" * 64)
  with pytest.raises(UserError, match="not a TFLite flatbuffer"):
    tflite.TFLiteModel(tmp_path / "junk.tflite")
  lite = tflite.TFLiteModel(conversion.convert(path, "ptq_dynamic"))
  with pytest.raises(UserError, match=r"images must have shape \(N, 28, 28, 1\); got \(2, 28, 28\)"):
    lite(np.zeros((2, 28, 28), np.float32))
  assert lite(np.zeros((0, 28, 28, 1), np.float32)).shape == (0, 10)
  with pytest.raises(UserError, match="`export_path` must end in .tflite"):
    compression.QuantizeConfig(base_model_path=path, export_path="m.bin").validate()


def test_tflite_runs_with_litert_alone(setup, tmp_path):
  _, path, x_train, _, x_test = setup
  model_path = tmp_path / "m.tflite"
  model_path.write_bytes(conversion.convert(path, "ptq_int8", int8_io=True,
                                            representative=x_train[:100]))
  np.save(tmp_path / "x.npy", x_test[:20])
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from ai_edge_litert.interpreter import Interpreter
      it = Interpreter(model_path={str(model_path)!r}, num_threads=1)
      runner = it.get_signature_runner("serving_default")
      inp = runner.get_input_details()["images"]
      scale, zero = inp["quantization"]
      x = np.load({str(tmp_path / "x.npy")!r})
      q = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
      classes = runner(images=q)["classes"]
      assert not any(m == "tensorflow" or m.startswith(("tensorflow.", "keras_defense", "tf_keras"))
                     for m in sys.modules), sorted(m for m in sys.modules if "tensorflow" in m)
      print(" ".join(str(int(c)) for c in classes))
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = tflite.TFLiteModel(model_path).predict_classes(x_test[:20])
  assert [int(c) for c in out.stdout.split()] == expected.tolist()


def test_quantize_writes_tflite_and_provenance(setup, tmp_path):
  _, path, _, _, _ = setup
  out = tmp_path / "deep" / "m.tflite"
  result = compression.quantize(compression.QuantizeConfig(
      base_model_path=path, export_path=str(out), dataset="mnist", method="qat_int8",
      clusters=4, epochs=1, train_limit=128, representative_size=50, agreement_size=100,
      adversarial=qat.fine_tuning_attack("pgd", epsilon=0.1, steps=2),
      qat_twin_path=str(tmp_path / "twin"), verbose=0))
  assert {p.name for p in out.parent.iterdir()} == {"m.tflite", "m.tflite.json"}
  record = json.loads(pathlib.Path(result.provenance_path).read_text())
  assert record == compression.read_provenance(str(out))
  assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
  assert record["method"] == "qat_int8" and record["clusters"] == 4
  assert record["base_model"] == path and record["dataset"] == "mnist"
  assert record["representative"]["split"] == "train" and record["representative"]["size"] == 50
  x_rep, _ = data.load_arrays("mnist", "train", limit=50)
  assert record["representative"]["digest"] == compression.representative_digest(x_rep)
  assert [s["stage"] for s in record["stages"]] == ["cluster", "qat"]
  assert record["stages"][1]["preserve"] == "clusters"
  assert all(c <= 4 for c in record["stages"][0]["unique_weights"].values())
  assert record["fine_tuning"]["adversarial"] == {
      "adversarial": "pgd", "adv_epsilon": 0.1, "adv_steps": 2, "adv_step_size": 0.125}
  assert "ai_edge_litert" in record["versions"]
  m = record["measurement"]
  assert m["tflite_bytes"] == out.stat().st_size and m["agreement_images"] == 100
  assert m["agreement"] >= 0.8
  assert "qat_int8 + 4 clusters" in result.summary()
  # The QAT twin (kd-evaluate --qat_twin): a SavedModel of fake-quant ops computing
  # nearly what the .tflite computes.
  from keras_defense.evaluation import black_box  # pylint: disable=g-import-not-at-top
  from keras_defense.models import classifier  # pylint: disable=g-import-not-at-top
  assert record["qat_twin"] == str(tmp_path / "twin" / "1")
  assert black_box.is_qat_model(record["qat_twin"]) and not black_box.is_qat_model(path)
  x_test, _ = data.load_arrays("mnist", "test", limit=100)
  twin = classifier.load_classifier(record["qat_twin"], output_key="logits")
  agree = np.mean(np.argmax(twin(x_test), -1) == tflite.TFLiteModel(out).predict_classes(x_test))
  assert agree >= 0.95


def _quantize_config(*argv):
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  fv = _helpers.fresh_flags(kd_flags.quantize_flags)
  fv(["kd-quantize", *argv])
  return kd_flags.quantize_config(fv)


def test_flags_make_the_config():
  config = _quantize_config("--base_model_path=saved_models/mnist_m1/1", "--method=qat_int8",
                            "--export_path=/tmp/m.tflite", "--clusters=16")
  config.validate()
  # Fine-tuning defaults of kd-quantize, not kd-train's 10 epochs of SGD at 0.05.
  assert (config.method, config.clusters, config.epochs, config.learning_rate) == (
      "qat_int8", 16, 2, 1e-4)
  config = _quantize_config("--base_model_path=m", "--export_path=/tmp/m.tflite", "--epochs=3",
                            "--adversarial=pgd", "--adv_epsilon=0.1")
  assert config.epochs == 3 and config.adversarial.identity() == {
      "adversarial": "pgd", "adv_epsilon": 0.1, "adv_steps": qat.FINE_TUNE_STEPS,
      "adv_step_size": 2.5 * 0.1 / qat.FINE_TUNE_STEPS}
  trades = _quantize_config("--base_model_path=m", "--export_path=/tmp/m.tflite",
                            "--method=qat_int8", "--adversarial=trades", "--trades_beta=3",
                            "--adv_steps=5")
  trades.validate()
  assert trades.adversarial.identity()["trades_beta"] == 3.0
  assert trades.adversarial.attack_steps() == (5, 2.5 * 0.3 / 5)
  fgsm = _quantize_config("--base_model_path=m", "--export_path=/tmp/m.tflite",
                          "--method=qat_int8", "--adversarial=fgsm_rs")
  fgsm.validate()
  assert fgsm.adversarial.attack_steps() == (1, 1.25 * 0.3)
  with pytest.raises(UserError, match="`adversarial` fine-tunes, so it needs method qat_int8"):
    config.validate()
  with pytest.raises(UserError, match="--export_path is required"):
    _quantize_config("--base_model_path=m")
  config = _quantize_config("--base_model_path=m", "--export_path=/tmp/m.tflite",
                            "--qat_twin_path=/tmp/twin")
  assert config.qat_twin_path == "/tmp/twin"
  with pytest.raises(UserError, match="`qat_twin_path` needs method qat_int8"):
    config.validate()
