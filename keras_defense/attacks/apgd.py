"""Auto-PGD (APGD-CE, APGD-DLR, APGD-T), compiled, per image, with early stop.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690;
the details follow the authors' reference code (fra31/auto-attack,
``autoattack/autopgd_base.py``):

- start at ``x + eps * t / ||t||`` (L-inf: t uniform in [-1, 1], scaled so its
  largest entry is +-eps; L2: t Gaussian), clipped to the box;
- step size ``eta = 2 eps`` per image; ``z = P(x_k + eta * s(grad))`` and
  ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with a = 1 at the
  first step and 0.75 after (s = sign for L-inf, grad / ||grad||_2 for L2);
- checkpoints after ``w_1 = max(int(0.22 N), 1)`` steps, then every ``k``
  steps with ``k`` shrinking by ``max(int(0.03 N), 1)`` down to
  ``max(int(0.06 N), 1)``; at a checkpoint an image halves its step size and
  restarts from its best point (and best point's gradient) if its loss rose
  in at most ``rho * k`` of the last ``k`` steps, or if it was not halved at
  the previous checkpoint and its best loss has not improved since (the
  reference compares the first step's loss with 0, and so do we);
- the loss is the cross-entropy, the DLR loss or the targeted DLR loss
  (APGD-T: one run per target class, the 2nd .. (n_target_classes+1)-th
  largest clean logits); success is always misclassification.

The whole run of ``steps`` iterations is one ``tf.function`` per (model,
options), built once and cached; epsilon, steps, rho and the seed are tensor
arguments. Per image, an attack stops when it misclassifies: after each of
the first ``core.UNROLL`` steps and then after every chunk of ``core.UNROLL``
unrolled steps, broken images leave the batch (their first adversarial
iterate is kept), so they cost no more gradients; between
restarts and targets only the images still robust are attacked (as the
reference does). APGD-T with fewer images left than ``batch_size`` runs
several target classes at once, as rows of one batch (the same runs at a
larger batch's throughput: 21.3 s -> 18.0 s for the 9 targets on 120 images of
an adversarially trained MNIST model, benchmarks/README.md); all rows of an
image leave the batch when one of them misclassifies, and an image broken by
several targets keeps the first target's example.

Example:
  >>> x_adv = apgd(model, x, y, 0.3)                               # APGD-CE
  >>> x_adv = apgd(model, x, y, 0.3, loss="dlr", targeted=True)    # APGD-T
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from keras_defense.attacks import core
from keras_defense.attacks import losses
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

DEFAULT_BATCH_SIZE = 1000
APGD_LOSSES = ("ce", "dlr")
_TINY = 1e-12            # the reference's guard in normalisations and DLR
_MOMENTUM = 0.75         # paper: alpha = 0.75 (1.0 at the first step)
_FIRST_CHECKPOINT = 0.22   # paper: p_1 = 0.22
_MIN_PERIOD = 0.06         # paper: periods shrink by 0.03 down to 0.06
_PERIOD_DECREASE = 0.03


def _expand(v: tf.Tensor) -> tf.Tensor:
  """(N,) -> (N, 1, 1, 1) for broadcasting against images."""
  return tf.reshape(v, [-1, 1, 1, 1])


def _l2(t: tf.Tensor) -> tf.Tensor:
  return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2, 3], keepdims=True))


def start_point(x: tf.Tensor, epsilon: tf.Tensor, norm: str, seed: tf.Tensor,
                clip_min: float, clip_max: float) -> tf.Tensor:
  """APGD's random start: ``clip(x + eps * t / ||t||)`` (see the module doc).

  ``t`` is ``tf.random.stateless_uniform(shape, seed, -1, 1)`` (L-inf, divided
  by its largest |entry| per image) or ``tf.random.stateless_normal(shape,
  seed)`` (L2, divided by its L2 norm per image).
  """
  shape = tf.shape(x)
  if norm == "linf":
    t = tf.random.stateless_uniform(shape, seed, -1.0, 1.0)
    scale = tf.reduce_max(tf.abs(t), axis=[1, 2, 3], keepdims=True)
  else:
    t = tf.random.stateless_normal(shape, seed)
    scale = _l2(t)
  return tf.clip_by_value(x + epsilon * t / (scale + _TINY), clip_min, clip_max)


def checkpoint_schedule(steps: Any) -> tuple[Any, Any, Any]:
  """``(first period, smallest period, decrease)`` of APGD's checkpoints.

  Exactly the reference's ``max(int(p * steps), 1)`` for p = 0.22, 0.06, 0.03,
  computed in float64 like Python's floats; ``steps`` a Python int or an
  int32 tensor.
  """
  if isinstance(steps, int):
    return tuple(max(int(p * steps), 1) for p in
                 (_FIRST_CHECKPOINT, _MIN_PERIOD, _PERIOD_DECREASE))
  n = tf.cast(steps, tf.float64)
  return tuple(tf.maximum(tf.cast(tf.floor(tf.constant(p, tf.float64) * n),
                                  tf.int32), 1)
               for p in (_FIRST_CHECKPOINT, _MIN_PERIOD, _PERIOD_DECREASE))


class _AutoPGD:
  """One compiled APGD run: ``(x, y, target, eps, steps, rho, seed) -> result``.

  ``run`` returns ``(x_out, broken, loss_best, iterations)`` in the input
  order: ``broken`` (bool (N,)) where an iterate (or the random start) was
  misclassified, and then ``x_out`` is the first such iterate; elsewhere
  ``x_out`` is the point of highest loss and ``loss_best`` its loss;
  ``iterations`` (int32 (N,)) counts the gradient steps each image needed,
  the one at the start included (up to 1 + steps; EOT samples not counted).
  """

  def __init__(self, logits_fn: Callable[[tf.Tensor], tf.Tensor], *,
               image_shape: tuple[int, ...], norm: str, loss: str,
               targeted: bool, clip_min: float, clip_max: float,
               eot_samples: int,
               exact_logits: Callable[[tf.Tensor], tf.Tensor] | None = None):
    self._logits = logits_fn
    # bfloat16: the float32 model, which confirms each misclassification.
    self._exact = exact_logits
    self._norm = norm
    self._clip = (clip_min, clip_max)
    self._eot = eot_samples
    if loss == "ce":
      self._loss = lambda logits, y, t: losses.cross_entropy(logits, y)
    elif targeted:
      self._loss = losses.targeted_dlr
    else:
      self._loss = lambda logits, y, t: losses.dlr(logits, y)
    # With EOT a step already loops over samples: no unrolling needed.
    self._unroll = core.UNROLL if eot_samples == 1 else 1
    self.run = tf.function(self._run, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.float32),
        tf.TensorSpec([2], tf.int64),
    ])

  def _gradient(self, x_adv, y, t):
    """(loss (N,), gradient averaged over the EOT samples, misclassified (N,)).

    As in the reference, loss and prediction come from the last sample.
    """
    def sample():
      with tf.GradientTape() as tape:
        tape.watch(x_adv)
        logits = self._logits(x_adv)
        loss = self._loss(logits, y, t)
        total = tf.reduce_sum(loss)
      return loss, tape.gradient(total, x_adv), logits

    loss, grad, logits = sample()
    if self._eot > 1:
      def body(j, loss, grad_sum, logits):
        loss, g, logits = sample()
        return j + 1, loss, grad_sum + g, logits
      _, loss, grad, logits = tf.while_loop(
          lambda j, *_: j < self._eot, body, (1, loss, grad, logits))
      grad = grad / float(self._eot)
    return loss, grad, tf.argmax(logits, -1) != y

  def _confirmed(self, wrong, x_adv, y):
    """``wrong`` where the float32 model agrees (bfloat16 logits are coarse).

    A bfloat16 misclassification near the boundary is often none in float32;
    taking it would end the image's run early. One float32 forward pass of
    just the candidate images decides; in float32 this is ``wrong`` itself.
    """
    if self._exact is None:
      return wrong
    out = runtime.on_subset(
        wrong, {"x": x_adv, "y": y, "ok": wrong},
        lambda sub: {"ok": tf.argmax(self._exact(sub["x"]), -1) != sub["y"]})
    return wrong & out["ok"]

  def _project(self, v, s, epsilon):
    """Into the ball around ``s["x"]`` and the box, as the reference does."""
    if self._norm == "linf":
      return tf.clip_by_value(v, s["lower"], s["upper"])
    d = v - s["x"]
    n = _l2(d)
    return tf.clip_by_value(s["x"] + d / (n + _TINY) * tf.minimum(epsilon, n),
                            *self._clip)

  def _run(self, x, y, target, image, epsilon, steps, rho, seed):
    """One run per row; ``image`` (N,) the row's image id: rows of one image
    (APGD-T's targets batched together) leave the batch together as soon as
    one of them is misclassified."""
    first_period, min_period, decrease = checkpoint_schedule(steps)
    n = tf.shape(x)[0]
    n_images = tf.reduce_max(image) + 1
    x_adv = start_point(x, epsilon, self._norm, seed, *self._clip)
    loss, grad, wrong = self._gradient(x_adv, y, target)
    wrong = self._confirmed(wrong, x_adv, y)
    s = {"x": x, "y": y, "t": target, "idx": tf.range(n), "image": image,
         "x_adv": x_adv, "x_prev": x_adv, "grad": grad,
         "x_best": x_adv, "grad_best": grad, "loss_best": loss,
         "step": tf.fill([n], 2.0 * epsilon),   # paper: eta_0 = 2 eps
         "prev_loss": tf.zeros([n]), "rises": tf.zeros([n]),
         "loss_best_ckpt": loss, "reduced_ckpt": tf.ones([n], tf.bool),
         "broken": wrong, "x_found": x_adv, "iterations": tf.ones([n], tf.int32)}
    if self._norm == "linf":
      s["lower"] = tf.maximum(x - epsilon, self._clip[0])
      s["upper"] = tf.minimum(x + epsilon, self._clip[1])
    out = {"x": x, "broken": tf.zeros([n], tf.bool),
           "loss": tf.fill([n], -np.inf), "iterations": tf.zeros([n], tf.int32)}

    def step(i, period, since, s):
      s = dict(s)
      a = tf.where(i > 0, _MOMENTUM, 1.0)
      x_adv = s["x_adv"]
      if self._norm == "linf":
        direction = tf.sign(s["grad"])
      else:
        direction = s["grad"] / (_l2(s["grad"]) + _TINY)
      z = self._project(x_adv + _expand(s["step"]) * direction, s, epsilon)
      x_new = self._project(
          x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - s["x_prev"]), s, epsilon)
      s["x_prev"] = x_adv
      loss, grad, wrong = self._gradient(x_new, s["y"], s["t"])
      wrong = self._confirmed(wrong & ~s["broken"], x_new, s["y"]) | s["broken"]
      # Gradients an image needed: up to the step that broke it.
      s["iterations"] += tf.cast(~s["broken"], tf.int32)
      s["x_found"] = tf.where(_expand(wrong & ~s["broken"]), x_new, s["x_found"])
      s["broken"] = s["broken"] | wrong
      s["rises"] += tf.cast(loss > s["prev_loss"], tf.float32)
      s["prev_loss"] = loss
      better = loss > s["loss_best"]
      s["x_best"] = tf.where(_expand(better), x_new, s["x_best"])
      s["grad_best"] = tf.where(_expand(better), grad, s["grad_best"])
      s["loss_best"] = tf.where(better, loss, s["loss_best"])
      since += 1
      # Checkpoint (the same iteration for every image of the run).
      at_ckpt = since == period
      halve = ((s["rises"] <= tf.cast(period, tf.float32) * rho)
               | (~s["reduced_ckpt"] & (s["loss_best_ckpt"] >= s["loss_best"])))
      s["reduced_ckpt"] = tf.where(at_ckpt, halve, s["reduced_ckpt"])
      s["loss_best_ckpt"] = tf.where(at_ckpt, s["loss_best"], s["loss_best_ckpt"])
      halve &= at_ckpt
      s["step"] = tf.where(halve, s["step"] / 2.0, s["step"])
      s["x_adv"] = tf.where(_expand(halve), s["x_best"], x_new)
      s["grad"] = tf.where(_expand(halve), s["grad_best"], grad)
      s["rises"] = tf.where(at_ckpt, 0.0, s["rises"])
      period = tf.where(at_ckpt, tf.maximum(period - decrease, min_period), period)
      since = tf.where(at_ckpt, 0, since)
      return i + 1, period, since, s

    def drop_broken(s, out):
      """Writes the broken rows' first adversarial iterate out; drops every
      row of a broken image."""
      def drop():
        broken = tf.where(s["broken"])
        where = tf.gather_nd(s["idx"], broken)[:, None]
        image_broken = tf.math.unsorted_segment_max(
            tf.cast(s["broken"], tf.int32), s["image"], n_images)
        leaving = tf.gather(image_broken, s["image"]) > 0
        gone = tf.where(leaving)
        new_out = {
            "x": tf.tensor_scatter_nd_update(
                out["x"], where, tf.gather_nd(s["x_found"], broken)),
            "broken": tf.tensor_scatter_nd_update(
                out["broken"], where, tf.ones(tf.shape(where)[:1], tf.bool)),
            "loss": out["loss"],
            "iterations": tf.tensor_scatter_nd_update(
                out["iterations"], tf.gather_nd(s["idx"], gone)[:, None],
                tf.gather_nd(s["iterations"], gone))}
        keep = tf.where(~leaving)
        return {k: tf.gather_nd(v, keep) for k, v in s.items()}, new_out
      return tf.cond(tf.reduce_any(s["broken"]), drop, lambda: (s, out))

    def chunk(i, period, since, s, out):
      def unrolled():
        state = (i, period, since, s)
        for _ in range(self._unroll):
          state = step(*state)
        return state

      def one_by_one():
        # The first UNROLL steps one per chunk (an image APGD breaks, it
        # mostly breaks within a few steps: it leaves the batch at once),
        # and the tail of fewer than UNROLL steps.
        left = tf.where(i < self._unroll, 1, steps - i)
        return tf.while_loop(lambda j, *_: j < left,
                             lambda j, *state: (j + 1, *step(*state)),
                             (0, i, period, since, s))[1:]

      if self._unroll == 1:
        i, period, since, s = step(i, period, since, s)
      else:
        i, period, since, s = tf.cond(
            (i >= self._unroll) & (steps - i >= self._unroll), unrolled,
            one_by_one)
      s, out = drop_broken(s, out)
      return i, period, since, s, out

    s, out = drop_broken(s, out)
    _, _, _, s, out = tf.while_loop(
        lambda i, period, since, s, out: (i < steps) & (tf.size(s["idx"]) > 0),
        chunk, (0, first_period, 0, s, out))
    # The images never misclassified: their best-loss point.
    where = s["idx"][:, None]
    return (tf.tensor_scatter_nd_update(out["x"], where, s["x_best"]),
            out["broken"],
            tf.tensor_scatter_nd_update(out["loss"], where, s["loss_best"]),
            tf.tensor_scatter_nd_update(out["iterations"], where,
                                        s["iterations"]))


def apgd(model: Any, x: Any, y: Any, epsilon: float, *, norm: str = "linf",
         loss: str = "ce", targeted: bool = False, n_target_classes: int = 9,
         steps: int = 100, restarts: int = 1, rho: float = 0.75,
         clip_min: float = 0.0, clip_max: float = 1.0,
         batch_size: int = DEFAULT_BATCH_SIZE, compute_dtype: str = "float32",
         seed: int = 0, eot_samples: int = 1,
         return_iterations: bool = False) -> Any:
  """Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and APGD-T.

  Untargeted runs ascend the loss at the true label; ``loss="dlr",
  targeted=True`` is APGD-T, which runs ``restarts`` times for each of the
  ``n_target_classes`` classes with the largest clean logits after the top one
  (the reference's target order), ascending the targeted DLR loss. Only the
  images the model classifies correctly are attacked, and each restart or
  target only those not yet misclassified; within a run an image stops at its
  first misclassified iterate (see the module doc).

  Defaults are the paper's/AutoAttack's: 100 iterations, 1 restart, rho 0.75,
  9 target classes.

  Args:
    model: a Keras model (called with ``training=False``) or any callable
      mapping images to logits (N, K).
    x: images, float32 (N, H, W, C) in [clip_min, clip_max]; numpy or tensor.
    y: int (N,) true labels.
    epsilon: radius >= 0 of the ``norm`` ball, in pixel units.
    norm: "linf" or "l2".
    loss: "ce" (softmax cross-entropy) or "dlr" (difference of logits ratio,
      invariant to scaling the logits; K >= 3, targeted K >= 4).
    targeted: APGD-T (requires ``loss="dlr"``).
    n_target_classes: APGD-T's number of target classes, 1 <= it <= K - 1.
    steps: iterations per run, >= 1.
    restarts: random restarts per run (per target for APGD-T), >= 1.
    rho: the fraction of loss rises below which a checkpoint halves the step,
      in [0, 1].
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    batch_size: images per compiled call.
    compute_dtype: "float32" (default), "auto" (the faster of
      float32/bfloat16 for this model on this machine, see
      ``runtime.resolve_compute_dtype``) or "bfloat16" (Keras models only;
      each misclassification is confirmed by a float32 forward pass of just
      those images before the image leaves the run). bfloat16 costs strength where robust accuracy is far from 0:
      on an FGSM-RS-trained MNIST model (ε 0.3, 500 images), APGD-CE in bfloat16
      left 52.8% robust vs 47.0% in float32, and AutoAttack ended 2.2 points
      above the reference (float32: 0.2 above); benchmarks/README.md.
    seed: seed of the random starts (stateless; per batch and run).
    eot_samples: forward/backward passes whose gradients are averaged per
      step (expectation over transformation, for randomized models), >= 1.
    return_iterations: also return the gradient evaluations each image cost.

  Returns:
    Float32-valued images with the shape and dtype of ``x`` (numpy if ``x``
    was numpy, else a tensor): for each image misclassified by some iterate,
    that adversarial example; else the highest-loss point found (the clean
    image where the model was wrong to begin with). Always inside the
    ``epsilon`` ball around ``x`` and [clip_min, clip_max].
    With ``return_iterations``, ``(x_adv, iterations)``: int64 (N,) input
    gradients computed for each image over all its runs, up to and including
    the one that broke it (each run: 1 at the start + 1 per step, times
    ``eot_samples``); 0 for images misclassified from the start.

  Raises:
    ValueError: a bad value (epsilon < 0, unknown norm/loss/compute_dtype,
      ``targeted`` without ``loss="dlr"``, too few classes for the loss or the
      target count, counts < 1, rho outside [0, 1], bad images or labels).
    TypeError: a bad type (non-numeric numbers, non-bool ``targeted``,
      non-integer labels or counts, an uncallable model, bfloat16 with a
      non-Keras callable).
  """
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  epsilon = validation.check_number("epsilon", epsilon, minimum=0.0)
  validation.check_choice("norm", norm, validation.NORMS)
  validation.check_choice("loss", loss, APGD_LOSSES)
  targeted = validation.check_bool("targeted", targeted)
  if targeted and loss != "dlr":
    raise ValueError("`targeted=True` is APGD-T, which uses the targeted DLR "
                     f"loss: pass loss='dlr'; got loss={loss!r}.")
  n_target_classes, steps, restarts = validation.check_runs(
      n_target_classes, steps, restarts)
  rho = validation.check_fraction("rho", rho, zero_ok=True)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  seed = validation.check_int("seed", seed, minimum=0)
  eot_samples = validation.check_int("eot_samples", eot_samples, minimum=1)
  return_iterations = validation.check_bool("return_iterations", return_iterations)
  validation.check_choice("compute_dtype", compute_dtype,
                          validation.COMPUTE_DTYPES_AUTO)
  exact = runtime.logits_function(model, "float32")
  inputs = runtime.prepare(x, y, clip_min, clip_max, exact)
  k = inputs.num_classes
  needed = 4 if targeted else 3 if loss == "dlr" else 2
  if k < needed:
    raise ValueError(f"`loss={loss!r}`{' targeted' if targeted else ''} needs "
                     f"a model with at least {needed} classes; got {k}.")
  if targeted and n_target_classes > k - 1:
    raise ValueError(f"`n_target_classes` must be <= {k - 1} (the classes "
                     f"other than the top one); got {n_target_classes}.")
  image_shape = tuple(inputs.x.shape[1:])
  dtype = runtime.resolve_compute_dtype(model, compute_dtype, image_shape,
                                        min(batch_size, len(inputs.x)))
  logits_fn = runtime.logits_function(model, dtype)
  key = ("apgd", image_shape, norm, loss, targeted, clip_min, clip_max, dtype,
         eot_samples)
  attack = runtime.cached(model, key, lambda: _AutoPGD(
      logits_fn, image_shape=image_shape, norm=norm, loss=loss,
      targeted=targeted, clip_min=clip_min, clip_max=clip_max,
      eot_samples=eot_samples,
      exact_logits=exact if dtype == "bfloat16" else None))

  xs, ys = inputs.x, inputs.y
  clean_logits = _logits_in_batches(model, exact, xs, batch_size)
  live = np.argmax(clean_logits, -1) == ys
  x_out = xs.copy()
  best = np.full(len(xs), -np.inf, np.float32)
  iterations = np.zeros(len(xs), np.int64)
  if targeted:   # the reference's targets: sorted logits positions 2 .. n+1
    ranked = np.argsort(-clean_logits, axis=-1, kind="stable")
  consts = [tf.constant(epsilon, tf.float32), tf.constant(steps, tf.int32),
            tf.constant(rho, tf.float32)]
  run_id = 0
  # APGD-T with few images left runs several target slots as rows of one batch.
  for group, per_call in runtime.target_groups(
      range(n_target_classes if targeted else 1), batch_size,
      lambda: int(live.sum())):
    g = len(group)
    for _ in range(restarts):
      todo = np.flatnonzero(live)
      for start in range(0, len(todo), per_call):
        b = todo[start:start + per_call]
        n = b.size
        rows, image_ids = runtime.target_rows(b, g)
        t = (ranked[rows, np.repeat(np.asarray(group) + 1, n)] if targeted
             else ys[rows])
        out_x, broken, loss_best, used = (v.numpy() for v in attack.run(
            tf.constant(xs[rows]), tf.constant(ys[rows]), tf.constant(t),
            tf.constant(image_ids, tf.int32), *consts,
            tf.constant([seed, run_id], tf.int64)))
        run_id += 1
        out_x = out_x.reshape(g, n, *out_x.shape[1:])
        broken, loss_best = broken.reshape(g, n), loss_best.reshape(g, n)
        iterations[b] += used.reshape(g, n).sum(0) * eot_samples
        hit = broken.any(0)
        # An image broken by several targets keeps the first target's example.
        x_out[b[hit]] = out_x[broken[:, hit].argmax(0), np.flatnonzero(hit)]
        live[b[hit]] = False
        best_row = np.where(broken, -np.inf, loss_best).argmax(0)
        loss_row = loss_best[best_row, np.arange(n)]
        better = ~hit & (loss_row > best[b])
        x_out[b[better]] = out_x[best_row[better], np.flatnonzero(better)]
        best[b[better]] = loss_row[better]
  if return_iterations:
    return inputs.restore(x_out), iterations
  return inputs.restore(x_out)


def _logits_in_batches(model: Any, logits_fn: Callable[[tf.Tensor], tf.Tensor],
                       x: np.ndarray, batch_size: int) -> np.ndarray:
  """Float32 logits of ``x``, compiled once per model and image shape."""
  fn = runtime.cached(model, ("logits", x.shape[1:]), lambda: tf.function(
      logits_fn, input_signature=[tf.TensorSpec([None, *x.shape[1:]], tf.float32)]))
  return runtime.in_batches(fn, batch_size, x)
