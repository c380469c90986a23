"""A user's test set as arrays: ``--data=PATH.npz``.

The file is a NumPy ``.npz`` (``np.savez(path, x=..., y=...)``) holding:

* ``x``: images, NHWC, either uint8 in [0, 255] or float32 in [0, 1];
  C is 1 or 3.
* ``y``: integer class labels, one per image, in [0, K).
* ``class_names`` (optional): K strings; then K is their number, otherwise
  ``max(y) + 1``.

Loaded images are float32 in [0, 1] (uint8 divided by 255) and labels int64,
as ``datasets.load_arrays`` gives them. Every fault is a ``DataError`` naming
the file and the key. Nothing in the file is unpickled (``allow_pickle``
stays off).

Example:
  >>> np.savez("test.npz", x=x_uint8, y=labels)
  >>> arrays = load_npz("test.npz", limit=1000)
  >>> arrays.x.shape, arrays.num_classes
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from keras_defense.data import sources
from keras_defense.data.sources import DataError
from keras_defense.util.compat import tf


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """A test set loaded from arrays.

  Attributes:
    path: the file.
    x: float32 (N, H, W, C) in [0, 1].
    y: int64 (N,) in [0, num_classes).
    num_classes: K: the number of ``class_names``, or ``max(y) + 1`` (a lower
      bound) when the file has none.
    class_names: K names (or "0" .. "K-1" when the file has none).
    class_names_given: whether the file lists ``class_names``.
    sha256: the file's SHA-256.
    source_dtype: "uint8" or "float32", as stored.
  """
  path: str
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  sha256: str
  source_dtype: str
  class_names_given: bool = False

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]


def load_npz(path: str | os.PathLike, *, limit: int | None = None,
             image_size: tuple[int, int, int] | None = None) -> ArrayData:
  """Loads and checks ``x``/``y`` (and ``class_names``) from an ``.npz`` file.

  Args:
    path: the ``.npz`` file.
    limit: keep the first ``limit`` images (>= 1; at most N).
    image_size: (H, W, C) to convert and resize the images to (bilinear,
      antialiased; grey <-> RGB), or None to keep them as stored.

  Returns:
    An ``ArrayData``.

  Raises:
    DataError: a missing or unreadable file, a missing key, ``x`` not rank-4
      NHWC with 1 or 3 channels, not uint8 or float32, float values outside
      [0, 1] or not finite, ``y`` not integers of rank 1, a length mismatch,
      a label out of range, or ``limit`` larger than N.
  """
  p = pathlib.Path(path).expanduser()
  where = f"--data file {str(p)!r}"
  if not p.is_file():
    raise DataError(f"{where} does not exist or is not a file; expected a .npz with "
                    f"arrays x (NHWC images) and y (labels).")
  try:
    with np.load(p, allow_pickle=False) as z:
      keys = set(z.files)
      for key in ("x", "y"):
        if key not in keys:
          raise DataError(f"{where} has no array {key!r} (it has "
                          f"{', '.join(sorted(keys)) or 'none'}); expected x: NHWC images "
                          f"(uint8 0-255 or float32 0-1) and y: int labels.")
      x, y = z["x"], z["y"]
      names = z["class_names"] if "class_names" in keys else None
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{where} cannot be read as a NumPy .npz archive ({e}).") from e
  _check_images(where, x)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"{where}: y must be a 1-D array of integer labels; got "
                    f"{y.dtype.name} of shape {tuple(y.shape)}.")
  if len(y) != len(x):
    raise DataError(f"{where}: x has {len(x)} images but y has {len(y)} labels; they must "
                    f"be equal.")
  if names is not None:
    if names.ndim != 1 or names.dtype.kind not in "US" or not len(names):
      raise DataError(f"{where}: class_names must be a 1-D array of strings; got "
                      f"{names.dtype.name} of shape {tuple(names.shape)}.")
    class_names = tuple(str(n) for n in names)
    num_classes = len(class_names)
  else:
    num_classes = int(y.max()) + 1 if len(y) else 0
    class_names = tuple(str(k) for k in range(num_classes))
  bad = np.flatnonzero((y < 0) | (y >= num_classes))
  if len(bad):
    raise DataError(f"{where}: label y[{bad[0]}] = {int(y[bad[0]])} is out of range "
                    f"[0, {num_classes}) ({len(bad)} such labels"
                    + (f"; class_names lists {num_classes} classes)." if names is not None
                       else ")."))
  if limit is not None:
    if int(limit) < 1 or int(limit) > len(x):
      raise DataError(f"`n_examples` must be in [1, {len(x)}] for {where} (its "
                      f"{len(x)} images); got {limit}.")
    x, y = x[:int(limit)], y[:int(limit)]
  source_dtype = x.dtype.name
  images = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  if image_size is not None and tuple(images.shape[1:]) != tuple(image_size):
    images = resize(images, image_size)
  return ArrayData(path=str(p), x=images, y=y.astype(np.int64), num_classes=num_classes,
                   class_names=class_names, sha256=sources.sha256(p),
                   source_dtype=source_dtype, class_names_given=names is not None)


def _check_images(where: str, x: np.ndarray) -> None:
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise DataError(f"{where}: x must be NHWC images of rank 4 with 1 or 3 channels; got "
                    f"shape {tuple(x.shape)}.")
  if not len(x):
    raise DataError(f"{where}: x holds no images.")
  if x.dtype == np.uint8:
    return
  if x.dtype != np.float32:
    raise DataError(f"{where}: x must be uint8 (0-255) or float32 (0-1); got "
                    f"{x.dtype.name}. Fix: x.astype(np.uint8) or (x / 255).astype(np.float32).")
  if not np.all(np.isfinite(x)):
    raise DataError(f"{where}: x holds NaN or inf.")
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    raise DataError(f"{where}: float32 x must lie in [0, 1]; its values span "
                    f"[{lo:g}, {hi:g}]. Fix: divide 0-255 pixels by 255 (or store uint8).")


def resize(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """float32 (N, H, W, C) in [0, 1] -> float32 (N, *shape): channels, then size."""
  t = tf.convert_to_tensor(x, tf.float32)
  if t.shape[-1] != shape[2]:
    t = tf.image.rgb_to_grayscale(t) if shape[2] == 1 else tf.image.grayscale_to_rgb(t)
  if tuple(t.shape[1:3]) != tuple(shape[:2]):
    t = tf.image.resize(t, shape[:2], antialias=True)
  return tf.clip_by_value(t, 0.0, 1.0).numpy().astype(np.float32)
