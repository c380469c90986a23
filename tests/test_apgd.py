"""Tests for keras_defense.attacks.apgd (Auto-PGD) and compute_dtype="auto"."""

import functools
import importlib
import logging

import numpy as np
import pytest

import keras_defense as kd
from keras_defense import attacks
from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf

# The module, not the function of the same name that attacks/__init__ exports.
apgd_lib = importlib.import_module("keras_defense.attacks.apgd")
apgd = apgd_lib.apgd


@functools.lru_cache(maxsize=None)
def tiny_model():
  """A one-conv MNIST net after 1 epoch on 2,000 real images (traces fast)."""
  keras.utils.set_random_seed(0)
  x, y = kd.load_arrays("mnist", "train", limit=2000)
  m = keras.Sequential([
      keras.layers.Conv2D(8, 5, strides=2, activation="relu",
                          input_shape=(28, 28, 1)),
      keras.layers.Flatten(),
      keras.layers.Dense(10)])
  m.compile(keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  m.fit(x, y, batch_size=64, epochs=1, verbose=0)
  return m


@functools.lru_cache(maxsize=None)
def shipped_model(name):
  return kd.load_model(f"saved_models/{name}/1")


@functools.lru_cache(maxsize=None)
def correct_test_images(n):
  """The first ``n`` test images the tiny model classifies correctly."""
  x, y = kd.load_arrays("mnist", "test", limit=4 * n)
  ok = attacks.predict_classes(tiny_model(), x) == y
  return x[ok][:n], y[ok][:n]


def _norms(x, x_adv):
  d = (np.asarray(x_adv, np.float64) - x).reshape(len(x), -1)
  return np.abs(d).max(1), np.sqrt((d ** 2).sum(1))


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.5)])
def test_stays_in_ball_and_box_and_lowers_accuracy(norm, eps):
  x, y = correct_test_images(64)
  model = tiny_model()
  x_adv = apgd(model, x, y, eps, norm=norm, steps=12, seed=3,
                       compute_dtype="float32")
  assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
  linf, l2 = _norms(x, x_adv)
  assert (linf if norm == "linf" else l2).max() <= eps * (1 + 1e-6) + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.mean(attacks.predict_classes(model, x_adv) == y) < 0.8
  # Tighter box: the attack respects clip_min/clip_max too.
  x_box = np.clip(x, 0.1, 0.9)
  x_adv = apgd(model, x_box, y, eps, norm=norm, steps=3,
                       clip_min=0.1, clip_max=0.9, compute_dtype="float32")
  assert x_adv.min() >= 0.1 and x_adv.max() <= 0.9


def test_zero_epsilon_returns_the_input():
  x, y = correct_test_images(16)
  x_adv = apgd(tiny_model(), x, y, 0.0, steps=3, compute_dtype="float32")
  np.testing.assert_array_equal(x_adv, x)


def _eager_apgd(model, x, y, eps, steps, norm, x_start, rho=0.75):
  """APGD-CE as fra31/auto-attack's attack_single_run, written plainly in numpy.

  Returns the first misclassified iterate where there is one, else the best-
  loss point; and the mask of images misclassified by some iterate.
  """
  def loss_grad(xa):
    xa = tf.constant(xa)
    with tf.GradientTape() as tape:
      tape.watch(xa)
      logits = model(xa, training=False)
      loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
      total = tf.reduce_sum(loss)
    return (loss.numpy(), tape.gradient(total, xa).numpy(),
            logits.numpy().argmax(-1))

  def l2(t):
    return np.sqrt((t ** 2).sum(axis=(1, 2, 3), keepdims=True))

  def project(v):
    if norm == "linf":
      return np.clip(np.minimum(np.maximum(v, x - eps), x + eps), 0.0, 1.0)
    n = l2(v - x)
    return np.clip(x + (v - x) / (n + 1e-12) * np.minimum(eps, n), 0.0, 1.0)

  n = len(x)
  k = max(int(0.22 * steps), 1)
  n_iter_min, size_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
  x_adv = x_start.copy()
  x_best = x_adv.copy()
  loss_steps = np.zeros((steps, n), np.float32)
  loss, grad, pred = loss_grad(x_adv)
  robust = pred == y
  first_adv = x_adv.copy()
  grad_best, loss_best = grad.copy(), loss.copy()
  step = np.full((n, 1, 1, 1), 2.0 * eps, np.float32)
  x_old = x_adv.copy()
  counter3 = 0
  loss_best_last, reduced_last = loss_best.copy(), np.ones(n, bool)
  for i in range(steps):
    grad2 = x_adv - x_old
    x_old = x_adv.copy()
    a = np.float32(0.75 if i > 0 else 1.0)
    if norm == "linf":
      x1 = project(x_adv + step * np.sign(grad))
    else:
      x1 = project(x_adv + step * grad / (l2(grad) + 1e-12))
    x_adv = project(x_adv + (x1 - x_adv) * a + grad2 * (np.float32(1) - a))
    loss, grad, pred = loss_grad(x_adv)
    newly = robust & (pred != y)
    first_adv[newly] = x_adv[newly]
    robust &= pred == y
    loss_steps[i] = loss
    better = loss > loss_best
    x_best[better], grad_best[better] = x_adv[better], grad[better]
    loss_best[better] = loss[better]
    counter3 += 1
    if counter3 == k:
      # The reference's check_oscillation, negative index included.
      rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).astype(np.float32)
                  for c in range(k))
      halve = (rises <= k * rho) | (~reduced_last & (loss_best_last >= loss_best))
      reduced_last, loss_best_last = halve.copy(), loss_best.copy()
      step[halve] /= 2.0
      x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return np.where(robust[:, None, None, None], x_best, first_adv), ~robust


