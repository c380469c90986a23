"""Tests for keras_defense.attacks.square (Square Attack, score-based)."""

import importlib

import numpy as np
import pytest

import keras_defense
from keras_defense import attacks
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays

# The package exports the function `square`, which hides the module's name.
square_lib = importlib.import_module("keras_defense.attacks.square")

_H = _W = 12   # small images: the eager re-count below runs image by image


class LinearLogits:
  """A fixed linear classifier (no variables) whose gradient is a tripwire.

  Its forward pass is wrapped in ``tf.custom_gradient``; building the
  gradient of anything through it records the call in ``gradient_calls``
  (at trace time inside ``tf.function``, eagerly otherwise).
  """

  def __init__(self, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    self.w = tf.constant(rng.normal(size=(_H * _W, classes)).astype(np.float32))
    self.b = tf.constant(rng.normal(size=(classes,)).astype(np.float32))
    self.gradient_calls = []

  def __call__(self, x):
    @tf.custom_gradient
    def forward(x):
      logits = tf.matmul(tf.reshape(x, [-1, _H * _W]), self.w) + self.b
      def grad(upstream):
        self.gradient_calls.append(1)
        return tf.zeros_like(x) + tf.reduce_sum(upstream) * 0.0
      return logits, grad
    return forward(x)


@pytest.fixture(scope="module")
def tiny():
  """Random 12x12 images labelled by the linear model itself, 3 of them wrong."""
  model = LinearLogits()
  rng = np.random.default_rng(1)
  x = rng.uniform(0.0, 1.0, size=(40, _H, _W, 1)).astype(np.float32)
  y = np.argmax(model(x).numpy(), -1).astype(np.int64)
  y[:3] = (y[:3] + 1) % 10        # misclassified from the start
  return model, x, y


def _margin(model, x, y):
  z = model(x).numpy().astype(np.float64)
  other = z.copy()
  other[np.arange(len(y)), y] = -np.inf
  return z[np.arange(len(y)), y] - other.max(-1)


def _greedy_per_image(model, x, y, start, draws, candidate, dtype):
  """The reference's search, one image at a time: keep a candidate if it lowers the margin.

  An image wrong from the start costs 0 queries; otherwise the start costs 1
  and each candidate ``candidate(best, xk, k, i, draw)`` (in ``dtype``) 1,
  until the margin is <= 0 or the draws run out. Returns (x_adv, queries).
  """
  out, counts = x.copy(), np.zeros(len(x), np.int64)
  for k in range(len(x)):
    xk, yk = x[k:k + 1].astype(dtype), y[k:k + 1]
    if _margin(model, x[k:k + 1], yk)[0] <= 0:      # wrong from the start: 0 queries
      continue
    best = start[k:k + 1].astype(dtype)
    m = _margin(model, best.astype(np.float32), yk)[0]
    counts[k] = 1
    for i, d in enumerate(draws):
      if m <= 0:
        break
      cand = candidate(best, xk, k, i, d)
      mn = _margin(model, cand.astype(np.float32), yk)[0]
      counts[k] += 1
      if mn < m:
        best, m = cand, mn
    if m <= 0:
      out[k] = best[0]
  return out, counts


def _eager_linf(model, x, y, eps, queries, seed, p_init=0.8):
  """Reference Square-L-inf, one image at a time, with the module's draws."""
  n, h, w, c = x.shape
  sides = tf.constant(square_lib.window_sides(p_init, h, w, "linf"))
  u = tf.random.stateless_uniform([n, 1, w, c], tf.constant([seed, 0], tf.int64))
  start = np.clip(x + eps * np.sign(2.0 * u.numpy() - 1.0), 0.0, 1.0)
  loop_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), 1)
  draws = [square_lib.iteration_draws(loop_seed, tf.constant(i), sides, h, w, c)
           for i in range(queries - 1)]

  def candidate(best, xk, k, i, d):
    s, vh, vw = int(d["s"]), int(d["vh"]), int(d["vw"])
    new = best.copy()
    new[:, vh:vh + s, vw:vw + s, :] += 2.0 * eps * d["signs"].numpy()
    return np.clip(np.clip(new, xk - eps, xk + eps), 0.0, 1.0)

  return _greedy_per_image(model, x, y, start, draws, candidate, np.float32)


