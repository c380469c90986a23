"""Tests of keras_defense.defenses.logits_augmentation: the two Dense-weight transforms."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from keras_defense import data
from keras_defense.models import export
from keras_defense.defenses import logits_augmentation as la
from keras_defense import models
from keras_defense.util.compat import keras
from keras_defense.training.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _sparse_model(seed=0):
  """cw_mnist with half of every kernel zeroed and nonzero biases (like a trained M1)."""
  model = models.build_model("cw_mnist", seed=seed)
  rng = np.random.RandomState(seed)
  weights = []
  for w in model.get_weights():
    if w.ndim > 1:
      w = np.where(rng.rand(*w.shape) < 0.5, 0.0, w).astype(w.dtype)
    else:
      w = rng.normal(0, 0.1, w.shape).astype(w.dtype)
    weights.append(w)
  model.set_weights(weights)
  return model


@pytest.mark.parametrize("epsilon", [0.0, 10.0, 20.0, 100.0])
def test_augment_logits_scales_only_the_logits_kernel(epsilon):
  m1 = _sparse_model()
  before = [w.copy() for w in m1.get_weights()]
  m2 = la.augment_logits(m1, epsilon)
  assert m2 is not m1
  for w0, w1 in zip(before, m1.get_weights()):  # input untouched
    np.testing.assert_array_equal(w0, w1)
  names = [v.name for v in m2.weights]
  for name, w0, w2 in zip(names, before, m2.get_weights()):
    if name.startswith("logits/kernel"):
      np.testing.assert_array_equal(w2, w0 * np.float32(1 + epsilon))
      np.testing.assert_array_equal(w2 == 0, w0 == 0)  # zeros stay zero, no new zeros
    else:
      np.testing.assert_array_equal(w2, w0)  # logits bias included
  assert [type(l) for l in m2.layers] == [type(l) for l in m1.layers]


def test_augmented_logits_are_affine_in_epsilon():
  m1 = _sparse_model()
  m2 = la.augment_logits(m1, 20.0)
  x = np.random.RandomState(1).rand(4, 28, 28, 1).astype("float32")
  bias = m1.layers[-1].get_weights()[1]
  z1, z2 = m1(x).numpy(), m2(x).numpy()
  np.testing.assert_allclose(z2 - bias, 21.0 * (z1 - bias), rtol=1e-4, atol=1e-4)


def test_augment_logits_survives_keras_and_plain_tf_savedmodel(tmp_path):
  m2 = la.augment_logits(_sparse_model(), 20.0)
  x = np.random.RandomState(2).rand(3, 28, 28, 1).astype("float32")
  path = export.export_saved_model(m2, tmp_path / "m2", version=1)
  reloaded = export.load_model(path)  # Keras load, built-in layers only
  for a, b in zip(m2.get_weights(), reloaded.get_weights()):
    np.testing.assert_array_equal(a, b)
  h5 = str(tmp_path / "m2.keras")
  m2.save(h5)
  np.testing.assert_array_equal(keras.models.load_model(h5, safe_mode=True)(x), m2(x))
  # A fresh process with plain TensorFlow only (no keras_defense, no tfmot).
  np.save(tmp_path / "x.npy", x)
  script = (
      "import sys, numpy as np, tensorflow as tf\n"
      "m = tf.saved_model.load(sys.argv[1])\n"
      "out = m.signatures['serving_default'](images=tf.constant(np.load(sys.argv[2])))\n"
      "np.save(sys.argv[3], out['logits'].numpy())\n"
      "assert 'keras_defense' not in sys.modules\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "x.npy"),
                  str(tmp_path / "z.npy")], check=True, capture_output=True,
                 env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
  np.testing.assert_allclose(np.load(tmp_path / "z.npy"), m2(x).numpy(), rtol=1e-5, atol=1e-4)


def test_gradient_inhibition_formula_on_every_dense_kernel():
  m = _sparse_model()
  before = {v.name: w.copy() for v, w in zip(m.weights, m.get_weights())}
  g = la.gradient_inhibition(m, 0.1)
  for v, w in zip(g.weights, g.get_weights()):
    w0 = before[v.name]
    if v.name.split("/")[0] in ("dense1", "dense2", "logits") and "kernel" in v.name:
      np.testing.assert_array_equal(w, w0 + np.float32(0.1) * np.sign(w0))
      np.testing.assert_array_equal(w == 0, w0 == 0)
      assert np.all(np.abs(w[w0 != 0]) > np.abs(w0[w0 != 0]))
    else:  # conv kernels and every bias
      np.testing.assert_array_equal(w, w0)
  assert la.apply_transform(m, "gradient_inhibition", 0.1).get_weights()[-2].tolist() == \
      g.get_weights()[-2].tolist()


@pytest.mark.parametrize("fn", [la.augment_logits, la.gradient_inhibition])
@pytest.mark.parametrize("epsilon", [-0.1, -20, float("nan"), float("inf")])
def test_bad_epsilon_is_refused(fn, epsilon):
  with pytest.raises(ValueError, match=r"`epsilon` must be a finite float >= 0; got"):
    fn(_sparse_model(), epsilon)


def test_epsilon_of_the_wrong_type_is_refused():
  with pytest.raises(TypeError, match="`epsilon` must be a float"):
    la.augment_logits(_sparse_model(), "20")


@pytest.mark.parametrize("fn", [la.augment_logits, la.gradient_inhibition])
def test_model_without_dense_output_layer_is_refused(fn):
  inputs = keras.Input((8,))
  x = keras.layers.Dense(4)(inputs)
  probs = keras.layers.Softmax(name="probs")(x)
  with pytest.raises(ValueError, match="no Dense output layer: its last layer is Softmax"):
    fn(keras.Model(inputs, probs), 20.0)
  conv_in = keras.Input((8, 8, 1))
  conv_out = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(conv_in))
  with pytest.raises(ValueError, match="no Dense output layer"):
    fn(keras.Model(conv_in, conv_out), 20.0)


def test_unknown_transform_and_config_errors():
  with pytest.raises(ValueError, match="`transform` must be one of"):
    la.apply_transform(_sparse_model(), "scale", 1.0)
  with pytest.raises(ConfigError, match="`logits_epsilon` must be a finite float >= 0"):
    la.AugmentConfig(logits_epsilon=-1.0).validate()
  with pytest.raises(ConfigError, match="`transform` must be one of"):
    la.AugmentConfig(transform="nope").validate()


def _measured(model, x, y, reference):
  """(agreement with ``reference``'s argmax, accuracy) of ``model`` on x, y."""
  pred = np.argmax(model(x, training=False).numpy(), -1)
  return float(np.mean(pred == reference)), float(np.mean(pred == y))


def test_augment_run_on_real_mnist_exports_and_measures_agreement(tmp_path):
  # The shipped M1: trained, pruned, with trained (nonzero) logits biases, so
  # scaling the kernel by 21 can move an argmax. On the first 1000 test images
  # it moves two (seen: images 221 and 659, both to their true class), so
  # the agreement `augment` reports is not 1 by construction.
  m1_path = REPO / "saved_models" / "mnist_m1" / "1"
  result = la.augment(la.AugmentConfig(base_model_path=str(m1_path), logits_epsilon=20.0,
                                       test_limit=1000, export_dir=str(tmp_path / "m2"),
                                       export_version=1))
  assert result.test_examples == 1000
  m1 = export.load_model(m1_path)
  m2 = export.load_model(result.saved_model_path)
  kernel, bias = m1.layers[-1].get_weights()
  np.testing.assert_array_equal(m2.layers[-1].get_weights()[0], kernel * np.float32(21.0))
  # The numbers, measured here on the same 1000 test images.
  x, y = data.load_arrays("mnist", "test", limit=1000)
  z1 = m1(x, training=False).numpy()
  np.testing.assert_allclose(m2(x, training=False).numpy(), 21.0 * (z1 - bias) + bias,
                             rtol=1e-4, atol=1e-3)
  p1 = np.argmax(z1, -1)
  agreement, accuracy = _measured(m2, x, y, p1)
  base_accuracy = float(np.mean(p1 == y))
  assert 0.0 < agreement < 1.0 and accuracy != base_accuracy  # else nothing is tested
  assert result.agreement == agreement
  assert result.base_accuracy == base_accuracy
  assert result.accuracy == accuracy


def test_augment_gradient_inhibition_end_to_end(tmp_path):
  m1 = _sparse_model()
  base = export.export_saved_model(m1, tmp_path / "m1", version=1)
  result = la.augment(la.AugmentConfig(
      base_model_path=base, transform="gradient_inhibition", inhibition_epsilon=0.05,
      test_limit=200, export_dir=str(tmp_path / "gi"), export_version=1))
  assert (result.transform, result.epsilon, result.test_examples) == (
      "gradient_inhibition", 0.05, 200)
  # Exported: W + 0.05 sign(W) on every Dense kernel, everything else as in M1.
  exported = export.load_model(result.saved_model_path)
  before = {v.name: w for v, w in zip(m1.weights, m1.get_weights())}
  dense = 0
  for v, w in zip(exported.weights, exported.get_weights()):
    w0 = before[v.name]
    if v.name.split("/")[0] in ("dense1", "dense2", "logits") and "kernel" in v.name:
      np.testing.assert_array_equal(w, w0 + np.float32(0.05) * np.sign(w0))
      dense += 1
    else:
      np.testing.assert_array_equal(w, w0)
  assert dense == 3
  x, y = data.load_arrays("mnist", "test", limit=200)
  p1 = np.argmax(m1(x, training=False).numpy(), -1)
  assert (result.agreement, result.accuracy) == _measured(exported, x, y, p1)
  assert result.base_accuracy == float(np.mean(p1 == y))
