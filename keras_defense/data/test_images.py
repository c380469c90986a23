"""Test images for kd-evaluate and kd-certify: a tfds dataset, ``folder:PATH`` or ``npz:PATH``.

``kd-evaluate`` and ``kd-certify`` take their test images from ``--dataset`` (any tfds
image-classification dataset or ``folder:PATH``, their test split) or from
``--data=PATH.npz`` (``data.arrays``: the user's own arrays), which reaches
the library as the dataset name ``npz:PATH``. Either may end in ``@HxWxC``
(``--image_size``) to convert and resize the images to any shape.

The images must match the model's input: without ``@HxWxC`` a dataset whose
images have another shape than the model takes is an error that names both
and the ``--image_size`` that would resize them; resizing is never silent.
The model's output width must equal the dataset's class count
(``classifier.detect_output`` checks it on real images).

Example:
  >>> images = load_test_images("npz:test.npz", n_examples=100, model_shape=(None, 64, 64, 3))
  >>> images.x.shape, images.num_classes
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from keras_defense.data import datasets
from keras_defense.data import names
from keras_defense.data import arrays
from keras_defense.util.errors import UserError

NPZ_PREFIX = "npz:"


@dataclasses.dataclass(frozen=True)
class TestImages:
  """The first n test images of a dataset, in memory.

  Attributes:
    name: the dataset name as given (``mnist``, ``folder:...``, ``npz:...``).
    x: float32 (N, H, W, C) in [0, 1].
    y: int64 (N,).
    num_classes: the dataset's class count; None for a ``.npz`` without
      ``class_names`` (``resolve_num_classes`` takes the model's output width).
    image_shape: (H, W, C).
    identity: facts that bind a run directory besides the config (the
      ``.npz`` file's SHA-256); empty for tfds and folders, whose sources
      ``data`` verifies itself.
  """
  __test__ = False  # not a pytest class
  name: str
  x: np.ndarray
  y: np.ndarray
  num_classes: int | None
  image_shape: tuple[int, int, int]
  identity: dict


def _text(shape: Sequence[Any]) -> str:
  return "x".join("?" if d is None else str(int(d)) for d in shape)


def _model_image_shape(model_shape: Sequence[Any] | None) -> tuple[int, int, int] | None:
  """(H, W, C) of a (batch, H, W, C) input spec if all three are known, else None."""
  if model_shape is None or len(model_shape) != 4 or any(d is None for d in model_shape[1:]):
    return None
  return tuple(int(d) for d in model_shape[1:])  # type: ignore[return-value]


def _mismatch(name: str, found: Sequence[Sequence[Any]], want: tuple[int, int, int]) -> UserError:
  shapes = ", ".join(_text(s) for s in found)
  return UserError(f"dataset {name!r} has images of shape {shapes}; the model takes "
                   f"{_text(want)}. Fix: pass --image_size={_text(want)} to convert and "
                   f"resize them (or evaluate on data of the model's shape).")


def load_test_images(name: str, *, n_examples: int, model_shape: Sequence[Any] | None,
                     data_dir: str | None = None,
                     manual_dir: str | None = None) -> TestImages:
  """Loads the first ``n_examples`` test images of ``name`` for a model.

  Args:
    name: a tfds dataset, ``folder:PATH`` or ``npz:PATH``, optionally ``@HxWxC``.
    n_examples: how many (the first ones), >= 1.
    model_shape: the model's input shape (batch, H, W, C), None for unknown
      dimensions: without ``@HxWxC`` the images must have its (H, W, C).
    data_dir, manual_dir: see ``data.prepare``.

  Returns:
    ``TestImages``.

  Raises:
    UserError: the data cannot be loaded (``data.DataError``), its images do
      not match the model's shape and no ``@HxWxC`` was asked for, or
      ``n_examples`` exceeds the test split.
  """
  base, size = names.split_name(name)
  want = _model_image_shape(model_shape)
  if base.startswith(NPZ_PREFIX):
    loaded = arrays.load_npz(base[len(NPZ_PREFIX):], limit=n_examples, image_size=size)
    if size is None and want is not None and loaded.image_shape != want:
      raise _mismatch(name, [loaded.image_shape], want)
    return TestImages(name=name, x=loaded.x, y=loaded.y,
                      num_classes=loaded.num_classes if loaded.class_names_given else None,
                      image_shape=loaded.image_shape,
                      identity={"data_sha256": loaded.sha256})
  opened = name
  if size is None and want is not None and want not in names.SUPPORTED_SHAPES:
    # Opened at the model's shape (data refuses other shapes than the C&W
    # ones without one), then held to it: the images as stored must match.
    opened = f"{base}@{_text(want)}"
    found = datasets.source_image_shapes(opened, data_dir=data_dir, manual_dir=manual_dir)
    if list(found) != [want]:
      raise _mismatch(name, found, want)
  facts = datasets.info(opened, data_dir=data_dir, manual_dir=manual_dir)
  if n_examples > facts.num_test:
    raise UserError(f"`n_examples` must be at most the {facts.num_test} test images of "
                    f"{name}; got {n_examples}.")
  x, y = datasets.load_arrays(opened, "test", limit=n_examples, data_dir=data_dir,
                          manual_dir=manual_dir)
  return TestImages(name=name, x=x, y=y, num_classes=facts.num_classes,
                    image_shape=tuple(facts.image_shape), identity={})


def resolve_num_classes(images: TestImages, scores: Callable[[np.ndarray], Any]) -> int:
  """The class count the model's output must have.

  The dataset's, or, for arrays without ``class_names``, the model's own
  output width, provided every label is below it (a test set need not hold
  an image of every class, so ``max(y) + 1`` is only a lower bound).

  Args:
    images: the test images.
    scores: the model's raw output on [0, 1] images, (N, K).

  Raises:
    UserError: a label is not below the model's output width.
  """
  if images.num_classes is not None:
    return images.num_classes
  width = int(np.shape(scores(images.x[:1]))[-1])
  top = int(images.y.max())
  if top >= width:
    raise UserError(f"dataset {images.name!r} has label {top}, but the model outputs {width} "
                    f"class scores (labels 0..{width - 1}); the labels must index the "
                    f"model's classes.")
  return width
