"""FGSM, BIM and PGD: presets of the one iterative core in ``core``.

- FGSM (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572): one L-inf
  step of size epsilon, no random start.
- BIM (Kurakin et al. 2016, https://arxiv.org/abs/1607.02533): FGSM steps of
  ``step_size``, projected into the epsilon-ball and clipped after each step;
  i.e. PGD without random start.
- PGD (Madry et al. 2018, https://arxiv.org/abs/1706.06083): BIM from a
  uniform random start in the epsilon-ball, L-inf or L2.

Example:
  >>> x_adv = bim(model, x, y, 0.3, step_size=0.05, steps=10)
"""

from __future__ import annotations

from typing import Any

from keras_defense.attacks import core
from keras_defense.util import docstrings

DEFAULT_BATCH_SIZE = 1000

# The end of BIM's and PGD's Args, and their Returns (docstrings.fill).
_ITERATIVE_TAIL = '''\
  clip_min: lowest pixel value.
  clip_max: highest pixel value.
  loss: "cross_entropy" or "margin".
  compute_dtype: "float32" or "bfloat16".
  batch_size: images per compiled call.

Returns:
  Adversarial images, same shape/dtype/kind as ``x``.'''


def fgsm(model: Any, x: Any, y: Any, epsilon: float, *, targeted: bool = False,
         clip_min: float = 0.0, clip_max: float = 1.0,
         loss: str = "cross_entropy", compute_dtype: str = "float32",
         batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
  """Fast gradient sign method: ``clip(x + eps * sign(grad_x J(x, y)))``.

  Targeted: ``clip(x - eps * sign(grad_x J(x, t)))``.

  Args:
    model: a Keras model (called with ``training=False``) or any callable
      mapping images to logits (N, K).
    x: images, float32 (N, H, W, C) in [clip_min, clip_max]; numpy or tensor.
    y: int (N,) true labels (untargeted) or target labels (targeted).
    epsilon: L-inf radius, >= 0, in pixel units of [clip_min, clip_max].
    targeted: move toward ``y`` instead of away from it.
    clip_min: lowest pixel value.
    clip_max: highest pixel value.
    loss: "cross_entropy" (softmax CE, the paper's J) or "margin" (C&W f6,
      the defense-aware loss that does not saturate).
    compute_dtype: "float32" or "bfloat16" (Keras models only: a
      mixed_bfloat16 clone, cached).
    batch_size: images per compiled call.

  Returns:
    Adversarial images with the shape and dtype of ``x``; numpy if ``x`` was
    numpy, else a tensor.

  Raises:
    ValueError: epsilon < 0, labels out of range or not one per image, ``x``
      not rank 4, non-finite or outside [clip_min, clip_max], unknown loss.
    TypeError: non-numeric arguments, non-integer labels, a model that is not
      callable, bfloat16 with a non-Keras callable.
  """
  return core.iterative_attack(
      model, x, y, epsilon, step_size=None, steps=1, norm="linf", random_start=False,
      targeted=targeted, clip_min=clip_min, clip_max=clip_max, loss=loss,
      compute_dtype=compute_dtype, batch_size=batch_size, seed=0)


@docstrings.fill(iterative_tail=_ITERATIVE_TAIL)
def bim(model: Any, x: Any, y: Any, epsilon: float, *, step_size: float,
        steps: int, targeted: bool = False, clip_min: float = 0.0,
        clip_max: float = 1.0, loss: str = "cross_entropy",
        compute_dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
  """Basic iterative method (Kurakin et al. 2016), L-inf.

  ``x_{n+1} = clip(clip_[x-eps, x+eps](x_n + step_size * sign(grad J(x_n, y))))``
  from ``x_0 = x``. Kurakin's defaults in 0-255 units: step 1, min(eps + 4,
  1.25 eps) iterations; the authors of the defense used eps 0.3, step 0.05,
  10 steps on MNIST.

  Args:
    model: Keras model or callable, images -> logits (N, K).
    x: float32 (N, H, W, C) in [clip_min, clip_max].
    y: int (N,) true labels, or target labels if ``targeted``.
    epsilon: L-inf radius >= 0.
    step_size: per-step size > 0.
    steps: number of steps >= 1.
    targeted: descend the loss at ``y`` (e.g. least-likely targets).
  {iterative_tail}

  Raises:
    ValueError: as ``fgsm``, plus step_size <= 0 or steps < 1.
    TypeError: as ``fgsm``.
  """
  return core.iterative_attack(
      model, x, y, epsilon, step_size=step_size, steps=steps, norm="linf",
      random_start=False, targeted=targeted, clip_min=clip_min,
      clip_max=clip_max, loss=loss, compute_dtype=compute_dtype,
      batch_size=batch_size, seed=0)


@docstrings.fill(iterative_tail=_ITERATIVE_TAIL)
def pgd(model: Any, x: Any, y: Any, epsilon: float, *, step_size: float,
        steps: int, norm: str = "linf", random_start: bool = True,
        seed: int | None = None, targeted: bool = False, clip_min: float = 0.0,
        clip_max: float = 1.0, loss: str = "cross_entropy",
        compute_dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
  """Projected gradient descent (Madry et al. 2018), L-inf or L2.

  BIM started from a point drawn uniformly from the ``norm`` ball of radius
  epsilon; in L2 the step is ``step_size * g / ||g||_2`` and the projection
  rescales the perturbation onto the ball.

  Args:
    model: Keras model or callable, images -> logits (N, K).
    x: float32 (N, H, W, C) in [clip_min, clip_max].
    y: int (N,) true labels, or target labels if ``targeted``.
    epsilon: radius >= 0 in ``norm``.
    step_size: per-step size > 0 in ``norm``.
    steps: number of steps >= 1.
    norm: "linf" or "l2".
    random_start: start from a uniform point in the ball (False = BIM).
    seed: seed of the random start, for reproducible runs; None = random.
    targeted: descend the loss at ``y``.
  {iterative_tail}

  Raises:
    ValueError: as ``bim``, plus an unknown ``norm`` or a negative seed.
    TypeError: as ``fgsm``.
  """
  return core.iterative_attack(
      model, x, y, epsilon, step_size=step_size, steps=steps, norm=norm,
      random_start=random_start, targeted=targeted, clip_min=clip_min,
      clip_max=clip_max, loss=loss, compute_dtype=compute_dtype,
      batch_size=batch_size, seed=seed)
