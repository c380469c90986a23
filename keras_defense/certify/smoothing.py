"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019, https://arxiv.org/abs/1902.02918).

The smoothed classifier ``g(x) = argmax_c P(f(x + δ) = c)``, ``δ ~ N(0, σ² I)``,
of any base classifier ``f`` (a callable images -> logits: a Keras model, a
loaded SavedModel, a ``Classifier``) is robust in an L2 ball: if the top class
has probability ``p_A >= p̲_A > 1/2``, then ``g`` is constant within radius
``σ Φ⁻¹(p̲_A)``. ``certify`` is the paper's CERTIFY: guess the top class
from ``n0`` noisy samples, then lower-bound its probability from ``n`` fresh
samples with a one-sided Clopper–Pearson bound at level ``alpha``, abstaining
(-1) when that bound is <= 1/2. ``predict`` is its PREDICT: abstain unless a
two-sided binomial test of the top two counts rejects a tie at ``alpha``.

The noise is not clipped to the pixel range (as in the paper). Noise comes
from stateless seeds per (seed, image index, batch), so a rerun, or one image
certified on its own, draws the same samples. The binomial tails use the
regularized incomplete beta function (``tf.math.betainc``, float64) and the
Beta quantile is found by bisection, so no scipy is needed.

Example:
  >>> pred, radius = certify(model, x, sigma=0.25, n0=100, n=10_000, alpha=0.001)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from keras_defense.attacks import runtime
from keras_defense.util.compat import tf

ABSTAIN = -1
DEFAULT_BATCH_SIZE = 1000
_BISECTION_STEPS = 60  # halves [0, 1] to below 1e-18


