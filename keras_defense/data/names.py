"""Dataset names: ``NAME``, ``folder:PATH``, ``NAME@HxWxC``, and their file-safe slugs.

A name says which data a run uses everywhere (training, attacks, reports, paths):
a tfds dataset (``mnist``, ``emnist/digits``), a folder of images
(``folder:PATH``), optionally with ``@HxWxC`` to resize/convert the images
(``--image_size``). ``slug`` turns a name into the piece of a model or run path.
"""

from __future__ import annotations

import pathlib

from keras_defense.data.sources import DataError

FOLDER_PREFIX = "folder:"
# The input shapes of the two C&W networks (models.model_for_shape).
SUPPORTED_SHAPES = ((28, 28, 1), (32, 32, 3))


def parse_image_size(text: str | None) -> tuple[int, int, int] | None:
  """"28x28x1" -> (28, 28, 1); "64x64x3" -> (64, 64, 3); None -> None.

  Any height and width >= 1 and 1 or 3 channels: evaluation resizes to the
  model's shape; training a C&W network needs one of ``SUPPORTED_SHAPES``
  (``models.model_for_shape`` and the training flags check that).

  Raises:
    DataError: not HxWxC with H, W >= 1 and C in (1, 3).
  """
  if text is None or text == "":
    return None
  try:
    shape = tuple(int(t) for t in str(text).lower().split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape[:2]) < 1 or shape[2] not in (1, 3):
    raise DataError(f"`image_size` must be HxWxC with H, W >= 1 and C 1 or 3 (e.g. "
                    f"{', '.join(shape_text(s) for s in SUPPORTED_SHAPES)} or 64x64x3); "
                    f"got {text!r}.")
  return shape


def shape_text(shape) -> str:
  return "x".join(str(int(d)) for d in shape)


def with_image_size(name: str, image_size: str | None) -> str:
  """The dataset name that asks for ``image_size``: ``name@HxWxC`` (unchanged for None)."""
  shape = parse_image_size(image_size)
  base, _ = split_name(name)
  return base if shape is None else f"{base}@{shape_text(shape)}"


def split_name(name: str) -> tuple[str, tuple[int, int, int] | None]:
  """``"folder:/d@28x28x1"`` -> (``"folder:/d"``, (28, 28, 1))."""
  if not isinstance(name, str) or not name.strip():
    raise DataError(f"`dataset` must be a tfds dataset name or folder:PATH; got {name!r}.")
  base, sep, size = name.rpartition("@")
  if not sep:
    return name, None
  return base, parse_image_size(size)


def slug(name: str) -> str:
  """A file-name-safe form of a dataset name, for model and run paths.

  ``mnist`` -> ``mnist``; ``emnist/digits`` -> ``emnist_digits``;
  ``folder:/data/pets@32x32x3`` -> ``folder_pets_32x32x3``.
  """
  base, shape = split_name(name)
  if base.startswith(FOLDER_PREFIX):
    base = "folder_" + pathlib.Path(base[len(FOLDER_PREFIX):]).expanduser().resolve().name
  out = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
  return out if shape is None else f"{out}_{shape_text(shape)}"
