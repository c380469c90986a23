"""Certified bounds (IBP, CROWN-IBP, CROWN), randomized smoothing and kd-certify.

Soundness cannot be faked: points sampled in the input set (and the box's
corners for a 6-pixel input) never leave the computed logit and margin
bounds, on random dense and conv networks with BatchNormalization, max and
average pooling and a residual Add; an image certified on a small trained
model is never broken by APGD. Tightness: with ``lower_slope="zero"``
CROWN-IBP's margin bound is >= IBP's on every image and class (a theorem, see
``bounds``); with CROWN's adaptive slope that need not hold, so ``certify``
takes the better of both and its certified set contains IBP's.
"""

import dataclasses
import gzip
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from keras_defense import data
from keras_defense.attacks.apgd import apgd
from keras_defense.certify import bounds
from keras_defense.certify import runner
from keras_defense.certify import smoothing
from keras_defense.models import export
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 rounding between the bounds' arithmetic and the model's


def _margins(model, x, y, eps, **kw):
  """Eager margin bounds (tracing a graph costs more than these tiny networks' math)."""
  return bounds.bounded(model).margins(x, y, eps, **kw).numpy()


def _logit_bounds(model, x, eps, **kw):
  return tuple(t.numpy() for t in bounds.bounded(model).logit_bounds(x, eps, **kw))


def _certified(margins, y):
  others = np.ones_like(margins, bool)
  others[np.arange(len(y)), y] = False
  return np.all(np.where(others, margins > 0, True), axis=1)


def _dense_net():
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.layers.Input((6,)), keras.layers.Rescaling(2.0, offset=-1.0),
      keras.layers.Dense(16, activation="relu"), keras.layers.Dense(12),
      keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dropout(0.5),
      keras.layers.Dense(5)])


