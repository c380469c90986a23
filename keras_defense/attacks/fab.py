"""FAB: the fast adaptive boundary attack (minimum norm), targeted FAB-T of AutoAttack.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020, https://arxiv.org/abs/1907.02044, as in the
AutoAttack reference (fra31/auto-attack, ``autoattack/fab_base.py``,
``fab_pt.py``), which this follows step for step. Each iteration linearises
the decision boundary at the current point ``x1`` (targeted: ``Z_t - Z_y``,
the target being the k-th largest clean logit; untargeted: the closest
linearised class boundary), projects both ``x1`` and the clean image ``x0``
onto that hyperplane intersected with the pixel box
(``fab_projections``), and moves to the convex combination
``(x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha`` with
``alpha = min(|d1| / (|d1| + |d2|), alpha_max)``; whenever ``x1`` is
misclassified it is recorded if it is the smallest so far and pulled back
towards ``x0`` by ``beta``. FAB-T runs once per target k = 2 .. n + 1, each
time only on the images still robust, like the reference's ``perturb``; with
fewer images left than ``batch_size``, several target ranks run at once as
rows of one batch (deterministic runs: the same images break as one rank at a
time, ``tests/test_fab.py``), all rows of an image stopping when one of them
has an adversarial within epsilon, the lowest rank's adversarial kept.

Per-image early stop: an image leaves the batch (at the next compaction
point, every ``UNROLL`` iterations) once an adversarial within epsilon is
recorded. This never changes whether an image is broken (the recorded norm
only decreases), only that the search for a still smaller norm stops, which
is all an epsilon-bounded evaluation needs. Defaults are the reference's:
100 iterations, alpha_max 0.1, eta 1.05, beta 0.9, 9 target classes.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from keras_defense.attacks import fab_projections
from keras_defense.attacks import losses
from keras_defense.attacks import metrics
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

DEFAULT_BATCH_SIZE = 1000
UNROLL = 4   # iterations per tf.while_loop iteration; compaction between them
_TINY = 1e-12
_PROJECTIONS = {"linf": fab_projections.projection_linf,
                "l2": fab_projections.projection_l2}


def _flat(t: tf.Tensor) -> tf.Tensor:
  """(N, ...) -> (N, D), keeping D static."""
  return tf.reshape(t, [-1, int(np.prod(t.shape[1:]))])


def _norm(t: tf.Tensor, norm: str) -> tf.Tensor:
  """Per-image L-inf or L2 norm of a (N, ...) tensor, shape (N,)."""
  if norm == "linf":
    return tf.reduce_max(tf.abs(_flat(t)), axis=1)
  return tf.sqrt(tf.reduce_sum(tf.square(_flat(t)), axis=1))


def _dual_norm(t: tf.Tensor, norm: str) -> tf.Tensor:
  """The norm FAB divides the logit gap by: L1 for L-inf, L2 for L2 (last axis)."""
  if norm == "linf":
    return tf.reduce_sum(tf.abs(t), axis=-1)
  return tf.sqrt(tf.reduce_sum(tf.square(t), axis=-1))


def _expand(v: tf.Tensor) -> tf.Tensor:
  return tf.reshape(v, [-1, 1, 1, 1])


class FabAttack:
  """Compiled FAB run for one (model, norm, targeted, options).

  Works in unit pixel coordinates ``u = (x - clip_min) / (clip_max -
  clip_min)``, where the reference's box is [0, 1]; ``run(x, y, rank,
  epsilon, steps, seed, random_start)`` -> ``(x_adv, found)``: the smallest
  adversarial found and whether it is within epsilon and misclassified by the
  float32 model.
  """

  def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor],
               exact_logits: Callable[[tf.Tensor], tf.Tensor], *,
               image_shape: tuple[int, ...], num_classes: int, norm: str,
               targeted: bool, alpha_max: float, eta: float, beta: float,
               clip_min: float, clip_max: float):
    self._lo, self._scale = clip_min, clip_max - clip_min
    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    # The model is traced once and called from every unrolled iteration.
    self._logits = tf.function(lambda u: logits_fn(self._pixels(u)),
                               input_signature=[spec])
    self._exact = exact_logits
    self._norm = norm
    self._targeted = targeted
    self._classes = num_classes
    self._alpha_max, self._eta, self._beta = alpha_max, eta, beta
    self._project = _PROJECTIONS[norm]
    self._hyperplane = tf.function(self._hyperplane_fn, input_signature=[
        spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)])
    self.run = tf.function(self._run, input_signature=[
        spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64),
        tf.TensorSpec([], tf.bool)])

  def _pixels(self, u):
    return self._lo + self._scale * u

  def _hyperplane_fn(self, u, y, target):
    """``(w, b)``: the linearised boundary ``w . z = b`` at ``u``, w (N, D), b (N,).

    Targeted: ``f = Z_t - Z_y`` and its gradient (one backward pass).
    Untargeted: of ``f_k = Z_k - Z_y`` for every class, the one with the
    smallest ``|f_k| / ||grad f_k||_dual`` (one backward pass per class).
    """
    if self._targeted:
      with tf.GradientTape() as tape:
        tape.watch(u)
        z = self._logits(u)
        label_logit, _ = losses.label_and_best_other(z, y)
        target_logit, _ = losses.label_and_best_other(z, target)
        df = target_logit - label_logit
        total = tf.reduce_sum(df)
      dg = _flat(tape.gradient(total, u))
    else:
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(u)
        z = self._logits(u)
        per_class = [tf.reduce_sum(z[:, k]) for k in range(self._classes)]
      grads = tf.stack([_flat(tape.gradient(total, u)) for total in per_class],
                       axis=1)   # (N, K, D)
      del tape
      onehot = tf.one_hot(y, self._classes)
      g_y = tf.reduce_sum(grads * onehot[:, :, None], axis=1, keepdims=True)
      z_y = tf.reduce_sum(z * onehot, axis=1, keepdims=True)
      dfs = tf.where(onehot > 0, 1e10, z - z_y)
      dgs = grads - g_y
      dist = tf.abs(dfs) / (_TINY + _dual_norm(dgs, self._norm))
      ind = tf.argmin(dist, axis=1)
      df = tf.gather(dfs, ind, batch_dims=1)
      dg = tf.gather(dgs, ind, batch_dims=1)
    w = dg
    b = -df + tf.reduce_sum(dg * _flat(u), axis=1)
    return w, b

  def _random_start(self, x0, epsilon, seed):
    """The reference's restart point: half of epsilon in a random direction."""
    if self._norm == "linf":
      t = tf.random.stateless_uniform(tf.shape(x0), seed, -1.0, 1.0)
    else:
      t = tf.random.stateless_normal(tf.shape(x0), seed)
    t = t / _expand(tf.maximum(_norm(t, self._norm), _TINY))
    return tf.clip_by_value(x0 + epsilon * t * 0.5, 0.0, 1.0)

  def _adversarial(self, u, y, live):
    """Live rows whose point ``u`` the model misclassifies (one forward pass)."""
    return live & (tf.argmax(self._logits(u), -1) != y)

  def _step(self, c, epsilon):
    """One FAB iteration on the images in ``c`` where ``c["live"]`` holds."""
    x1, x0, y = c["x1"], c["x0"], c["y"]
    live = c["live"]
    n = tf.shape(x1)[0]
    w, b = self._hyperplane(x1, y, c["target"])
    d3 = self._project(tf.concat([_flat(x1), _flat(x0)], 0),
                       tf.concat([w, w], 0), tf.concat([b, b], 0))
    a0 = tf.maximum(_norm(d3, self._norm), 1e-8)
    d1 = tf.reshape(d3[:n], tf.shape(x1))
    d2 = tf.reshape(d3[n:], tf.shape(x1))
    a1, a2 = a0[:n], a0[n:]
    alpha = _expand(tf.minimum(tf.maximum(a1 / (a1 + a2), 0.0), self._alpha_max))
    x1_new = tf.clip_by_value((x1 + self._eta * d1) * (1.0 - alpha)
                              + (x0 + self._eta * d2) * alpha, 0.0, 1.0)
    is_adv = self._adversarial(x1_new, y, live)
    dist = _norm(x1_new - x0, self._norm)
    better = is_adv & (dist < c["best_norm"])
    out = dict(c)
    out["adv"] = tf.where(_expand(better), x1_new, c["adv"])
    out["best_norm"] = tf.where(better, dist, c["best_norm"])
    x1_new = tf.where(_expand(is_adv), x0 + (x1_new - x0) * self._beta, x1_new)
    out["x1"] = tf.where(_expand(live), x1_new, x1)
    out["live"] = live & (out["best_norm"] > epsilon)
    return out

  def _run(self, x, y, rank, image, epsilon, steps, seed, random_start):
    """One run per row: ``rank`` (N,) its target's rank, ``image`` (N,) its image id.

    Rows of one image (several target ranks batched together) stop together
    as soon as one of them has an adversarial within epsilon.
    """
    u0 = (x - self._lo) / self._scale
    eps = epsilon / self._scale
    z = self._logits(u0)
    correct = tf.argmax(z, -1) == y
    # The rank-th largest clean logit (the reference's sort()[:, -rank]).
    target = tf.gather(tf.math.top_k(z, self._classes).indices, rank - 1,
                       batch_dims=1)
    target = tf.cast(target, tf.int64)
    x1 = tf.cond(random_start, lambda: self._random_start(u0, eps, seed),
                 lambda: u0)
    carry = {"x1": x1, "x0": u0, "y": y, "target": target, "adv": u0,
             "best_norm": tf.fill(tf.shape(y), tf.constant(1e10, tf.float32)),
             "live": correct}

    n_images = tf.reduce_max(image) + 1

    def chunk(i0, c):
      def run(sub):
        for k in range(UNROLL):
          sub = self._step(dict(sub, live=sub["live"] & (i0 + k < steps)), eps)
        return sub
      c = runtime.on_subset(c["live"], c, run)
      done = tf.math.unsorted_segment_max(
          tf.cast(c["best_norm"] <= eps, tf.int32), image, n_images)
      return i0 + UNROLL, dict(c, live=c["live"] & (tf.gather(done, image) == 0))

    _, carry = tf.while_loop(
        lambda i0, c: (i0 < steps) & tf.reduce_any(c["live"]),
        chunk, (tf.constant(0), carry))
    x_adv = self._pixels(carry["adv"])
    # The reference's perturb() accepts a run's result only if the model
    # misclassifies it and it lies within epsilon; both checked here on the
    # float32 model and in pixel units.
    found = (correct & (carry["best_norm"] <= eps)
             & (tf.argmax(self._exact(x_adv), -1) != y)
             & (_norm(x_adv - x, self._norm) <= epsilon))
    return tf.where(_expand(found), x_adv, x), found