def _eager_l2(model, x, y, eps, queries, seed, p_init=0.8):
  """Reference Square-L2, one image at a time, with the module's draws."""
  n, h, w, c = x.shape
  key = tf.constant([seed, 0], tf.int64)
  # The start: eta(h // 5) on a 5 x 5 grid, each tile transposed or not, times
  # a sign per image, tile and channel, scaled to norm eps.
  s0, sp = h // 5, (h - (h // 5) * 5) // 2
  flips = tf.random.stateless_uniform(
      [(h // s0) * (w // s0)], tf.random.experimental.stateless_fold_in(key, 2)) > 0.5
  u = tf.random.stateless_uniform([n, (h // s0) * (w // s0), c], key).numpy()
  delta = np.zeros_like(x, np.float64)
  for tile, (r, q) in enumerate((r, q) for r in range(h // s0) for q in range(w // s0)):
    eta = square_lib.eta_pattern(s0)
    eta = eta.T if flips[tile] else eta
    vh, vw = sp + r * s0, sp + q * s0
    rows, cols = min(s0, h - vh), min(s0, w - vw)   # the grid overhangs 12 px
    delta[:, vh:vh + rows, vw:vw + cols, :] += (
        eta[None, :rows, :cols, None] * np.sign(2 * u[:, tile, None, None, :] - 1))
  norms = np.sqrt((delta**2).sum(axis=(1, 2, 3), keepdims=True))
  start = np.clip(x + delta / (norms + 1e-12) * eps, 0.0, 1.0)
  sides = tf.constant(square_lib.window_sides(p_init, h, w, "l2"))
  loop_seed = tf.random.experimental.stateless_fold_in(key, 1)
  draws, signs = [], []
  for i in range(queries - 1):
    draws.append(square_lib.iteration_draws(loop_seed, tf.constant(i), sides, h, w, c))
    k = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(loop_seed, tf.constant(i, tf.int64)), 1)
    signs.append(np.sign(2 * tf.random.stateless_uniform([n, c], k).numpy() - 1))

  def candidate(best, xk, k, i, d):
    s, vh, vw, vh2, vw2 = (int(d[v]) for v in ("s", "vh", "vw", "vh2", "vw2"))
    cur = best - xk
    win1 = (slice(None), slice(vh, vh + s), slice(vw, vw + s), slice(None))
    win2 = (slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s), slice(None))
    norm_w1 = np.sqrt((cur[win1]**2).sum(axis=(1, 2), keepdims=True))
    norm_img = np.sqrt((cur**2).sum())
    union = np.zeros_like(cur)
    union[win1] = 1.0
    union[win2] = 1.0
    norm_windows = np.sqrt(((cur * union)**2).sum())
    eta = square_lib.eta_pattern(s)
    eta = eta.T if bool(d["flip"]) else eta
    new = eta[None, :, :, None] * signs[i][k] + cur[win1] / (1e-12 + norm_w1)
    new = new / (1e-12 + np.sqrt((new**2).sum(axis=(1, 2), keepdims=True))) * np.sqrt(
        max(eps**2 - norm_img**2, 0.0) / c + norm_windows**2)
    cur[win2] = 0.0
    cur[win1] = new
    return np.clip(xk + cur / (np.sqrt((cur**2).sum()) + 1e-12) * eps, 0.0, 1.0)

  return _greedy_per_image(model, x, y, start, draws, candidate, np.float64)


def test_l2_matches_an_eager_recount_query_for_query(tiny):
  model, x, y = tiny
  queries = 40
  x_adv, counts = attacks.square(model, x, y, 0.6, norm="l2", queries=queries,
                                 seed=4, return_queries=True)
  expected_x, expected_counts = _eager_l2(model, x, y, 0.6, queries, 4)
  assert len(set(expected_counts.tolist())) >= 5
  np.testing.assert_array_equal(counts, expected_counts)
  np.testing.assert_allclose(x_adv, expected_x, atol=1e-5)


def test_linf_matches_an_eager_recount_query_for_query(tiny):
  """Compiled, batched and compacted == the reference loop run image by image."""
  model, x, y = tiny
  queries = 60
  x_adv, counts = attacks.square(model, x, y, 0.05, queries=queries, seed=3,
                                 return_queries=True)
  expected_x, expected_counts = _eager_linf(model, x, y, 0.05, queries, 3)
  # The data gives every case: wrong from the start, fooled by the start,
  # fooled later at several different queries, never fooled.
  assert np.all(expected_counts[:3] == 0)
  fooled_at = expected_counts[(expected_counts > 0) & (expected_counts < queries)]
  assert len(set(fooled_at.tolist())) >= 5
  assert np.any(expected_counts == queries)
  np.testing.assert_array_equal(counts, expected_counts)
  np.testing.assert_allclose(x_adv, expected_x, atol=1e-6)


def test_images_fooled_at_query_k_report_k(tiny):
  """With a budget of exactly k queries, an image that needed k is fooled; with k-1 not."""
  model, x, y = tiny
  _, counts = attacks.square(model, x, y, 0.05, queries=60, seed=3,
                             return_queries=True)
  k = int(np.median(counts[(counts > 1) & (counts < 60)]))
  idx = np.flatnonzero(counts == k)
  for budget, fooled in ((k, True), (k - 1, False)):
    x_adv, n = attacks.square(model, x, y, 0.05, queries=budget, seed=3,
                              return_queries=True)
    pred = np.argmax(model(x_adv[idx]).numpy(), -1)
    assert np.all((pred != y[idx]) == fooled), budget
    np.testing.assert_array_equal(n[idx], budget)


def test_never_builds_a_gradient(tiny):
  model, x, y = tiny
  attacks.square(model, x, y, 0.1, queries=20, seed=0)
  attacks.square(model, x, y, 1.0, norm="l2", queries=20, seed=0)
  assert not model.gradient_calls
  # The tripwire works: a compiled gradient through the model trips it.
  @tf.function
  def grad(v):
    with tf.GradientTape() as tape:
      tape.watch(v)
      loss = tf.reduce_sum(model(v))
    return tape.gradient(loss, v)
  grad(tf.constant(x[:2]))
  assert model.gradient_calls


class CountingNumpyModel:
  """A NumPy model (``util.numpy_model``) that is never fooled: class 0 by a margin of 5.

  Records the batch size of every call, as an interpreter would cost them.
  """

  runs_on_numpy = True
  num_classes = 10

  def __init__(self):
    self.calls = []

  def __call__(self, x):
    self.calls.append(len(x))
    logits = np.zeros((len(x), self.num_classes), np.float32)
    logits[:, 0] = 5.0
    return logits


@pytest.mark.parametrize("queries", [9, 10, 2 * square_lib.UNROLL + 3])
def test_calls_the_model_no_more_than_the_budget(tiny, queries):
  """Nothing fooled: the probe, the clean check, the start, queries - 1 candidates, the
  final check; the last unrolled chunk makes no call past the budget."""
  _, x, _ = tiny
  model = CountingNumpyModel()
  y = np.zeros(len(x), np.int64)
  x_adv, counts = attacks.square(model, x, y, 0.1, queries=queries, seed=0,
                                 return_queries=True)
  np.testing.assert_array_equal(counts, queries)
  np.testing.assert_array_equal(x_adv, x)
  assert model.calls == [1] + [len(x)] * (queries + 2)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_stays_in_ball_and_box_and_is_reproducible(tiny, norm, eps):
  model, x, y = tiny
  x_adv, counts = attacks.square(model, x, y, eps, norm=norm, queries=40,
                                 seed=5, return_queries=True)
  delta = (x_adv - x).reshape(len(x), -1)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.sqrt((delta**2).sum(-1)).max() <= eps * (1 + 1e-5)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
  assert np.all(counts <= 40) and np.all(counts[:3] == 0)
  np.testing.assert_array_equal(x_adv[:3], x[:3])
  # Fooled images are really misclassified; the others come back unchanged.
  changed = np.any(x_adv != x, axis=(1, 2, 3))
  pred = np.argmax(model(x_adv).numpy(), -1)
  assert changed.any()
  np.testing.assert_array_equal(changed[3:], pred[3:] != y[3:])
  again, counts_again = attacks.square(model, x, y, eps, norm=norm, queries=40,
                                       seed=5, return_queries=True)
  np.testing.assert_array_equal(again, x_adv)
  np.testing.assert_array_equal(counts_again, counts)
  other = attacks.square(model, x, y, eps, norm=norm, queries=40, seed=6)
  assert np.any(other != x_adv)


def test_zero_epsilon_returns_the_input_without_queries(tiny):
  model, x, y = tiny
  x_adv, counts = attacks.square(model, x, y, 0.0, return_queries=True)
  np.testing.assert_array_equal(x_adv, x)
  assert not counts.any()


def test_breaks_the_gradient_masked_model():
  """M2 (logits augmentation) masks gradients; a score-based attack ignores that."""
  model = keras_defense.load_model("saved_models/mnist_m2/1")
  x, y = load_arrays("mnist", "test", limit=20)
  x_adv, counts = attacks.square(model, x, y, 0.3, queries=300, seed=0,
                                 return_queries=True)
  clean = np.argmax(model(x, training=False).numpy(), -1) == y
  adv = np.argmax(model(x_adv, training=False).numpy(), -1) == y
  assert np.abs(x_adv - x).max() <= 0.3 + 1e-6
  assert adv.sum() <= clean.sum() - 5, (clean.sum(), adv.sum())
  assert np.all(counts[clean & ~adv] <= 300) and np.all(counts[~clean] == 0)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"epsilon": -0.1}, ValueError, "`epsilon` must be >= 0"),
    ({"epsilon": "0.3"}, TypeError, "`epsilon` must be a real number"),
    ({"norm": "l1"}, ValueError, "`norm` must be one of"),
    ({"queries": 0}, ValueError, "`queries` must be >= 1"),
    ({"queries": 10.0}, TypeError, "`queries` must be an int"),
    ({"p_init": 1.5}, ValueError, "`p_init` must be in \\(0, 1\\]"),
    ({"p_init": 0.0}, ValueError, "`p_init` must be > 0"),
    ({"seed": -1}, ValueError, "`seed` must be >= 0"),
    ({"batch_size": 0}, ValueError, "`batch_size` must be >= 1"),
])
def test_bad_arguments_name_the_argument(tiny, kwargs, error, match):
  model, x, y = tiny
  args = {"epsilon": 0.1, **kwargs}
  eps = args.pop("epsilon")
  with pytest.raises(error, match=match):
    attacks.square(model, x, y, eps, **args)