@pytest.mark.parametrize("norm,eps,steps", [
    ("linf", 0.1, 1), ("linf", 0.1, 9), ("linf", 0.1, 23), ("l2", 1.0, 17)])
def test_apgd_ce_matches_a_plain_eager_loop(norm, eps, steps):
  """Start, momentum, checkpoints (23 steps: periods 5,4,3,2,1,...), restarts from best."""
  x, y = correct_test_images(48)
  model = tiny_model()
  start = apgd_lib.start_point(tf.constant(x), tf.constant(eps), norm,
                               tf.constant([7, 0], tf.int64), 0.0, 1.0).numpy()
  expected, broken = _eager_apgd(model, x, y, eps, steps, norm, start)
  assert 0 < broken.sum() < len(x)   # both outcomes are compared
  x_adv = apgd(model, x, y, eps, norm=norm, steps=steps, seed=7,
                       compute_dtype="float32", batch_size=len(x))
  got_broken = attacks.predict_classes(model, x_adv) != y
  assert np.sum(got_broken != broken) <= 1
  same = got_broken == broken
  # Graph and eager gradients may differ in the last bits; a diverging image
  # would differ in most of its pixels.
  assert np.mean(np.abs(x_adv[same] - expected[same]) > 1e-5) < 2e-3


def test_steps_eps_and_seed_do_not_retrace():
  x, y = correct_test_images(16)
  model = tiny_model()
  for eps, steps, seed in [(0.1, 3, 0), (0.2, 5, 1), (0.05, 11, 2)]:
    apgd(model, x, y, eps, steps=steps, seed=seed,
                 compute_dtype="float32", loss="dlr")
  runs = [v for k, v in runtime.model_cache(model).items()
          if k[0] == "apgd" and k[3] == "dlr" and not k[4]]
  assert len(runs) == 1
  assert runs[0].run.experimental_get_tracing_count() == 1


def test_seed_gives_reproducible_results_and_restarts_only_help():
  x, y = correct_test_images(48)
  model = tiny_model()
  a = apgd(model, x, y, 0.08, steps=6, seed=5, compute_dtype="float32")
  b = apgd(model, x, y, 0.08, steps=6, seed=5, compute_dtype="float32")
  np.testing.assert_array_equal(a, b)
  more = apgd(model, x, y, 0.08, steps=6, seed=5, restarts=3,
                      compute_dtype="float32")
  broken = attacks.predict_classes(model, a) != y
  broken_more = attacks.predict_classes(model, more) != y
  # The first restart is the same run: restarts only add broken images.
  assert np.all(broken_more[broken])


def test_iterations_count_the_gradients_each_image_needed():
  x, y = kd.load_arrays("mnist", "test", limit=48)
  model = tiny_model()
  x_adv, iterations = apgd(model, x, y, 0.08, steps=10, restarts=2,
                           compute_dtype="float32", return_iterations=True)
  clean_ok = attacks.predict_classes(model, x) == y
  broken = clean_ok & (attacks.predict_classes(model, x_adv) != y)
  robust = clean_ok & ~broken
  assert broken.sum() > 0 and robust.sum() > 0
  assert np.all(iterations[~clean_ok] == 0)
  assert np.all(iterations[robust] == 2 * (1 + 10))   # both restarts, in full
  assert np.all((iterations[broken] >= 1) & (iterations[broken] <= 2 * 11))
  assert iterations[broken].mean() < 22


