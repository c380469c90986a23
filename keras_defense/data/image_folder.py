"""Bring your own images: ``--dataset=folder:PATH`` through tfds' ``ImageFolder``.

The folder holds one subfolder per split and one per class below it::

  PATH/train/<class>/*.png|jpg|jpeg
  PATH/test/<class>/*.png|jpg|jpeg

tfds' ``ImageFolder`` builder lists and decodes the files (it shuffles each
split deterministically and sorts the class names). Before that, every file is
decoded once here: a corrupt or unreadable file is an error naming it, and the
shapes found decide the input shape. Images must all have one of the shapes the
C&W networks take (28x28x1 or 32x32x3) unless the caller asks for one with
``image_size``, in which case each image is converted (grey <-> RGB, alpha
dropped) and resized (bilinear, antialiased) to it. Nothing is written to disk,
so a failed scan leaves no partial dataset behind.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import pathlib
import re

from keras_defense.util.compat import tf
from keras_defense.data.sources import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what tfds' ImageFolder reads
SUPPORTED_SHAPES = ((28, 28, 1), (32, 32, 3))
_SLICE = re.compile(r"^(train|test)(?:\[(\d*):(\d*)\])?$")


def convert(image: tf.Tensor, label: tf.Tensor, *, shape: tuple[int, int, int]
            ) -> tuple[tf.Tensor, tf.Tensor]:
  """Converts a uint8 (H, W, C) image to uint8 ``shape``: channels, then size."""
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels != shape[2]:
    if shape[2] == 1:
      image = tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))),
                      tf.uint8)
    else:
      image = tf.image.grayscale_to_rgb(image)
  if tuple(image.shape[:2]) != tuple(shape[:2]):
    resized = tf.image.resize(tf.cast(image, tf.float32), shape[:2], antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return tf.ensure_shape(image, shape), label


def _shape_text(shape) -> str:
  return "x".join(str(int(d)) for d in shape)


class ImageFolderDataset:
  """A verified folder of images read by ``tfds.ImageFolder``.

  Args:
    root: the folder (``PATH`` of ``folder:PATH``).
    image_size: (H, W, C) to convert every image to, or None to require that
      all images already share one supported shape.

  Raises:
    DataError: missing folder or splits, fewer than two classes, an unreadable
      image (named), or mixed/unsupported shapes without ``image_size``.
  """

  def __init__(self, root: str, *, image_size: tuple[int, int, int] | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.root = pathlib.Path(root).expanduser().resolve()
    if not self.root.is_dir():
      raise DataError(f"folder dataset {str(root)!r} does not exist or is not a directory; "
                      f"expected PATH/train/<class>/*.png and PATH/test/<class>/*.png.")
    splits = sorted(p.name for p in self.root.iterdir() if p.is_dir())
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
      raise DataError(
          f"folder dataset {str(self.root)!r} has no {' or '.join(missing)} subfolder "
          f"(found: {', '.join(splits) or 'none'}); expected PATH/train/<class>/*.png "
          f"and PATH/test/<class>/*.png.")
    files, shapes, digest = self._scan(splits)
    classes = sorted({f.parent.name for f in files})
    if len(classes) < 2:
      raise DataError(f"folder dataset {str(self.root)!r} has {len(classes)} class "
                      f"folder(s) with images; expected at least 2 under train/ and test/.")
    found = sorted(shapes)
    if image_size is None:
      if len(found) != 1 or found[0] not in SUPPORTED_SHAPES:
        listing = ", ".join(f"{_shape_text(s)} ({shapes[s]} images)" for s in found)
        raise DataError(
            f"folder dataset {str(self.root)!r} has images of shape {listing}; "
            f"supported: {' or '.join(_shape_text(s) for s in SUPPORTED_SHAPES)} for "
            f"every image. Pass --image_size=28x28x1 or --image_size=32x32x3 to "
            f"convert and resize them.")
      image_size = found[0]
    self.shapes_found = tuple(found)  # as stored, before conversion
    self.image_shape = tuple(int(d) for d in image_size)
    self._needs_convert = found != [self.image_shape]
    # Decode with the target's channel count; sizes may vary until resized.
    self._builder = tfds.ImageFolder(str(self.root), shape=(None, None, self.image_shape[2]),
                                     dtype=tf.uint8)
    self.class_names = tuple(self._builder.info.features["label"].names)
    self.info = self._builder.info
    self.record = {
        "dataset": f"folder:{self.root}", "version": "folder",
        "sources": {f"{self.root} ({len(files)} image files)": digest},
        "splits": {s: {"num_examples": self.num_examples(s)} for s in ("train", "test")},
        "shapes_found": {_shape_text(s): n for s, n in shapes.items()},
        "content_check": (f"every one of the {len(files)} image files decoded"
                          + (f"; converted to {_shape_text(self.image_shape)}"
                             if self._needs_convert else "")),
    }

  def _scan(self, splits: list[str]):
    """Every image file decoded once: (files, shape -> count, folder digest)."""
    files = []
    for split in ("train", "test"):
      for p in sorted((self.root / split).rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
          files.append(p)
    del splits
    shapes: collections.Counter = collections.Counter()
    h = hashlib.sha256()
    for p in files:
      try:
        raw = p.read_bytes()
        shape = tuple(int(d) for d in tf.io.decode_image(
            raw, expand_animations=False).shape)
      except (OSError, tf.errors.OpError) as e:
        message = getattr(e, "message", None) or str(e)
        raise DataError(f"image file {str(p)!r} cannot be read or decoded "
                        f"({message.strip().splitlines()[0] if message else type(e).__name__}); "
                        f"fix or remove it.") from e
      shapes[shape[:2] + ({2: 1, 4: 3}.get(shape[2], shape[2]),)] += 1
      h.update(f"{p.relative_to(self.root)}\t{hashlib.sha256(raw).hexdigest()}\n".encode())
    if not files:
      raise DataError(f"folder dataset {str(self.root)!r} has no .png/.jpg/.jpeg files "
                      f"under train/<class>/ or test/<class>/.")
    return files, shapes, h.hexdigest()

  def num_examples(self, split: str) -> int:
    return int(self._builder.info.splits[split].num_examples)

  def examples(self, split: str) -> tf.data.Dataset:
    """(uint8 image, int64 label) of "train", "test", "train[:N]" or "train[N:]"."""
    m = _SLICE.match(split)
    if not m:
      raise DataError(f"folder datasets take the splits train/test; got {split!r}.")
    name, start, stop = m.group(1), m.group(2), m.group(3)
    ds = self._builder.as_dataset(split=name, as_supervised=True, shuffle_files=False)
    if start:
      ds = ds.skip(int(start))
    if stop:
      ds = ds.take(int(stop) - int(start or 0))
    if self._needs_convert:
      ds = ds.map(functools.partial(convert, shape=self.image_shape),
                  num_parallel_calls=tf.data.AUTOTUNE)
    else:
      ds = ds.map(lambda x, y: (tf.ensure_shape(x, self.image_shape), y))
    return ds