def _conv_net():
  keras.utils.set_random_seed(1)
  i = keras.layers.Input((8, 8, 2))
  h = keras.layers.Conv2D(4, 3, activation="relu", padding="same")(i)
  h = keras.layers.BatchNormalization()(h)
  h = keras.layers.Add()([h, keras.layers.Conv2D(4, 3, padding="same")(h)])
  h = keras.layers.ReLU()(h)
  h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Conv2D(3, 2, activation="relu")(h)
  h = keras.layers.AveragePooling2D(3)(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(10, activation="relu")(h)
  return keras.Model(i, keras.layers.Dense(4)(h))


def _gap_net():
  """A residual block ending in global average pooling, as examples/residual_mnist.py."""
  keras.utils.set_random_seed(2)
  i = keras.layers.Input((6, 6, 2))
  h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(i)
  h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
  h = keras.layers.Add()([h, keras.layers.Conv2D(4, 1)(i)])
  h = keras.layers.ReLU()(h)
  h = keras.layers.GlobalAveragePooling2D()(h)
  h = keras.layers.Dense(8, activation="relu")(h)
  return keras.Model(i, keras.layers.Dense(4)(h))


def _randomize_batch_norm(model, rng):
  """Moving statistics and affine parameters away from the identity."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.3, beta.shape),
                         rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2, var.shape)])


@pytest.fixture(scope="module", params=["dense", "conv", "gap"])
def net(request):
  model = {"dense": _dense_net, "conv": _conv_net, "gap": _gap_net}[request.param]()
  rng = np.random.default_rng(0)
  _randomize_batch_norm(model, rng)
  x = rng.uniform(0, 1, (4,) + model.input_shape[1:]).astype(np.float32)
  x[0] = np.clip(x[0], 0.02, 0.98).round()  # an image at the pixel range's corners
  y = np.argmax(model(x).numpy(), 1)
  return request.param, model, x, y


def _samples(x, eps, norm, count, rng):
  """Points of the ε-ball around x clipped to [0, 1] (clipping keeps them in the set)."""
  shape = (count,) + x.shape
  if norm == "linf":
    d = rng.uniform(-eps, eps, shape)
    d[: count // 4] = eps * np.sign(d[: count // 4])  # vertices of the ball
  else:
    d = rng.normal(size=shape)
    d /= np.linalg.norm(d.reshape(count, -1), axis=1).reshape((-1,) + (1,) * x.ndim)
    d *= eps * rng.uniform(0.5, 1, (count,) + (1,) * x.ndim)
  return np.clip(x + d, 0, 1).astype(np.float32)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_sampled_points_stay_inside_the_bounds(net, norm, eps):
  kind, model, x, y = net
  rng = np.random.default_rng(1)
  points = [_samples(x[b], eps, norm, 2500, rng) for b in range(len(x))]  # 10,000 in all
  if kind == "dense" and norm == "linf":  # every corner of the clipped box, 2^6 per image
    for b in range(len(x)):
      lo, hi = np.clip(x[b] - eps, 0, 1), np.clip(x[b] + eps, 0, 1)
      corners = np.array([np.where(c, hi, lo) for c in itertools.product([0, 1], repeat=6)])
      points[b] = np.concatenate([points[b], corners.astype(np.float32)])
  z = [model(p).numpy() for p in points]
  for method in bounds.METHODS:
    lo, hi = _logit_bounds(model, x, eps, method=method, norm=norm)
    margins = _margins(model, x, y, eps, method=method, norm=norm)
    for b in range(len(x)):
      assert np.all(z[b] >= lo[b] - TOL) and np.all(z[b] <= hi[b] + TOL), (method, b)
      true_margin = z[b][:, y[b]:y[b] + 1] - z[b]
      assert np.all(true_margin >= margins[b] - TOL), (method, b)
      # Not vacuous: the bounds enclose the clean logits within a finite width.
      assert np.all(np.isfinite(lo[b])) and np.all(lo[b] <= hi[b])


def test_a_pixel_convention_is_bounded_as_the_first_layer():
  """The dense net starts with Rescaling(2, offset=-1): the convention mean 0.5, std 0.5."""
  from keras_defense.models import pixels as pixels_lib  # pylint: disable=g-import-not-at-top
  with_layer = _dense_net()
  _randomize_batch_norm(with_layer, np.random.default_rng(0))
  without = keras.Sequential([keras.layers.Input((6,))] + [
      keras.layers.deserialize({"class_name": type(l).__name__, "config": l.get_config()})
      for l in with_layer.layers[1:]])
  without.set_weights(with_layer.get_weights())
  convention = pixels_lib.PixelConvention(mean=(0.5,), std=(0.5,))
  x = np.random.default_rng(4).uniform(0, 1, (6, 6)).astype(np.float32)
  y = np.argmax(with_layer(x).numpy(), 1)
  for method in bounds.METHODS:
    want = bounds.margin_bounds(with_layer, x, y, 0.05, method=method)
    got = bounds.margin_bounds(without, x, y, 0.05, method=method, pixels=convention)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(bounds.margin_bounds(without, x, y, 0.05, method=method), want,
                           atol=1e-3)  # without the convention: another function
  # Per channel, 0..255: sampled points of the [0, 1] ball, mapped, stay inside.
  conv = _conv_net()
  convention = pixels_lib.PixelConvention(input_range=(0.0, 255.0), mean=(100.0, 20.0),
                                          std=(50.0, 80.0))
  x = np.random.default_rng(5).uniform(0, 1, (3, 8, 8, 2)).astype(np.float32)
  z = [conv(convention.to_model(_samples(x[b], 0.02, "linf", 1000,
                                          np.random.default_rng(b)))).numpy()
       for b in range(len(x))]
  for method in bounds.METHODS:
    lo, hi = bounds.logit_bounds(conv, x, 0.02, method=method, pixels=convention)
    for b in range(len(x)):
      assert np.all(z[b] >= lo[b] - TOL) and np.all(z[b] <= hi[b] + TOL), (method, b)
  with pytest.raises(UserError, match="`mean` has 3 values; the images have 2 channel"):
    bounds.bounded(conv, pixels_lib.PixelConvention(mean=(0.1, 0.2, 0.3)))


def test_crown_ibp_with_zero_lower_slope_is_at_least_as_tight_as_ibp(net):
  _, model, x, y = net
  for eps in (0.01, 0.05, 0.2):
    ibp = _margins(model, x, y, eps, method="ibp")
    crown_ibp = _margins(model, x, y, eps, method="crown_ibp", lower_slope="zero")
    assert np.all(crown_ibp >= ibp - TOL), eps
    # And the combined bounds (what certify uses) certify everything IBP certifies.
    for method in ("crown_ibp", "crown"):
      combined = _margins(model, x, y, eps, method=method, with_ibp=True)
      assert np.all(combined >= ibp)
      assert np.all(_certified(combined, y)[_certified(ibp, y)])


def test_crown_is_tighter_than_ibp_on_the_random_networks(net):
  """Not a theorem; measured on these networks: CROWN's logit intervals are narrower."""
  _, model, x, _ = net
  lo_i, hi_i = _logit_bounds(model, x, 0.05, method="ibp")
  lo_c, hi_c = _logit_bounds(model, x, 0.05, method="crown")
  assert np.mean(hi_c - lo_c) < np.mean(hi_i - lo_i)


def test_epsilon_zero_gives_the_logits():
  model = _conv_net()
  x = np.random.default_rng(2).uniform(0, 1, (3, 8, 8, 2)).astype(np.float32)
  for method in bounds.METHODS:
    lo, hi = _logit_bounds(model, x, 0.0, method=method)
    np.testing.assert_allclose(lo, model(x).numpy(), atol=1e-4)
    np.testing.assert_allclose(hi, model(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("layer,name", [
    (keras.layers.Dense(4, activation="tanh", name="squash"), "squash"),
    (keras.layers.LayerNormalization(name="ln"), "ln"),
    (keras.layers.LeakyReLU(name="leaky"), "leaky")])
def test_unsupported_layer_is_named(layer, name):
  model = keras.Sequential([keras.layers.Input((5,)), keras.layers.Dense(4), layer,
                            keras.layers.Dense(3)])
  with pytest.raises(UserError, match=f"layer '{name}'.*not supported.*smoothing"):
    bounds.certify(model, np.zeros((1, 5), np.float32), [0], 0.1)


def test_crown_refuses_a_network_too_large(monkeypatch):
  monkeypatch.setattr(bounds, "CROWN_MAX_ELEMENTS", 100)
  model = _conv_net()
  with pytest.raises(UserError, match="method 'crown'.*use method 'crown_ibp'"):
    bounds.bounded(model).margins(np.zeros((1, 8, 8, 2), np.float32), [0], 0.1,
                                  method="crown")


@pytest.fixture(scope="module")
def mnist_model():
  """A small MNIST classifier (conv, max pooling, dense), trained for a few seconds.

  The images come from the shipped files directly (no tfds build).
  """
  with gzip.open(data.SHIPPED_DIR / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
    x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:3000]
  with gzip.open(data.SHIPPED_DIR / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
    y = np.frombuffer(f.read(), np.uint8, offset=8)[:3000].astype(np.int64)
  x = (x / 255.0).astype(np.float32)
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.layers.Input((28, 28, 1)), keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
      keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x[1000:], y[1000:], epochs=3, batch_size=64, verbose=0)
  return model, x[:200], y[:200]


def test_certified_images_are_never_broken_by_apgd(mnist_model):
  model, x, y = mnist_model
  eps = 0.02
  ok = bounds.certify(model, x, y, eps, method="crown_ibp")
  assert ok.sum() >= 20, ok.sum()  # enough proofs for the check to mean something
  x_adv = apgd(model, x[ok], y[ok], eps, steps=20, seed=0)
  assert np.max(np.abs(x_adv - x[ok])) <= eps + 1e-6
  assert np.all(np.argmax(model(x_adv).numpy(), 1) == y[ok])
  # The attack is not idle: at 10x the radius it breaks most images.
  strong = apgd(model, x[:50], y[:50], 10 * eps, steps=10, seed=0)
  assert np.mean(np.argmax(model(strong).numpy(), 1) == y[:50]) < 0.5


# --- randomized smoothing ----------------------------------------------------------

def _constant(x):
  return tf.one_hot(tf.zeros(tf.shape(x)[0], tf.int32), 10) * 5.0


def _coin(x):
  """Class 0 or 1 with probability 1/2 each under noise (the sign of one pixel)."""
  return tf.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], 1)


def test_smoothing_certifies_a_constant_model_with_the_closed_form_radius():
  n, alpha, sigma = 1000, 0.001, 0.5
  pred, radius, p_lower = smoothing.certify(_constant, np.zeros((2, 4, 4, 1), np.float32),
                                            sigma=sigma, num_classes=10, n0=10, n=n,
                                            alpha=alpha, batch_size=300)
  # All n samples say class 0: the Clopper-Pearson bound is alpha^(1/n).
  np.testing.assert_allclose(p_lower, alpha ** (1 / n), rtol=1e-9)
  np.testing.assert_array_equal(pred, [0, 0])
  expected = sigma * float(tf.math.ndtri(tf.constant(alpha ** (1 / n), tf.float64)))
  np.testing.assert_allclose(radius, expected, rtol=1e-9)
  assert abs(expected - 1.2316) < 1e-3  # scipy: 0.5 * norm.ppf(0.001 ** (1 / 1000))


def test_smoothing_abstains_on_a_fifty_fifty_model():
  x = np.zeros((3, 4, 4, 1), np.float32)
  pred, radius, _ = smoothing.certify(_coin, x, sigma=0.5, num_classes=2, n0=10, n=1000)
  np.testing.assert_array_equal(pred, smoothing.ABSTAIN)
  np.testing.assert_array_equal(radius, 0)
  np.testing.assert_array_equal(
      smoothing.predict(_coin, x, sigma=0.5, num_classes=2, n=1000), smoothing.ABSTAIN)
  assert np.all(smoothing.predict(_constant, x, sigma=0.5, num_classes=10, n=100) == 0)


def test_binomial_bounds_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  for k, n in [(1, 10), (9, 10), (10, 10), (990, 1000), (50, 100), (99_990, 100_000)]:
    np.testing.assert_allclose(smoothing.clopper_pearson_lower(k, n, 0.001),
                               stats.beta.ppf(0.001, k, n - k + 1), rtol=1e-8)
    np.testing.assert_allclose(smoothing.binomial_test_two_sided(k, n),
                               stats.binomtest(k, n, 0.5).pvalue, rtol=1e-8, atol=1e-300)
  assert smoothing.clopper_pearson_lower(0, 10, 0.001) == 0


# --- kd-certify ----------------------------------------------------------------------

def test_config_validation_names_the_field():
  with pytest.raises(UserError, match="`method`"):
    runner.CertifyConfig(model="m", run_dir="r", method="magic").validate()
  with pytest.raises(UserError, match="smoothing.*norm 'l2'"):
    runner.CertifyConfig(model="m", run_dir="r", method="smoothing").validate()
  with pytest.raises(UserError, match="`alpha`"):
    runner.CertifyConfig(model="m", run_dir="r", alpha=2.0).validate()


def _image_folder(root, x, y):
  """folder:PATH data: 2 test and 1 training image per class, as PNG files."""
  for split, per_class in (("test", 2), ("train", 1)):
    for c in range(10):
      (root / split / str(c)).mkdir(parents=True)
      for k, i in enumerate(np.flatnonzero(y == c)[:per_class]):
        png = tf.io.encode_png(tf.constant((x[i] * 255).round().astype(np.uint8)))
        (root / split / str(c) / f"{k}.png").write_bytes(png.numpy())
  return f"folder:{root}"


def test_kd_certify_binary_writes_results_and_resumes(mnist_model, tmp_path):
  model, x, y = mnist_model
  path = export.export_saved_model(model, tmp_path / "tiny", version=1)
  dataset = _image_folder(tmp_path / "images", x, y)
  run_dir = tmp_path / "run"
  cmd = [sys.executable, "-m", "keras_defense.bin.certify", f"--model={path}",
         f"--dataset={dataset}", "--norm=linf", "--epsilons=0.01,0.3", "--method=crown_ibp",
         "--n_examples=20", f"--run_dir={run_dir}", "--batch_size=16"]
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((run_dir / "results.json").read_text())
  assert results["method"] == "crown_ibp" and results["n_examples"] == 20
  assert results["model"] == path
  assert set(results["certified_acc"]) == {"0.01", "0.3"}
  assert results["certified_acc"]["0.3"] == 0.0
  small = results["certified_indices"]["0.01"]
  assert len(small) == round(20 * results["certified_acc"]["0.01"]) and len(small) > 0
  assert results["clean_acc"] >= results["certified_acc"]["0.01"]
  assert "certified accuracy" in (run_dir / "report.md").read_text()
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # as kd-evaluate
  # Resumable: the finished ε are loaded, not recomputed, by an in-process rerun.
  state = run_dir / "state" / "eps_0.01.json"
  mtime = state.stat().st_mtime_ns
  config = runner.CertifyConfig(model=path, run_dir=str(run_dir), dataset=dataset,
                                epsilons=(0.01, 0.3), method="crown_ibp", n_examples=20,
                                batch_size=16)
  again = runner.run(config)
  assert state.stat().st_mtime_ns == mtime
  assert again["certified_indices"] == results["certified_indices"]
  # A run directory of other settings is refused.
  with pytest.raises(UserError, match="other settings"):
    runner.run(dataclasses.replace(config, method="ibp"))


def test_kd_certify_takes_arrays_and_pixel_flags_like_kd_evaluate(mnist_model, tmp_path):
  import copy  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import certification  # pylint: disable=g-import-not-at-top
  model, x, y = mnist_model
  path = export.export_saved_model(model, tmp_path / "tiny", version=1)
  npz = tmp_path / "mine.npz"
  pixels = (x[:30] * 255).round().astype(np.uint8)
  np.savez(npz, x=pixels, y=y[:30])

  def parse(*extra):
    fv = copy.deepcopy(kd_flags.FLAGS)
    fv.unparse_flags()
    kd_flags.certify_flags(fv)
    fv(["kd-certify", f"--model={path}", f"--data={npz}", "--epsilons=0.01,0.02",
        "--n_examples=30", f"--run_dir={tmp_path / 'run'}", "--method=ibp", *extra])
    return kd_flags.certify_config(None, fv)
  config = parse()
  assert config.dataset == f"npz:{npz}"
  results = certification.run(config)
  assert results["n_examples"] == 30
  assert json.loads((tmp_path / "run" / "run.json").read_text())["data_sha256"]
  # The arrays' own images were certified: the same proofs as the bounds on them.
  ok = bounds.certify(model, pixels.astype(np.float32) / 255, y[:30], 0.01, method="ibp")
  assert results["certified_indices"]["0.01"] == [int(i) for i in np.flatnonzero(ok)]
  assert len(results["certified_indices"]["0.01"]) > 0
  # TensorBoard scalars per method and ε, as kd-evaluate writes its own.
  (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
  scalars = {(v.tag, e.step): float(tf.make_ndarray(v.tensor))
             for e in tf.compat.v1.train.summary_iterator(str(events))
             for v in e.summary.value if v.tag != "report"}
  assert scalars[("certified_accuracy/ibp", 10)] == pytest.approx(
      results["certified_acc"]["0.01"])
  assert ("certified_accuracy/ibp", 20) in scalars and ("clean_accuracy", 0) in scalars
  # A pixel convention: the same model taking 0..255 pixels (Rescaling(1/255) in front)
  # is certified on the same images through --input_range, as kd-evaluate attacks it.
  cfg = model.get_config()
  cfg["layers"].insert(1, {"class_name": "Rescaling",
                           "config": {"name": "from_255", "scale": 1 / 255, "offset": 0.0}})
  m255 = keras.Sequential.from_config(cfg)
  m255.set_weights(model.get_weights())
  path = export.export_saved_model(m255, tmp_path / "tiny255", version=1)
  config = parse("--input_range=0,255", f"--run_dir={tmp_path / 'run255'}")
  assert config.input_range == (0.0, 255.0)
  odd = certification.run(config)
  assert odd["clean_acc"] == results["clean_acc"]
  assert odd["certified_indices"] == results["certified_indices"]
  assert certification.run(parse(f"--run_dir={tmp_path / 'run255_as_01'}"))[
      "clean_acc"] < results["clean_acc"]  # read as [0, 1] pixels: near-black images


# --- certified training loss ---------------------------------------------------------

def test_ibp_loss_is_the_clean_loss_at_kappa_one_and_trains_the_bound_down():
  from keras_defense.certify import losses  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(3)
  model = keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(3)])
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 1, (64, 6)).astype(np.float32)
  y = (x[:, 0] > 0.5).astype(np.int64) + (x[:, 1] > 0.5)
  clean = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
      y, model(x), from_logits=True)))
  np.testing.assert_allclose(float(losses.ibp_loss(model, x, y, 0.1, 1.0)), clean, rtol=1e-5)
  # The worst case is worse than the clean case, and equal to it at ε 0.
  assert float(losses.ibp_loss(model, x, y, 0.1, 0.0)) > clean
  np.testing.assert_allclose(float(losses.ibp_loss(model, x, y, 0.0, 0.0)), clean, rtol=1e-5)
  opt = keras.optimizers.Adam(1e-2)
  before = float(losses.ibp_loss(model, x, y, 0.05, 0.5))
  for _ in range(30):
    with tf.GradientTape() as tape:
      loss = losses.ibp_loss(model, x, y, 0.05, 0.5)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))
  assert float(losses.ibp_loss(model, x, y, 0.05, 0.5)) < before
  assert losses.ramp(0, start=2, length=10, final=0.3) == 0.0
  assert losses.ramp(7, start=2, length=10, final=0.5, initial=1.0) == 0.75
  assert losses.ramp(50, start=2, length=10, final=0.3) == 0.3