def test_bfloat16_runs_on_a_clone_and_stays_legal():
  x, y = correct_test_images(32)
  model = tiny_model()
  x_adv = apgd(model, x, y, 0.1, steps=8, compute_dtype="bfloat16")
  assert x_adv.dtype == np.float32
  assert _norms(x, x_adv)[0].max() <= 0.1 + 1e-6
  assert np.mean(attacks.predict_classes(model, x_adv) == y) < 0.8
  assert keras.mixed_precision.global_policy().name == "float32"


def test_eot_averages_identical_gradients_to_the_same_attack():
  x, y = correct_test_images(24)
  model = tiny_model()
  one = apgd(model, x, y, 0.1, steps=5, compute_dtype="float32")
  three = apgd(model, x, y, 0.1, steps=5, compute_dtype="float32",
                       eot_samples=3)
  # Same gradient three times: the same signs, so the same attack.
  assert np.mean(np.abs(one - three) > 1e-5) < 1e-3


def test_eot_on_a_randomized_callable_stays_in_the_ball():
  x, y = correct_test_images(24)
  model = tiny_model()
  noisy = lambda images: model(  # noqa: E731
      images + tf.random.normal(tf.shape(images), stddev=0.1), training=False)
  x_adv = apgd(noisy, x, y, 0.1, steps=4, eot_samples=4)
  assert _norms(x, x_adv)[0].max() <= 0.1 + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_dlr_is_invariant_to_scaling_and_shifting_the_logits():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 10)).astype(np.float32)
  y = rng.integers(0, 10, 64)
  t = (y + rng.integers(1, 10, 64)) % 10
  zs = np.sort(z, -1)[:, ::-1]
  zy = z[np.arange(64), y]
  other = np.where(np.arange(10) == y[:, None], -np.inf, z).max(-1)
  np.testing.assert_allclose(losses.dlr(z, y), -(zy - other) / (zs[:, 0] - zs[:, 2]),
                             rtol=1e-5)
  np.testing.assert_allclose(
      losses.targeted_dlr(z, y, t),
      -(zy - z[np.arange(64), t]) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3])),
      rtol=1e-5)
  for scale, shift in [(21.0, 0.0), (0.05, 3.0), (1000.0, -50.0)]:
    w = scale * z + shift
    np.testing.assert_allclose(losses.dlr(w, y), losses.dlr(z, y), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(losses.targeted_dlr(w, y, t),
                               losses.targeted_dlr(z, y, t), rtol=1e-4, atol=1e-5)
  # Cross-entropy is not: that is what logits scaling exploits.
  assert not np.allclose(losses.cross_entropy(21.0 * z, y), losses.cross_entropy(z, y))


def test_apgd_ce_breaks_more_than_fgsm_on_m0():
  model = shipped_model("mnist_m0")
  x, y = kd.load_arrays("mnist", "test", limit=200)
  eps = 0.1
  fgsm_acc = np.mean(attacks.predict_classes(model, attacks.fgsm(model, x, y, eps)) == y)
  x_adv = apgd(model, x, y, eps, steps=30, compute_dtype="float32")
  apgd_acc = np.mean(attacks.predict_classes(model, x_adv) == y)
  assert apgd_acc < fgsm_acc - 0.1, (apgd_acc, fgsm_acc)


def test_apgd_t_breaks_far_more_than_apgd_ce_on_the_masked_m2():
  """M2's logits are x21: CE's gradient underflows, DLR does not care."""
  model = shipped_model("mnist_m2")
  x, y = kd.load_arrays("mnist", "test", limit=100)
  ce = apgd(model, x, y, 0.3, steps=20, compute_dtype="float32")
  t = apgd(model, x, y, 0.3, steps=20, loss="dlr", targeted=True,
                   n_target_classes=3, compute_dtype="float32")
  ce_acc = np.mean(attacks.predict_classes(model, ce) == y)
  t_acc = np.mean(attacks.predict_classes(model, t) == y)
  assert t_acc < ce_acc - 0.3, (t_acc, ce_acc)


def test_targeted_dlr_targets_are_the_runner_up_classes():
  """One target class: APGD-T's only target is the 2nd largest clean logit."""
  x, y = correct_test_images(48)
  model = tiny_model()
  logits = model(x, training=False).numpy()
  runner_up = np.argsort(-logits, -1)[:, 1]
  x_adv = apgd(model, x, y, 0.15, steps=10, loss="dlr", targeted=True,
                       n_target_classes=1, compute_dtype="float32")
  pred = attacks.predict_classes(model, x_adv)
  fooled = pred != y
  assert fooled.sum() >= 5
  assert np.mean(pred[fooled] == runner_up[fooled]) > 0.8


def test_resolve_compute_dtype(monkeypatch, caplog):
  model = tiny_model()
  assert runtime.resolve_compute_dtype(lambda im: im, "auto", (28, 28, 1)) == "float32"
  assert runtime.resolve_compute_dtype(model, "float32", (28, 28, 1)) == "float32"
  calls = []

  def fake_timings(m, shape, batch, times):
    calls.append((shape, batch))
    return dict(times)

  fresh = keras.models.clone_model(model)
  monkeypatch.setattr(runtime, "_gradient_step_seconds", functools.partial(
      fake_timings, times={"float32": 1.0, "bfloat16": 3.0}))
  with caplog.at_level(logging.WARNING):
    assert runtime.resolve_compute_dtype(fresh, "auto", (28, 28, 1)) == "float32"
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]
    assert runtime.resolve_compute_dtype(fresh, "bfloat16", (28, 28, 1)) == "bfloat16"
    assert [r for r in caplog.records if "slower than float32" in r.getMessage()]
  assert calls == [((28, 28, 1), 512)]   # measured once per model and shape
  faster = keras.models.clone_model(model)
  monkeypatch.setattr(runtime, "_gradient_step_seconds", functools.partial(
      fake_timings, times={"float32": 1.0, "bfloat16": 0.5}))
  assert runtime.resolve_compute_dtype(faster, "auto", (28, 28, 1)) == "bfloat16"


