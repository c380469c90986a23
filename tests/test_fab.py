"""Tests for keras_defense.attacks.fab (FAB / FAB-T) and its projections."""

import numpy as np
import pytest
from scipy import optimize

import keras_defense
from keras_defense import attacks
from keras_defense.attacks import fab_projections
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays


def _feasible_problems(dim, rows, seed):
  """Random points in [0, 1]^dim and hyperplanes through another box point."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(0, 1, (rows, dim))
  w = rng.normal(size=(rows, dim))
  w[:, : dim // 4] = 0.0              # some coordinates do not matter
  z = rng.uniform(0, 1, (rows, dim))
  b = np.sum(w * z, 1)
  return t, w, b


def _linf_lp(t, w, b):
  """min ||d||_inf  s.t.  w.(t + d) = b, 0 <= t + d <= 1  (scipy's HiGHS LP)."""
  dim = t.size
  cost = np.zeros(dim + 1)
  cost[-1] = 1.0
  a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))],
                   [-np.eye(dim), -np.ones((dim, 1))]])
  a_eq = np.concatenate([w, [0.0]])[None]
  bounds = [(-ti, 1 - ti) for ti in t] + [(0, None)]
  res = optimize.linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=a_eq,
                         b_eq=[b - w @ t], bounds=bounds, method="highs")
  return res.x[-1]


def _l2_bisection(t, w, b):
  """min ||d||_2 on the same set: d = clip(lambda w, -t, 1 - t), lambda by bisection."""
  target = b - w @ t
  lo, hi = -1e6, 1e6
  for _ in range(200):
    lam = (lo + hi) / 2
    if w @ np.clip(lam * w, -t, 1 - t) < target:
      lo = lam
    else:
      hi = lam
  return np.linalg.norm(np.clip(lam * w, -t, 1 - t))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_smallest_step_onto_the_hyperplane_in_the_box(norm):
  t, w, b = _feasible_problems(dim=24, rows=16, seed=0)
  project = {"linf": fab_projections.projection_linf,
             "l2": fab_projections.projection_l2}[norm]
  d = project(tf.constant(t, tf.float32), tf.constant(w, tf.float32),
              tf.constant(b, tf.float32)).numpy().astype(np.float64)
  np.testing.assert_allclose(np.sum(w * (t + d), 1), b, atol=1e-3)
  assert np.all(t + d >= -1e-5) and np.all(t + d <= 1 + 1e-5)
  for k in range(len(t)):
    if norm == "linf":
      np.testing.assert_allclose(np.abs(d[k]).max(), _linf_lp(t[k], w[k], b[k]),
                                 rtol=1e-3)
    else:
      np.testing.assert_allclose(np.linalg.norm(d[k]),
                                 _l2_bisection(t[k], w[k], b[k]), rtol=1e-3)


class _TwoClassLinear:
  """z = x W + c with two classes: the smallest adversarial is an LP/QP away."""

  def __init__(self, dim, seed=0):
    rng = np.random.default_rng(seed)
    self.w = rng.normal(size=(dim, 2)).astype(np.float32)
    self.c = np.zeros(2, np.float32)

  def __call__(self, x):
    return tf.matmul(tf.reshape(x, [tf.shape(x)[0], -1]), self.w) + self.c


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_finds_the_minimum_norm_adversarial_of_a_linear_model(norm):
  """On a linear model FAB's linearisation is exact: it must reach the true minimum.

  An epsilon 3% above each image's minimum adversarial norm breaks it; 3%
  below, no adversarial exists and the image must come back unchanged.
  """
  model = _TwoClassLinear(dim=36)
  rng = np.random.default_rng(2)
  x = rng.uniform(0.2, 0.8, (12, 6, 6, 1)).astype(np.float32)
  y = np.argmax(model(x).numpy(), -1).astype(np.int64)
  flat = x.reshape(len(x), -1).astype(np.float64)
  wt = (model.w[:, 1] - model.w[:, 0]).astype(np.float64)
  normal = np.where(y[:, None] == 0, wt, -wt)      # towards the other class
  solve = _linf_lp if norm == "linf" else _l2_bisection
  # The boundary normal . z = 0, reached from each image inside the box.
  exact = np.array([solve(flat[k], normal[k], 0.0) for k in range(len(x))])
  for scale, broken in ((1.03, True), (0.97, False)):
    for k in range(len(x)):
      x_adv = attacks.fab(model, x[k:k + 1], y[k:k + 1], scale * exact[k],
                          norm=norm, steps=60)
      pred = np.argmax(model(x_adv).numpy(), -1)[0]
      assert (pred != y[k]) == broken, (k, scale, exact[k])
      if not broken:
        np.testing.assert_array_equal(x_adv, x[k:k + 1])


