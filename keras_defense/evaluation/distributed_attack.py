"""FGSM/BIM crafted and scored data-parallel under a tf.distribute strategy.

A thin layer over the attack core: each replica runs the same compiled
``attacks.core.IterativeAttack`` (built once per model, as for one device) on
its shard of a distributed dataset (``strategy.experimental_distribute_dataset``
+ ``strategy.run``), then predicts the clean and adversarial images with every
model scored on them. Success counts are reduced with
``strategy.reduce(SUM)``; the per-image adversarial images and masks are
all-gathered (``strategy.gather``) with their indices, so every worker ends
with the full results in test-set order, equal to a single-device run.

Success is counted as in ``evaluation.score``: over images the scored model
classified correctly before the attack (targeted: whose target differs from
the label), untargeted = class changed, targeted = target reached.

Models need not be built under the strategy: the attack only reads weights
and differentiates with respect to the images.

Example:
  >>> strategy = distribution.make_strategy("mirrored", num_cpu_devices=2)
  >>> result = attack_and_score(strategy, m0, {"m0": m0, "m1": m1}, x, y,
  ...                           attack="bim", epsilon=0.3, step_size=0.075, steps=10)
  >>> result.successes["m1"], result.n["m1"]
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from keras_defense.attacks import core
from keras_defense.attacks import runtime
from keras_defense.attacks import validation
from keras_defense.util.compat import tf

ATTACKS = ("fgsm", "bim")


class DistributedAttackResult(NamedTuple):
  """Full-size results in input order, identical on every worker."""
  x_adv: np.ndarray                 # float32 (N, H, W, C)
  success: dict[str, np.ndarray]    # model -> bool (N,), False where not counted
  counted: dict[str, np.ndarray]    # model -> bool (N,), images the rate is over
  n: dict[str, int]                 # model -> counted images (reduced across replicas)
  successes: dict[str, int]         # model -> successes (reduced across replicas)


def attack_and_score(strategy: tf.distribute.Strategy, crafter: Any,
                     targets: Mapping[str, Any], x: Any, y: Any, *, attack: str,
                     epsilon: float, step_size: float | None = None, steps: int = 1,
                     targeted: bool = False, y_target: Any = None,
                     loss: str = "cross_entropy", compute_dtype: str = "float32",
                     batch_size: int = 1000, clip_min: float = 0.0,
                     clip_max: float = 1.0) -> DistributedAttackResult:
  """Crafts FGSM/BIM on ``crafter`` and scores them on ``targets``, data-parallel.

  Args:
    strategy: any ``tf.distribute.Strategy`` (see ``distribution.make_strategy``).
    crafter: Keras model or callable, images -> logits (N, K), attacked.
    targets: name -> model the adversarial images are scored on.
    x: float32 (N, H, W, C) images in [clip_min, clip_max].
    y: int (N,) true labels.
    attack: "fgsm" (one step of ``epsilon``) or "bim" (``steps`` steps of
      ``step_size``, no random start).
    epsilon: L-inf radius >= 0.
    step_size: BIM step > 0 (ignored for FGSM).
    steps: BIM steps >= 1 (ignored for FGSM).
    targeted: move toward ``y_target`` instead of away from ``y``.
    y_target: int (N,) targets; required when ``targeted``.
    loss: "cross_entropy" or "margin".
    compute_dtype: "float32" or "bfloat16".
    batch_size: images per replica per step.
    clip_min: lowest pixel value.
    clip_max: highest pixel value.

  Returns:
    A ``DistributedAttackResult``.

  Raises:
    ValueError: an unknown attack, ``targeted`` without ``y_target``, or the
      argument errors of ``attacks.fgsm``/``attacks.bim``.
  """
  validation.check_choice("attack", attack, ATTACKS)
  clip_min, clip_max = validation.check_clip_range(clip_min, clip_max)
  epsilon, step_size, steps = core.check_step_args(
      epsilon, None if attack == "fgsm" else step_size, steps)
  batch_size = validation.check_int("batch_size", batch_size, minimum=1)
  validation.check_choice("loss", loss, validation.LOSSES)
  logits_fn = runtime.logits_function(crafter, compute_dtype)
  inputs = runtime.prepare(x, y, clip_min, clip_max, logits_fn)
  if targeted:
    if y_target is None:
      raise ValueError("`y_target` must be given when `targeted=True`; got None.")
    goal = validation.check_labels(y_target, len(inputs.y), inputs.num_classes,
                                   name="y_target")
  else:
    goal = inputs.y
  # The same compiled core (and cache entry) the single-device fgsm/bim use.
  crafted = core.cached_attack(
      crafter, logits_fn, image_shape=tuple(inputs.x.shape[1:]), loss=loss, norm="linf",
      random_start=False, clip_min=clip_min, clip_max=clip_max, compute_dtype=compute_dtype,
      single_step=attack == "fgsm")
  names = list(targets)
  # Built once per (strategy, crafter's core, targets), like the core's steps;
  # epsilon, step size, steps and targeted are tensors, so a new epsilon or the
  # other mode does not retrace.
  step = runtime.cached(
      crafter, ("distributed", id(strategy), id(crafted),
                tuple(id(targets[k]) for k in names)),
      lambda: _distributed_step(strategy, crafted, [
          runtime.logits_function(targets[k], compute_dtype) for k in names]))
  constants = (tf.constant(epsilon, tf.float32), tf.constant(step_size, tf.float32),
               tf.constant(steps, tf.int32), tf.constant(bool(targeted)))

  n = len(inputs.x)
  dataset = tf.data.Dataset.from_tensor_slices(
      (np.arange(n, dtype=np.int64), inputs.x, inputs.y, goal.astype(np.int64)))
  dataset = dataset.batch(batch_size * strategy.num_replicas_in_sync)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  dist = strategy.experimental_distribute_dataset(dataset.with_options(options))

  x_adv = np.zeros_like(inputs.x)
  success = np.zeros((n, len(names)), bool)
  counted = np.zeros((n, len(names)), bool)
  totals = np.zeros((2, len(names)), np.int64)
  for batch in dist:
    index, xa, s, c, counts = (t.numpy() for t in step(batch, *constants))
    x_adv[index], success[index], counted[index] = xa, s, c
    totals += counts
  for j, name in enumerate(names):  # the reduced counts must equal the gathered masks
    if (totals[0, j], totals[1, j]) != (counted[:, j].sum(), success[:, j].sum()):
      raise RuntimeError(f"replica counts for {name!r} disagree with the gathered "
                         f"masks: {totals[:, j].tolist()}")
  return DistributedAttackResult(
      x_adv=inputs.restore(x_adv),
      success={k: success[:, j] for j, k in enumerate(names)},
      counted={k: counted[:, j] for j, k in enumerate(names)},
      n={k: int(totals[0, j]) for j, k in enumerate(names)},
      successes={k: int(totals[1, j]) for j, k in enumerate(names)})


def _distributed_step(strategy, crafted, scorers):
  """A tf.function: global batch -> all-gathered per-image results and summed counts.

  ``targeted`` is a scalar bool tensor argument, so both modes share one trace.
  """
  seed = tf.constant([0, 0], tf.int64)  # FGSM/BIM have no random start

  def replica_step(index, xb, yb, gb, epsilon, step_size, steps, targeted):
    x_adv = crafted.run(xb, gb, epsilon, step_size, steps, seed, targeted)
    success, counted = [], []
    for logits in scorers:
      correct = tf.argmax(logits(xb), -1) == yb
      pred = tf.argmax(logits(x_adv), -1)
      c = tf.where(targeted, correct & (gb != yb), correct)
      reached = tf.where(targeted, pred == gb, pred != yb)
      success.append(reached & c)
      counted.append(c)
    success, counted = tf.stack(success, 1), tf.stack(counted, 1)  # (b, T)
    counts = tf.stack([tf.reduce_sum(tf.cast(counted, tf.int64), 0),
                       tf.reduce_sum(tf.cast(success, tf.int64), 0)], 0)  # (2, T)
    # (all-gather takes numbers, not bools)
    return index, x_adv, tf.cast(success, tf.int32), tf.cast(counted, tf.int32), counts

  @tf.function
  def step(batch, epsilon, step_size, steps, targeted):
    index, x_adv, success, counted, counts = strategy.run(
        replica_step, args=(*batch, epsilon, step_size, steps, targeted))
    return (strategy.gather(index, 0), strategy.gather(x_adv, 0),
            strategy.gather(success, 0), strategy.gather(counted, 0),
            strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None))

  return step