def test_resolve_compute_dtype_measures_for_real():
  model = tiny_model()
  choice = runtime.resolve_compute_dtype(model, "auto", (28, 28, 1))
  assert choice in ("float32", "bfloat16")
  seconds = runtime.model_cache(model)[("dtype_timings", (28, 28, 1), 512)]
  assert set(seconds) == {"float32", "bfloat16"} and min(seconds.values()) > 0
  assert runtime.resolve_compute_dtype(model, "auto", (28, 28, 1)) == choice


def _call(**kwargs):
  x, y = correct_test_images(4)
  args = dict(model=tiny_model(), x=x, y=y, epsilon=0.1)
  args.update(kwargs)
  return apgd(args.pop("model"), args.pop("x"), args.pop("y"),
                      args.pop("epsilon"), **args)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"epsilon": -0.1}, ValueError, r"`epsilon` must be >= 0"),
    ({"epsilon": "0.3"}, TypeError, r"`epsilon` must be a real number"),
    ({"norm": "l1"}, ValueError, r"`norm` must be one of 'linf', 'l2'"),
    ({"loss": "cross_entropy"}, ValueError, r"`loss` must be one of 'ce', 'dlr'"),
    ({"targeted": True}, ValueError, r"`targeted=True` is APGD-T.*loss='dlr'"),
    ({"targeted": 1, "loss": "dlr"}, TypeError, r"`targeted` must be a bool"),
    ({"steps": 0}, ValueError, r"`steps` must be >= 1"),
    ({"steps": 2.5}, TypeError, r"`steps` must be an int"),
    ({"restarts": 0}, ValueError, r"`restarts` must be >= 1"),
    ({"rho": 1.5}, ValueError, r"`rho` must be in \[0, 1\]"),
    ({"eot_samples": 0}, ValueError, r"`eot_samples` must be >= 1"),
    ({"seed": -1}, ValueError, r"`seed` must be >= 0"),
    ({"compute_dtype": "float16"}, ValueError,
     r"`compute_dtype` must be one of 'float32', 'bfloat16', 'auto'"),
    ({"loss": "dlr", "targeted": True, "n_target_classes": 10}, ValueError,
     r"`n_target_classes` must be <= 9"),
    ({"y": np.array([0, 1, 2, 11])}, ValueError, r"`y` must be class ids in \[0, 10\)"),
    ({"x": np.ones((4, 28, 28, 1)) * 2}, ValueError, r"`x` must lie in \[clip_min"),
    ({"model": "not a model"}, TypeError, r"`model` must be a Keras model or a callable"),
    ({"model": lambda im: tf.zeros([tf.shape(im)[0], 2]), "loss": "dlr",
      "y": np.zeros(4, np.int64)}, ValueError, r"needs a model with at least 3 classes"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    _call(**kwargs)