def fab(model: Any, x: Any, y: Any, epsilon: float, *, norm: str = "linf",
        targeted: bool = True, n_target_classes: int = 9, steps: int = 100,
        restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, clip_min: float = 0.0, clip_max: float = 1.0,
        batch_size: int = DEFAULT_BATCH_SIZE, compute_dtype: str = "float32",
        seed: int = 0) -> Any:
  """FAB (Croce & Hein 2020); by default FAB-T, AutoAttack's minimum-norm attack.

  Args:
    model: a Keras model (called with ``training=False``) or any callable
      mapping images to logits (N, K).
    x: images, float32 (N, H, W, C) in [clip_min, clip_max]; numpy or tensor.
    y: int (N,) true labels.
    epsilon: radius >= 0 in ``norm`` (pixel units) within which an
      adversarial counts (0: ``x`` is returned).
    norm: "linf" or "l2".
    targeted: FAB-T: one run per target class, the k-th largest clean logit
      for k = 2 .. n_target_classes + 1, each on the images still robust.
      False: the untargeted FAB (one backward pass per class per iteration).
    n_target_classes: targets per image (capped at K - 1).
    steps: iterations per run, >= 1.
    restarts: runs per target (untargeted: runs); runs after the first start
      from a random point at epsilon / 2, as in the reference.
    alpha_max: largest weight of the step from the clean image, in [0, 1].
    eta: overshoot of the projection, >= 1.
    beta: backward step towards the clean image after a success, in (0, 1].
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    batch_size: images per compiled call.
    compute_dtype: "float32", "bfloat16" or "auto" (see
      ``runtime.resolve_compute_dtype``); successes are confirmed on the
      float32 model either way.
    seed: seed (>= 0) of the random restarts.

  Returns:
    ``x_adv`` with the shape, dtype and kind of ``x``: for each image where
    FAB found an adversarial within epsilon, that adversarial (misclassified
    by the float32 model, inside the ball and the box); every other image
    unchanged.

  Raises:
    ValueError: epsilon < 0, an unknown norm or compute_dtype, steps,
      restarts, n_target_classes or batch_size < 1, alpha_max outside [0, 1],
      eta < 1, beta outside (0, 1], bad labels or images.
    TypeError: non-numeric arguments, non-integer labels, a model that is not
      callable.
  """
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  epsilon = validation.check_number("epsilon", epsilon, minimum=0.0)
  validation.check_choice("norm", norm, validation.NORMS)
  targeted = validation.check_bool("targeted", targeted)
  n_target_classes, steps, restarts = validation.check_runs(
      n_target_classes, steps, restarts)
  alpha_max = validation.check_fraction("alpha_max", alpha_max, zero_ok=True)
  eta = validation.check_number("eta", eta, minimum=1.0)
  beta = validation.check_fraction("beta", beta, zero_ok=False)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  seed = validation.check_int("seed", seed, minimum=0)
  validation.check_choice("compute_dtype", compute_dtype,
                          validation.COMPUTE_DTYPES_AUTO)
  exact = runtime.logits_function(model, "float32")
  inputs = runtime.prepare(x, y, clip_min, clip_max, exact)
  if epsilon == 0.0:   # no adversarial lies within 0 of a correct image
    return inputs.restore(inputs.x.copy())
  image_shape = tuple(inputs.x.shape[1:])
  dtype = runtime.resolve_compute_dtype(model, compute_dtype, image_shape)
  logits_fn = runtime.logits_function(model, dtype)
  key = ("fab", image_shape, inputs.num_classes, norm, bool(targeted),
         alpha_max, eta, beta, clip_min, clip_max, dtype)
  attack = runtime.cached(model, key, lambda: FabAttack(
      logits_fn, exact, image_shape=image_shape,
      num_classes=inputs.num_classes, norm=norm, targeted=bool(targeted),
      alpha_max=alpha_max, eta=eta, beta=beta, clip_min=clip_min,
      clip_max=clip_max))

  x_adv = inputs.x.copy()
  robust = metrics.predict_classes(model, inputs.x, batch_size=batch_size) == inputs.y
  # Targeted: the ranks of the target logits; untargeted: one pass (the
  # rank is then unused).
  ranks = (range(2, min(n_target_classes, inputs.num_classes - 1) + 2)
           if targeted else [1])
  # Few images left: several target ranks run as rows of one batch.
  for group, per_call in runtime.target_groups(ranks, batch_size,
                                               lambda: int(robust.sum())):
    for restart in range(restarts):
      idx = np.flatnonzero(robust)
      for start in range(0, idx.size, per_call):
        sub = idx[start:start + per_call]
        rows, image_ids = runtime.target_rows(sub, len(group))
        out, found = attack.run(
            tf.constant(inputs.x[rows]), tf.constant(inputs.y[rows]),
            tf.constant(np.repeat(group, sub.size), tf.int32),
            tf.constant(image_ids, tf.int32),
            tf.constant(epsilon, tf.float32), tf.constant(steps, tf.int32),
            tf.constant([seed, group[0] * 10**6 + restart * 10**3 + start], tf.int64),
            tf.constant(restart > 0))
        found = found.numpy().reshape(len(group), sub.size)
        out = out.numpy().reshape(len(group), sub.size, *image_shape)
        hit = found.any(0)
        # An image found by several ranks keeps the lowest rank's adversarial.
        x_adv[sub[hit]] = out[found[:, hit].argmax(0), np.flatnonzero(hit)]
        robust[sub[hit]] = False
  return inputs.restore(x_adv)