def test_zero_epsilon_returns_the_input():
  model = _TwoClassLinear(dim=36)
  x = np.random.default_rng(0).uniform(0, 1, (4, 6, 6, 1)).astype(np.float32)
  y = np.argmax(model(x).numpy(), -1).astype(np.int64)
  np.testing.assert_array_equal(attacks.fab(model, x, y, 0.0), x)


@pytest.fixture(scope="module")
def m0():
  return keras_defense.load_model("saved_models/mnist_m0/1")


def test_fab_t_breaks_m0_with_small_real_adversarials(m0):
  x, y = load_arrays("mnist", "test", limit=12)
  eps = 0.2
  x_adv = attacks.fab(m0, x, y, eps, n_target_classes=2, steps=40)
  clean = np.argmax(m0(x, training=False).numpy(), -1) == y
  pred = np.argmax(m0(x_adv, training=False).numpy(), -1)
  changed = np.any(x_adv != x, axis=(1, 2, 3))
  # Every returned adversarial is real: misclassified, inside ball and box.
  np.testing.assert_array_equal(changed, clean & (pred != y))
  assert np.abs(x_adv - x).max() <= eps + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  # M0 is an undefended C&W net: at 0.2 most of its images fall.
  assert changed.sum() >= 0.6 * clean.sum(), (changed.sum(), clean.sum())


def _dense_problem(*, seed, hidden, classes, data_seed, n):
  """A seeded tiny dense net on 6x6 images, n random images and its own labels."""
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.layers.Flatten(input_shape=(6, 6, 1)),
                            keras.layers.Dense(hidden, activation="relu"),
                            keras.layers.Dense(classes)])
  x = np.random.default_rng(data_seed).uniform(0, 1, (n, 6, 6, 1)).astype(np.float32)
  return model, x, np.argmax(model(x).numpy(), -1).astype(np.int64)


def test_untargeted_and_bfloat16_and_tensor_input():
  """Untargeted FAB (with a random restart) and bfloat16 FAB-T: real adversarials."""
  model, x, y = _dense_problem(seed=0, hidden=16, classes=4, data_seed=3, n=16)
  # restarts=2: the second run starts from the reference's random point.
  for kwargs in ({"targeted": False, "restarts": 2}, {"compute_dtype": "bfloat16"}):
    x_adv = attacks.fab(model, tf.constant(x), y, 0.3, steps=30, **kwargs)
    assert isinstance(x_adv, tf.Tensor)
    x_adv = x_adv.numpy()
    changed = np.any(x_adv != x, axis=(1, 2, 3))
    pred = np.argmax(model(x_adv).numpy(), -1)
    assert changed.sum() >= 4, kwargs
    np.testing.assert_array_equal(changed, pred != y)
    assert np.abs(x_adv - x).max() <= 0.3 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("kwargs,error,match", [
    ({"epsilon": -0.1}, ValueError, "`epsilon` must be >= 0"),
    ({"norm": "l1"}, ValueError, "`norm` must be one of"),
    ({"targeted": "yes"}, TypeError, "`targeted` must be a bool"),
    ({"n_target_classes": 0}, ValueError, "`n_target_classes` must be >= 1"),
    ({"steps": 0}, ValueError, "`steps` must be >= 1"),
    ({"restarts": 1.5}, TypeError, "`restarts` must be an int"),
    ({"alpha_max": 2.0}, ValueError, "`alpha_max` must be in \\[0, 1\\]"),
    ({"eta": 0.5}, ValueError, "`eta` must be >= 1"),
    ({"beta": 1.5}, ValueError, "`beta` must be in \\(0, 1\\]"),
    ({"compute_dtype": "float16"}, ValueError, "`compute_dtype` must be one of"),
    ({"seed": -2}, ValueError, "`seed` must be >= 0"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
  model = _TwoClassLinear(dim=36)
  x = np.full((2, 6, 6, 1), 0.5, np.float32)
  args = {"epsilon": 0.1, **kwargs}
  eps = args.pop("epsilon")
  with pytest.raises(error, match=match):
    attacks.fab(model, x, np.array([0, 1]), eps, **args)


def test_batched_target_ranks_find_what_one_rank_at_a_time_finds():
  """FAB-T with few images batches its target ranks (batch_size >> images);
  with batch_size = the image count it runs one rank at a time. Deterministic
  runs: the same images are broken, each by a real adversarial in the ball."""
  model, x, y = _dense_problem(seed=1, hidden=32, classes=6, data_seed=4, n=24)
  eps = 0.06
  one_by_one = attacks.fab(model, x, y, eps, steps=30, batch_size=24)
  batched = attacks.fab(model, x, y, eps, steps=30, batch_size=1000)
  broken = [np.argmax(model(a).numpy(), -1) != y for a in (one_by_one, batched)]
  np.testing.assert_array_equal(broken[0], broken[1])
  assert 0 < broken[1].sum() < len(y)  # the test means something
  assert np.abs(batched - x).max() <= eps + 1e-6
  np.testing.assert_array_equal(np.any(batched != x, axis=(1, 2, 3)), broken[1])