def beta_quantile(q: Any, a: Any, b: Any) -> np.ndarray:
  """The q-quantile of Beta(a, b), elementwise, by bisection on ``betainc`` (float64).

  Args:
    q: probabilities in [0, 1].
    a, b: shape parameters > 0 (broadcast with ``q``).

  Returns:
    float64 array x with I_x(a, b) = q.
  """
  q, a, b = (tf.convert_to_tensor(np.asarray(v, np.float64)) for v in (q, a, b))
  q, a, b = (tf.broadcast_to(v, tf.broadcast_dynamic_shape(
      tf.broadcast_dynamic_shape(tf.shape(q), tf.shape(a)), tf.shape(b))) for v in (q, a, b))
  lo, hi = tf.zeros_like(q), tf.ones_like(q)
  for _ in range(_BISECTION_STEPS):
    mid = (lo + hi) / 2
    below = tf.math.betainc(a, b, mid) < q
    lo, hi = tf.where(below, mid, lo), tf.where(below, hi, mid)
  return ((lo + hi) / 2).numpy()


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper–Pearson lower bound of a binomial proportion.

  ``B(alpha; k, n - k + 1)``, and 0 for k = 0 (what statsmodels'
  ``proportion_confint(k, n, 2 * alpha, method="beta")[0]`` gives).
  """
  k = np.asarray(successes, np.float64)
  n = np.asarray(trials, np.float64)
  safe = np.maximum(k, 1.0)
  out = beta_quantile(np.full(np.broadcast(k, n).shape, alpha), safe, n - safe + 1)
  return np.where(k > 0, out, 0.0)


def binomial_test_two_sided(k: Any, n: Any) -> np.ndarray:
  """p-value of the two-sided test of p = 1/2 for k successes in n trials.

  For p = 1/2 it is ``min(1, 2 P(X >= max(k, n - k)))`` with
  ``P(X >= m) = I_{1/2}(m, n - m + 1)`` (scipy's ``binomtest`` gives the same).
  """
  k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
  m = np.maximum(k, n - k)
  tail = tf.math.betainc(tf.constant(np.maximum(m, 1e-12)), tf.constant(n - m + 1),
                         tf.constant(np.full(m.shape, 0.5))).numpy()
  return np.where(n > 0, np.minimum(1.0, 2 * np.where(m > 0, tail, 1.0)), 1.0)


def _counter(model: Any) -> Callable:
  """Compiled: (image, number of samples, sigma, seed) -> class counts, built once per model."""
  logits = runtime.logits_function(model, "float32")

  def count(x, num, sigma, seed, k):
    noise = tf.random.stateless_normal(tf.concat([[num], tf.shape(x)], 0), seed) * sigma
    pred = tf.argmax(logits(x[None] + noise), axis=1, output_type=tf.int32)
    return tf.math.bincount(pred, minlength=k, maxlength=k, dtype=tf.int64)
  return runtime.cached(model, ("certify", "smoothing_counts"),
                        lambda: tf.function(count, reduce_retracing=True))


def sample_counts(model: Any, x: Any, num: int, *, sigma: float, num_classes: int,
                  seed: int = 0, stream: int = 0, batch_size: int = DEFAULT_BATCH_SIZE
                  ) -> np.ndarray:
  """How often ``model`` predicts each class on ``num`` noisy copies of each image.

  Args:
    model: a Keras model or any callable images -> logits (N, K).
    x: float32 images (N, ...).
    num: noisy samples per image, >= 1.
    sigma: the noise's standard deviation, > 0.
    num_classes: K.
    seed: the noise seed.
    stream: keeps sample sets of one image apart (selection vs estimation).
    batch_size: noisy images per model call.

  Returns:
    int64 (N, K) counts, each row summing to ``num``.
  """
  fn = _counter(model)
  x = np.asarray(x, np.float32)
  out = np.zeros((len(x), num_classes), np.int64)
  for i, image in enumerate(x):
    done, part = 0, 0
    while done < num:
      m = min(batch_size, num - done)
      seed_t = tf.constant([seed, (i * 2 + stream) * 1_000_003 + part], tf.int64)
      out[i] += fn(tf.constant(image), tf.constant(m, tf.int32),
                   tf.constant(sigma, tf.float32), seed_t,
                   tf.constant(num_classes, tf.int32)).numpy()
      done, part = done + m, part + 1
  return out


def _check(sigma, alpha, *counts):
  if not (np.isfinite(sigma) and sigma > 0):
    raise ValueError(f"`sigma` must be > 0; got {sigma!r}.")
  if not 0 < alpha < 1:
    raise ValueError(f"`alpha` must be in (0, 1); got {alpha!r}.")
  for name, value in counts:
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def certify(model: Any, x: Any, *, sigma: float, num_classes: int, n0: int = 100,
            n: int = 100_000, alpha: float = 0.001, seed: int = 0,
            batch_size: int = DEFAULT_BATCH_SIZE, first_index: int = 0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """CERTIFY of Cohen et al.: the smoothed prediction and its certified L2 radius.

  Defaults are the paper's (n0 100, n 100,000, alpha 0.001).

  Args:
    model: a Keras model or any callable images -> logits.
    x: float32 images (N, ...).
    sigma: noise standard deviation, > 0 (in pixel units).
    num_classes: K.
    n0: samples to select the top class.
    n: samples to estimate its probability.
    alpha: the failure probability of each certificate, in (0, 1).
    seed: noise seed.
    batch_size: noisy images per model call.
    first_index: the index of ``x[0]`` in a larger set (seeds the noise, so a
      chunked run draws what a whole run draws).

  Returns:
    (prediction int64 (N,), ABSTAIN where the bound is <= 1/2; radius float64
    (N,), ``sigma * Φ⁻¹(p̲_A)``, 0 where abstaining; p̲_A float64 (N,)).

  Raises:
    ValueError: sigma <= 0, alpha outside (0, 1), n0 or n < 1.
  """
  _check(sigma, alpha, ("n0", n0), ("n", n))
  x = np.asarray(x, np.float32)
  pred, radius, p_lower = (np.full(len(x), ABSTAIN, np.int64), np.zeros(len(x)),
                           np.zeros(len(x)))
  for i in range(len(x)):
    image = x[i:i + 1]
    top = int(np.argmax(sample_counts(model, image, n0, sigma=sigma, num_classes=num_classes,
                                      seed=seed, stream=2 * (first_index + i),
                                      batch_size=batch_size)[0]))
    counts = sample_counts(model, image, n, sigma=sigma, num_classes=num_classes, seed=seed,
                           stream=2 * (first_index + i) + 1, batch_size=batch_size)[0]
    p_lower[i] = float(clopper_pearson_lower(counts[top], n, alpha))
    if p_lower[i] > 0.5:
      pred[i] = top
      radius[i] = sigma * float(tf.math.ndtri(tf.constant(p_lower[i], tf.float64)))
  return pred, radius, p_lower


def predict(model: Any, x: Any, *, sigma: float, num_classes: int, n: int = 100_000,
            alpha: float = 0.001, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE
            ) -> np.ndarray:
  """PREDICT of Cohen et al.: the smoothed class, or ABSTAIN (-1).

  Returns the top class of ``n`` noisy samples when a two-sided binomial test
  rejects "the top two classes are equally likely" at level ``alpha`` (then
  the answer differs from g(x) with probability <= alpha), else ABSTAIN.

  Returns:
    int64 (N,) classes or ABSTAIN.
  """
  _check(sigma, alpha, ("n", n))
  counts = sample_counts(model, x, n, sigma=sigma, num_classes=num_classes, seed=seed,
                         stream=0, batch_size=batch_size)
  order = np.argsort(-counts, axis=1, kind="stable")
  top, second = order[:, 0], order[:, 1]
  rows = np.arange(len(counts))
  n_a, n_b = counts[rows, top], counts[rows, second]
  p = binomial_test_two_sided(n_a, n_a + n_b)
  return np.where(p <= alpha, top, ABSTAIN).astype(np.int64)
