"""Tests for keras_defense.models.architectures: the C&W architectures."""

import numpy as np
import pytest

from keras_defense import models
from keras_defense.util.compat import keras


def _conv(k, cin, cout):
  return k * k * cin * cout + cout


@pytest.mark.parametrize("name, shape, filters, units", [
    ("cw_mnist", (28, 28, 1), (32, 32, 64, 64), (200, 200)),
    ("cw_cifar10", (32, 32, 3), (64, 64, 128, 128), (256, 256)),
])
def test_architecture_matches_carlini_wagner(name, shape, filters, units):
  model = models.build_model(name)
  assert model.input_shape == (None,) + shape
  assert model.output_shape == (None, 10)
  convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
  assert [l.filters for l in convs] == list(filters)
  assert all(l.kernel_size == (3, 3) and l.padding == "valid" for l in convs)
  dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
  assert [l.units for l in dense] == list(units) + [10]
  assert dense[-1].name == models.LOGITS_LAYER_NAME
  assert dense[-1].activation is keras.activations.linear  # logits, no softmax
  assert [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)] == [0.5]
  # Parameter count from the architecture: two 3x3 valid convs + pool, twice.
  side = ((shape[0] - 4) // 2 - 4) // 2
  expected = (_conv(3, shape[2], filters[0]) + _conv(3, filters[0], filters[1])
              + _conv(3, filters[1], filters[2]) + _conv(3, filters[2], filters[3])
              + side * side * filters[3] * units[0] + units[0]
              + units[0] * units[1] + units[1] + units[1] * 10 + 10)
  assert model.count_params() == expected


def test_logits_are_unnormalised():
  model = models.build_model("cw_mnist", seed=0)
  x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
  logits = model(x, training=False).numpy()
  assert logits.shape == (4, 10)
  assert not np.allclose(logits.sum(axis=1), 1.0)


def test_seed_makes_weights_reproducible():
  a = models.build_model("cw_mnist", seed=3).get_weights()
  b = models.build_model("cw_mnist", seed=3).get_weights()
  c = models.build_model("cw_mnist", seed=4).get_weights()
  assert len(a) == len(b) == len(c)
  for wa, wb in zip(a, b):
    np.testing.assert_array_equal(wa, wb)
  # Another seed draws every kernel anew (biases start at zero for any seed).
  kernels = [(wa, wc) for wa, wc in zip(a, c) if wa.ndim > 1]
  assert len(kernels) == 7
  for wa, wc in kernels:
    assert np.mean(wa == wc) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet"), "`model` must be one of cw_cifar10, cw_mnist; got 'resnet'"),
    (dict(name="cw_mnist", input_shape=(28, 28)), "`input_shape` must be"),
    (dict(name="cw_mnist", input_shape=(8, 8, 1)), "at least 16x16"),
    (dict(name="cw_mnist", num_classes=1), "`num_classes` must be >= 2"),
    (dict(name="cw_mnist", dropout=1.0), r"`dropout` must be in \[0, 1\)"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.build_model(**kwargs)
