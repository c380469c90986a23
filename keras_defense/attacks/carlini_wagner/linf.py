"""Carlini & Wagner L-inf: a shrinking bound tau on every pixel's change.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017, https://arxiv.org/abs/1608.04644 (reference code:
https://github.com/carlini/nn_robust_attacks). Per image, minimise
``c * f(x + d) + sum_i max(0, |d_i| - tau)`` in rounds: after each success
tau shrinks below the largest change found, after each failure c doubles.
Defaults are the reference code's.
"""

from __future__ import annotations

import math
from typing import Any

from keras_defense.attacks import validation
from keras_defense.attacks.carlini_wagner import machinery
from keras_defense.attacks.carlini_wagner.machinery import DEFAULT_BATCH_SIZE
from keras_defense.attacks.carlini_wagner.machinery import expand
from keras_defense.attacks.carlini_wagner.machinery import Machinery
from keras_defense.attacks.carlini_wagner.machinery import sum_per_image
from keras_defense.util import docstrings
from keras_defense.util.compat import tf


class _CarliniWagnerLinf(Machinery):
  """Compiled C&W L-inf: shrink tau by ``decrease_factor`` after each success."""

  def __init__(self, logits_fn, *, image_shape, clip_min, clip_max, **kwargs):
    super().__init__(logits_fn, clip_min=clip_min, clip_max=clip_max, **kwargs)
    self._range = clip_max - clip_min
    self.run = self.compile_rounds(image_shape, "decrease_factor")

  def _run(self, x, y, initial_const, largest_const, const_factor,
           decrease_factor, max_iterations, lr, abort_early, max_rounds):
    b = tf.shape(x)[0]
    tau_min = self._range / 256.0   # C&W: stop once tau < 1/256 of the range

    def objective(state, x_new, logits):
      excess = sum_per_image(tf.nn.relu(tf.abs(x_new - state["x"])
                                         - expand(state["tau"])))
      loss = state["const"] * self.f(logits, state["y"]) + excess
      # C&W: "works" when the whole loss is below 1e-4 * c and the goal holds.
      return loss, ((loss < 1e-4 * state["const"])
                    & self.reached(logits, state["y"]))

    def after_round(state, ok, result):
      actual = tf.reduce_max(tf.abs(result - x), axis=[1, 2, 3])
      state["tau"] = tf.where(
          ok, tf.minimum(state["tau"], actual) * decrease_factor, state["tau"])
      return self.double_on_failure(state, ok, const_factor, largest_const,
                                    going=state["tau"] >= tau_min)

    state = {"const": tf.fill([b], initial_const), "prev": x,
             "tau": tf.fill([b], tf.constant(self._range, tf.float32)),
             "active": tf.ones([b], tf.bool), "found": tf.zeros([b], tf.bool)}
    return self.rounds(x, y, state, make_image=lambda s, w: self.from_tanh(w),
                       objective=objective, after_round=after_round,
                       max_iterations=max_iterations, lr=lr,
                       abort_early=abort_early, max_rounds=max_rounds)


@docstrings.fill(**machinery.ROUNDS_DOCS)
def carlini_wagner_linf(model: Any, x: Any, y: Any, *, targeted: bool = False,
                        confidence: float = 0.0, max_iterations: int = 1000,
                        learning_rate: float = 5e-3, initial_const: float = 1e-5,
                        largest_const: float = 20.0, const_factor: float = 2.0,
                        decrease_factor: float = 0.9, abort_early: bool = True,
                        clip_min: float = 0.0, clip_max: float = 1.0,
                        compute_dtype: str = "float32",
                        batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
  """C&W L-inf: minimise ``c * f(x + d) + sum_i max(0, |d_i| - tau)``.

  Per image: start with tau = the pixel range and c = ``initial_const``; after
  each success set tau <- decrease_factor * min(tau, max|d|) and continue
  from that example; after a failure double c; stop at tau < range/256 or
  c >= ``largest_const``. Defaults from the reference code: c from 1e-5
  doubling up to 20, tau x 0.9, Adam lr 5e-3, 1000 iterations.

  Args:
    {rounds_args}
    decrease_factor: tau multiplier after a success, in (0, 1).
    abort_early: end a round as soon as the goal holds (else only the last
      iteration is checked).
  {rounds_tail}

  Raises:
    ValueError: as ``carlini_wagner_l2``, plus bad const/decrease factors.
    TypeError: as ``carlini_wagner_l2``.
  """
  largest_const, const_factor = machinery.check_const_schedule(
      initial_const, largest_const, const_factor)
  decrease_factor = validation.check_fraction("decrease_factor", decrease_factor,
                                              zero_ok=False, one_ok=False)
  attack, inputs, batch_size = machinery.setup(
      model, x, y, variant=_CarliniWagnerLinf, targeted=targeted,
      confidence=confidence, clip_min=clip_min, clip_max=clip_max,
      compute_dtype=compute_dtype, batch_size=batch_size,
      learning_rate=learning_rate, max_iterations=max_iterations,
      initial_const=initial_const)
  shrink_rounds = math.ceil(math.log(256.0) / -math.log(decrease_factor))  # every tau decrease
  return machinery.run_rounds(
      attack, inputs, batch_size, shrink_rounds, initial_const=initial_const,
      largest_const=largest_const, const_factor=const_factor,
      max_iterations=max_iterations, learning_rate=learning_rate,
      abort_early=abort_early, decrease_factor=decrease_factor)
