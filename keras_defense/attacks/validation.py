"""Argument checks shared by every attack; each error names the argument.

User mistakes raise ``ValueError`` (bad value) or ``TypeError`` (bad type) with
a message that says what was expected and what arrived, never ``assert``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from keras_defense.util.compat import tf

LOSSES = ("cross_entropy", "margin")
NORMS = ("linf", "l2")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The attacks that resolve "auto" by runtime.resolve_compute_dtype (APGD,
# FAB, AutoAttack) accept it; the others take a concrete dtype.
COMPUTE_DTYPES_AUTO = COMPUTE_DTYPES + ("auto",)


def check_number(name: str, value: Any, *, minimum: float | None = None,
                 strictly_positive: bool = False) -> float:
  """Returns ``value`` as a float after checking its type and lower bound."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} "
                    f"{value!r}.")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"`{name}` must be finite; got {value!r}.")
  if strictly_positive and value <= 0:
    raise ValueError(f"`{name}` must be > 0; got {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum:g}; got {value!r}.")
  return value


def check_fraction(name: str, value: Any, *, zero_ok: bool,
                   one_ok: bool = True) -> float:
  """Returns ``value`` as a float in [0, 1] after checking its type and bounds.

  The interval is open at 0 unless ``zero_ok`` and open at 1 unless ``one_ok``.
  """
  value = check_number(name, value, minimum=0.0 if zero_ok else None,
                       strictly_positive=not zero_ok)
  if value > 1.0 or (value == 1.0 and not one_ok):
    raise ValueError(f"`{name}` must be in {'[' if zero_ok else '('}0, "
                     f"1{']' if one_ok else ')'}; got {value!r}.")
  return value


def check_int(name: str, value: Any, *, minimum: int) -> int:
  """Returns ``value`` as an int after checking its type and lower bound."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int; got {type(value).__name__} "
                    f"{value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}; got {value!r}.")
  return int(value)


def check_runs(n_target_classes: Any, steps: Any,
               restarts: Any) -> tuple[int, int, int]:
  """Checks APGD's and FAB's run counts, in this order; each an int >= 1.

  Returns:
    (n_target_classes, steps, restarts) as ints.
  """
  return (check_int("n_target_classes", n_target_classes, minimum=1),
          check_int("steps", steps, minimum=1),
          check_int("restarts", restarts, minimum=1))


def check_bool(name: str, value: Any) -> bool:
  """``value`` as a bool; a non-bool (1, "yes") is a TypeError naming ``name``."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {type(value).__name__} "
                    f"{value!r}.")
  return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """Checks that ``value`` is one of the readable string ``choices``."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; "
                     f"got {value!r}.")
  return value


def check_clip_range(clip_min: Any, clip_max: Any) -> tuple[float, float]:
  """Checks that ``clip_min < clip_max`` are finite numbers."""
  lo = check_number("clip_min", clip_min)
  hi = check_number("clip_max", clip_max)
  if not lo < hi:
    raise ValueError(f"`clip_min` must be < `clip_max`; got clip_min={lo!r}, "
                     f"clip_max={hi!r}.")
  return lo, hi


def to_numpy(name: str, value: Any) -> np.ndarray:
  """Converts a numpy array, tensor or nested list to numpy."""
  if isinstance(value, (tf.Tensor, tf.Variable)):
    return value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"`{name}` must be an array or tensor; got "
                    f"{type(value).__name__}.") from e


def _typed_array(name: str, value: Any, kind: type, holds: str, ndim: int,
                 shape: str) -> np.ndarray:
  """``value`` as numpy, checked to have a dtype of ``kind`` and rank ``ndim``.

  The errors read "`name` must hold <holds>" and "`name` must <shape>".
  """
  arr = to_numpy(name, value)
  if not np.issubdtype(arr.dtype, kind):
    raise TypeError(f"`{name}` must hold {holds}; got dtype {arr.dtype}.")
  if arr.ndim != ndim:
    raise ValueError(f"`{name}` must {shape}; got shape {arr.shape}.")
  return arr


def check_images(x: Any, clip_min: float, clip_max: float,
                 name: str = "x") -> np.ndarray:
  """Checks rank 4, float dtype, finite values inside [clip_min, clip_max]."""
  arr = _typed_array(name, x, np.floating, "floating-point images (float32 NHWC)",
                     4, "be a rank-4 NHWC batch (N, H, W, C)")
  if arr.shape[0] == 0:
    raise ValueError(f"`{name}` must hold at least one image; got shape "
                     f"{arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"`{name}` must not contain NaN or inf; found "
                     f"{int(np.sum(~np.isfinite(arr)))} such values.")
  lo, hi = float(arr.min()), float(arr.max())
  if lo < clip_min or hi > clip_max:
    raise ValueError(
        f"`{name}` must lie in [clip_min, clip_max] = [{clip_min:g}, "
        f"{clip_max:g}]; got values in [{lo:g}, {hi:g}]. Scale the images or "
        f"pass matching `clip_min`/`clip_max`.")
  return arr


def check_labels(y: Any, num_examples: int, num_classes: int | None,
                 name: str = "y") -> np.ndarray:
  """Checks integer class ids of shape (N,) inside [0, num_classes)."""
  arr = _typed_array(name, y, np.integer, "integer class ids",
                     1, "have shape (N,) of class ids")
  if arr.shape[0] != num_examples:
    raise ValueError(f"`{name}` must have one label per image: expected "
                     f"{num_examples} labels to match `x`; got {arr.shape[0]}.")
  if num_classes is not None and arr.size and (
      arr.min() < 0 or arr.max() >= num_classes):
    raise ValueError(f"`{name}` must be class ids in [0, {num_classes}); got "
                     f"values in [{arr.min()}, {arr.max()}].")
  return arr.astype(np.int64)
