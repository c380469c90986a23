"""The pixel convention a model takes, and the map from [0, 1] pixels to it.

Attacks always work on images in [0, 1] with ε in those units (RobustBench's
convention). A model trained on other inputs is evaluated through
``PixelConvention.to_model``, applied *inside* the function the attacks
differentiate (``Classifier.scores``), so gradients and the ε-ball stay exact:

    model_input = (x * top - mean) / std        x in [0, 1], top = 1 or 255

``mean`` and ``std`` are per channel (or one value for all) in the units of
``input_range``. Common cases:

* a model with ``Rescaling(1/255)`` inside: ``input_range=(0, 255)``;
* Keras applications' ``preprocess_input`` of "tf" mode (MobileNetV2, inputs
  in [-1, 1]): ``mean=(0.5,)``, ``std=(0.5,)``;
* torchvision's ImageNet normalization: ``mean=(0.485, 0.456, 0.406)``,
  ``std=(0.229, 0.224, 0.225)``;
* "caffe" mode (BGR order aside): ``input_range=(0, 255)``,
  ``mean=(123.68, 116.78, 103.94)``, ``std=(1,)``.

Example:
  >>> conv = PixelConvention(mean=(0.5,), std=(0.5,)).validate(channels=3)
  >>> conv.to_model(tf.ones([1, 2, 2, 3]))  # all 1.0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

INPUT_RANGES = ((0.0, 1.0), (0.0, 255.0))


def parse_range(text: str | Sequence[float]) -> tuple[float, float]:
  """"0,255" (or (0, 255)) -> (0.0, 255.0).

  Raises:
    UserError: not one of ``INPUT_RANGES``.
  """
  try:
    parts = text.split(",") if isinstance(text, str) else list(text)
    value = tuple(float(p) for p in parts)
  except (TypeError, ValueError):
    value = ()
  if value not in INPUT_RANGES:
    raise UserError(f"`input_range` must be 0,1 or 0,255; got {text!r}.")
  return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class PixelConvention:
  """How the model wants its pixels; see the module docstring.

  Attributes:
    input_range: (0, 1) or (0, 255): the range of the model's raw pixels.
    mean: per channel (or one value), in ``input_range`` units; None: 0.
    std: per channel (or one value), > 0; None: 1.
  """
  input_range: tuple[float, float] = (0.0, 1.0)
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @property
  def is_identity(self) -> bool:
    return self.input_range == (0.0, 1.0) and self.mean is None and self.std is None

  def validate(self, *, channels: int | None = None) -> "PixelConvention":
    """Checks the fields (and their lengths against ``channels``); returns self.

    Raises:
      UserError: a bad range, a non-finite mean, a std <= 0, or a list whose
        length is neither 1 nor the image's channel count.
    """
    parse_range(self.input_range)
    for name in ("mean", "std"):
      values = getattr(self, name)
      if values is None:
        continue
      if not values or not all(isinstance(v, (int, float)) and math.isfinite(v)
                               for v in values):
        raise UserError(f"`{name}` must list finite numbers, one per channel or one for "
                        f"all; got {list(values)!r}.")
      if name == "std" and any(v <= 0 for v in values):
        raise UserError(f"`std` must be > 0 for every channel; got {list(values)!r}.")
      if channels is not None and len(values) not in (1, channels):
        raise UserError(f"`{name}` has {len(values)} values; the images have {channels} "
                        f"channel(s): pass 1 value or {channels}.")
    return self

  def to_model(self, x: Any) -> tf.Tensor:
    """[0, 1] pixels, float32 (N, H, W, C) -> the model's input convention."""
    x = tf.convert_to_tensor(x, tf.float32)
    if self.is_identity:
      return x
    top = self.input_range[1]
    if top != 1.0:
      x = x * top
    if self.mean is not None:
      x = x - tf.constant(self.mean, tf.float32)
    if self.std is not None:
      x = x / tf.constant(self.std, tf.float32)
    return x

  def scale_shift(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, shift), one value or one per channel: ``to_model(x) == x * scale + shift``.

    The map is elementwise and increasing (std > 0), so it takes the box
    [lo, hi] of [0, 1] pixels exactly onto [to_model(lo), to_model(hi)]:
    the certification bounds read it as the network's first layer.
    """
    top = self.input_range[1]
    mean = self.mean if self.mean is not None else (0.0,)
    std = self.std if self.std is not None else (1.0,)
    if len(mean) == 1 and len(std) > 1:
      mean = mean * len(std)
    if len(std) == 1 and len(mean) > 1:
      std = std * len(mean)
    return (tuple(top / s for s in std), tuple(-m / s for m, s in zip(mean, std)))

  def to_dict(self) -> dict[str, Any]:
    """JSON form: {"input_range": [0, 255], "mean": [...] or None, "std": ...}."""
    return {"input_range": list(self.input_range),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std)}

  def describe(self) -> str:
    """E.g. "pixels 0..255, mean [0.5], std [0.5]" ("[0, 1] pixels" for identity)."""
    if self.is_identity:
      return "[0, 1] pixels"
    text = f"pixels {self.input_range[0]:g}..{self.input_range[1]:g}"
    if self.mean is not None:
      text += f", mean {list(self.mean)}"
    if self.std is not None:
      text += f", std {list(self.std)}"
    return text


def from_fields(input_range: str | Sequence[float], mean: Sequence[float] | None,
                std: Sequence[float] | None) -> "PixelConvention":
  """The convention of a config's ``input_range``, ``mean`` and ``std`` fields (the flags')."""
  return PixelConvention(
      input_range=parse_range(input_range),
      mean=None if mean is None else tuple(float(v) for v in mean),
      std=None if std is None else tuple(float(v) for v in std))


@dataclasses.dataclass(kw_only=True)
class PixelFields:
  """A config's pixel-convention fields (the flags' names) and its ``pixels()``.

  The configs of kd-evaluate and kd-certify inherit it; keyword-only, so
  their own positional fields keep their order.

  Attributes:
    input_range: the range the model's input takes, e.g. (0, 255).
    mean, std: per-channel normalization after the range, or None.
  """
  input_range: tuple[float, float] = (0.0, 1.0)
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def pixels(self) -> PixelConvention:
    """The model's pixel convention from ``input_range``, ``mean`` and ``std``."""
    return from_fields(self.input_range, self.mean, self.std)
