"""Carlini & Wagner L0: repeated L2 attacks on a shrinking set of allowed pixels.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017, https://arxiv.org/abs/1608.04644 (reference code:
https://github.com/carlini/nn_robust_attacks). Per image, run the L2
objective with only the allowed pixels free; after each success drop the
pixels whose |change| x |gradient| is smallest, after each failure double c.
Defaults are the reference code's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_defense.attacks import runtime
from keras_defense.attacks.carlini_wagner import machinery
from keras_defense.attacks.carlini_wagner.machinery import DEFAULT_BATCH_SIZE
from keras_defense.attacks.carlini_wagner.machinery import expand
from keras_defense.attacks.carlini_wagner.machinery import Machinery
from keras_defense.attacks.carlini_wagner.machinery import sum_per_image
from keras_defense.util import docstrings
from keras_defense.util.compat import tf


class _CarliniWagnerL0(Machinery):
  """Compiled C&W L0: an L2 attack on a shrinking set of allowed pixels."""

  def __init__(self, logits_fn, *, image_shape, **kwargs):
    super().__init__(logits_fn, **kwargs)
    self.run = self.compile_rounds(image_shape)

  def _run(self, x, y, initial_const, largest_const, const_factor,
           max_iterations, lr, abort_early, max_rounds):
    b = tf.shape(x)[0]
    pixels = tf.shape(x)[1] * tf.shape(x)[2]

    def make_image(state, w):
      valid = state["valid"]   # (N, H, W, 1): 1 where the pixel may change
      return valid * self.from_tanh(w) + (1.0 - valid) * state["x"]

    def objective(state, x_new, logits):
      f = self.f(logits, state["y"])
      loss = state["const"] * f + sum_per_image(tf.square(x_new - state["x"]))
      return loss, (f < 1e-4) & self.reached(logits, state["y"])

    def after_round(state, ok, result):
      # C&W: rank the allowed pixels by |change| x |gradient of the loss| and
      # drop the least useful ones: stop after a pixel with total change > .01
      # or after 0.3 * sqrt(#unchanged values) pixels.
      def loss_gradient(sub):
        exact = self.exact_logits is not None
        with tf.GradientTape() as tape:
          tape.watch(sub["result"])
          logits = (self.exact_logits if exact else self.logits)(sub["result"])
          loss = tf.reduce_sum(
              sub["const"] * self.f(logits, sub["y"], exact=exact)
              + sum_per_image(tf.square(sub["result"] - sub["x"])))
        return {"grad": tape.gradient(loss, sub["result"])}

      # Only the images that succeeded this round lose pixels: only theirs.
      grad = runtime.on_subset(ok, {"result": result, "const": state["const"],
                             "y": y, "x": x, "grad": tf.zeros_like(x)},
                        loss_gradient)["grad"]
      change = tf.reshape(tf.reduce_sum(tf.abs(result - x) * tf.abs(grad), -1),
                          [b, pixels])
      valid = tf.reshape(state["valid"], [b, pixels]) > 0.5
      change = tf.where(valid, change, np.inf)
      order = tf.argsort(change, axis=1)
      rank = tf.argsort(order, axis=1)
      sorted_change = tf.gather(change, order, batch_dims=1)
      first_big = tf.argmax(tf.cast(sorted_change > 0.01, tf.int32), axis=1,
                            output_type=tf.int32)
      first_big = tf.where(tf.reduce_any(sorted_change > 0.01, axis=1),
                           first_big, pixels)
      unchanged = tf.cast(sum_per_image(
          tf.cast(tf.abs(x - result) < 1e-4, tf.float32)), tf.float32)
      by_count = tf.maximum(1, tf.cast(tf.math.ceil(0.3 * tf.sqrt(unchanged)),
                                       tf.int32))
      n_remove = tf.minimum(first_big + 1, by_count)
      remove = ok[:, None] & (rank < n_remove[:, None])
      valid = valid & ~remove
      state["valid"] = tf.where(expand(ok), tf.reshape(
          tf.cast(valid, tf.float32), tf.shape(state["valid"])), state["valid"])
      return self.double_on_failure(state, ok, const_factor, largest_const,
                                    going=tf.reduce_any(valid, axis=1))

    state = {"const": tf.fill([b], initial_const), "prev": x,
             "valid": tf.ones_like(x[..., :1]),
             "active": tf.ones([b], tf.bool), "found": tf.zeros([b], tf.bool)}
    return self.rounds(x, y, state, make_image=make_image, objective=objective,
                       after_round=after_round, max_iterations=max_iterations,
                       lr=lr, abort_early=abort_early, max_rounds=max_rounds)


@docstrings.fill(**machinery.ROUNDS_DOCS)
def carlini_wagner_l0(model: Any, x: Any, y: Any, *, targeted: bool = False,
                      confidence: float = 0.0, max_iterations: int = 1000,
                      learning_rate: float = 1e-2, initial_const: float = 1e-3,
                      largest_const: float = 2e6, const_factor: float = 2.0,
                      abort_early: bool = True, clip_min: float = 0.0,
                      clip_max: float = 1.0, compute_dtype: str = "float32",
                      batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
  """C&W L0: repeated L2 attacks on a shrinking set of allowed pixels.

  Per image: run the L2 objective with only the allowed pixels free (the
  others held at ``x``); on success, drop from the allowed set the pixels
  with the smallest |change| x |gradient| and continue from the new example;
  on failure double c; stop at c >= ``largest_const`` (returning the last
  success) or when no pixel is left. Defaults from the reference code: c from
  1e-3 doubling up to 2e6, Adam lr 1e-2, 1000 iterations.

  Args:
    {rounds_args}
    abort_early: end a round as soon as the goal holds.
  {rounds_tail}

  Raises:
    ValueError: as ``carlini_wagner_l2``, plus bad const factors.
    TypeError: as ``carlini_wagner_l2``.
  """
  largest_const, const_factor = machinery.check_const_schedule(
      initial_const, largest_const, const_factor)
  attack, inputs, batch_size = machinery.setup(
      model, x, y, variant=_CarliniWagnerL0, targeted=targeted,
      confidence=confidence, clip_min=clip_min, clip_max=clip_max,
      compute_dtype=compute_dtype, batch_size=batch_size,
      learning_rate=learning_rate, max_iterations=max_iterations,
      initial_const=initial_const)
  shrink_rounds = int(np.prod(inputs.x.shape[1:3]))   # >= 1 pixel per success
  return machinery.run_rounds(
      attack, inputs, batch_size, shrink_rounds, initial_const=initial_const,
      largest_const=largest_const, const_factor=const_factor,
      max_iterations=max_iterations, learning_rate=learning_rate,
      abort_early=abort_early)
