"""Image-classification data from tensorflow-datasets, offline where possible.

Any tfds image-classification dataset with uint8 images of shape 28x28x1 or
32x32x3 and a ``label`` feature loads by name as batched ``tf.data`` pipelines
of float32 NHWC images in [0, 1] and int64 labels; so does a folder of images,
``folder:PATH`` (``PATH/train/<class>/*.png|jpg``, ``PATH/test/<class>/...``,
read by tfds' own ``ImageFolder``, see ``image_folder``). A name may end in
``@HxWxC`` (any size, C 1 or 3) to resize/convert the images to that shape
(``--image_size``); without it another shape than the two C&W shapes is a
clear error (``source_image_shapes`` tells what the images are).

MNIST works with no network: the package carries the four official MNIST
files (byte-identical, checked against their SHA-256 before tfds sees them)
and builds the tfds dataset from them through tfds's ``manual_dir``. For any
other dataset pass ``manual_dir`` (for CIFAR-10: the directory holding the
official ``cifar-10-binary.tar.gz``) or let tfds download it.

Never the wrong data: every dataset is built with a download/extract folder
private to its name and version, and what tfds built is checked against its
source files before use (``data_sources.verify``; the record names every
source file's SHA-256 and each split's content digest).

Splits: ``train`` is the training split minus the last ``validation_size``
examples, which form ``validation`` (C&W hold out 5,000; by default
``min(5000, n_train // 10)``); ``test`` is the test split.

Example:
  >>> ds = load_split("mnist", "test", batch_size=128)
  >>> x, y = load_arrays("mnist", "test", limit=1000)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import numpy as np

from keras_defense.data import sources as data_sources
from keras_defense.data.names import FOLDER_PREFIX
from keras_defense.data.names import parse_image_size
from keras_defense.data.names import shape_text as _shape_text
from keras_defense.data.names import slug
from keras_defense.data.names import split_name
from keras_defense.data.names import SUPPORTED_SHAPES
from keras_defense.data.names import with_image_size
from keras_defense.util.compat import tf
from keras_defense.data.sources import DataError  # noqa: F401  (public: data.DataError)

SPLITS = ("train", "validation", "test")
DEFAULT_VALIDATION_SIZE = 5000
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent.parent / "data_files"

# The official MNIST files (what tfds's `mnist` builder checks), as carried in
# keras_defense/data_files/mnist/SHA256SUMS.
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about a dataset that models, attacks and reports need."""
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_validation: int
  num_test: int
  class_names: tuple[str, ...] = ()
  version: str = ""
  sources: dict = dataclasses.field(default_factory=dict)  # source file -> sha256
  content_check: str = ""  # "passed", or why it was not possible

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["image_shape"] = list(self.image_shape)
    d["class_names"] = list(self.class_names)
    return d


def default_data_dir() -> str:
  """Where tfds stores prepared datasets (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets)."""
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _read_sums(path: pathlib.Path) -> dict[str, str]:
  sums = {}
  for line in path.read_text().splitlines():
    if line.strip():
      digest, name = line.split()
      sums[name] = digest
  return sums


def verify_mnist_files(directory: str | os.PathLike) -> pathlib.Path:
  """Checks that ``directory`` holds the four official MNIST files.

  Args:
    directory: a folder with the four ``*-idx*-ubyte.gz`` files.

  Returns:
    The folder as a resolved path.

  Raises:
    DataError: the folder or a file is missing, or a file's SHA-256 differs from
      the official one (truncated or corrupted download).
  """
  d = pathlib.Path(directory).expanduser()
  expected = _read_sums(SHIPPED_DIR / "mnist" / "SHA256SUMS")
  if not d.is_dir():
    raise DataError(
        f"MNIST folder {str(d)!r} does not exist or is not a directory; expected "
        f"a folder holding {', '.join(MNIST_FILES)}.")
  missing = [n for n in MNIST_FILES if not (d / n).is_file()]
  if missing:
    raise DataError(
        f"MNIST folder {str(d)!r} lacks {', '.join(missing)}; put the official "
        f"files there (the package carries them in {SHIPPED_DIR / 'mnist'}).")
  for n in MNIST_FILES:
    got = data_sources.sha256(d / n)
    if got != expected[n]:
      raise DataError(
          f"MNIST file {str(d / n)!r} has SHA-256 {got}, expected {expected[n]} "
          f"(truncated or corrupted); replace it with the official file.")
  return d.resolve()


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir or default_data_dir())
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
        f"`dataset` {name!r} is not a tensorflow-datasets dataset "
        f"(e.g. mnist, fashion_mnist, cifar10) nor folder:PATH.") from e


def check_image_features(name: str, features: Any, *, resize: bool) -> None:
  """Raises DataError unless ``features`` has a uint8 ``image`` and a ClassLabel ``label``.

  Args:
    name: the dataset, for the message.
    features: a tfds ``FeaturesDict``.
    resize: the user asked for an ``image_size``, so any image shape is fine.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  keys = list(features.keys()) if hasattr(features, "keys") else []
  expected = (f"a uint8 'image' feature of shape "
              f"{' or '.join(_shape_text(s) for s in SUPPORTED_SHAPES)} and an integer "
              f"class 'label' feature")
  image, label = (features[k] if k in keys else None for k in ("image", "label"))
  if not isinstance(image, tfds.features.Image) or not isinstance(
      label, tfds.features.ClassLabel):
    raise DataError(f"dataset {name!r} is not supported: expected {expected}; it has "
                    f"features {', '.join(keys) or 'none'}.")
  if np.dtype(image.np_dtype) != np.uint8:
    raise DataError(f"dataset {name!r} is not supported: expected {expected}; its "
                    f"images are {np.dtype(image.np_dtype).name}.")
  if not resize and tuple(image.shape) not in SUPPORTED_SHAPES:
    raise DataError(
        f"dataset {name!r} is not supported as is: its images are "
        f"{_shape_text(d or 0 for d in image.shape)} (0 = variable), expected "
        f"{' or '.join(_shape_text(s) for s in SUPPORTED_SHAPES)}; pass "
        f"--image_size=28x28x1 or --image_size=32x32x3 to resize them.")


def prepare(name: str, *, data_dir: str | None = None,
            manual_dir: str | None = None):
  """Makes sure tfds has ``name`` prepared and verified, building it offline if it can.

  MNIST is built from the shipped files (or ``manual_dir``) with no network.
  Other datasets are built from ``manual_dir`` if given, else downloaded. Each
  build uses a download/extract folder of its own
  (``data_sources.private_download_dir``), and the result is checked against
  the source files (``data_sources.verify``) before it is returned.

  Args:
    name: a tfds dataset name, ``folder:PATH``, either optionally ``@HxWxC``.
    data_dir: tfds data directory (default ``default_data_dir()``).
    manual_dir: folder holding the dataset's official files.

  Returns:
    The prepared tfds builder (an ``ImageFolder`` builder for ``folder:``).

  Raises:
    DataError: unknown or unsupported dataset, missing/corrupt files, a failed
      download, or built data that differs from its source files.
  """
  return _open(name, data_dir, manual_dir).builder


@dataclasses.dataclass(frozen=True)
class _Opened:
  """A prepared, verified dataset and how to read its examples as uint8 + int64."""
  name: str
  builder: Any
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  num_train: int
  num_test: int
  record: dict

  def examples(self, split: str) -> tf.data.Dataset:
    """(uint8 image of ``image_shape``, int64 label) pairs of a tfds split string."""
    from keras_defense.data import image_folder  # pylint: disable=g-import-not-at-top
    if isinstance(self.builder, image_folder.ImageFolderDataset):
      return self.builder.examples(split)
    ds = self.builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    feature_shape = tuple(self.builder.info.features["image"].shape)
    if feature_shape != self.image_shape:
      ds = ds.map(functools.partial(image_folder.convert, shape=self.image_shape),
                  num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def _open(name: str, data_dir: str | None, manual_dir: str | None) -> _Opened:
  return _open_cached(name, data_dir or default_data_dir(), manual_dir)


@functools.lru_cache(maxsize=32)
def _open_cached(name: str, data_dir: str, manual_dir: str | None) -> _Opened:
  base, shape = split_name(name)
  if base.startswith(FOLDER_PREFIX):
    from keras_defense.data import image_folder  # pylint: disable=g-import-not-at-top
    folder = image_folder.ImageFolderDataset(base[len(FOLDER_PREFIX):], image_size=shape)
    return _Opened(name=name, builder=folder, image_shape=folder.image_shape,
                   class_names=folder.class_names, num_train=folder.num_examples("train"),
                   num_test=folder.num_examples("test"), record=folder.record)
  builder = _builder(base, data_dir)
  check_image_features(base, builder.info.features, resize=shape is not None)
  folders = []
  if base == "mnist":
    manual_dir = str(verify_mnist_files(manual_dir or SHIPPED_DIR / "mnist"))
  elif manual_dir is not None and not pathlib.Path(manual_dir).is_dir():
    raise DataError(
        f"`manual_dir` {manual_dir!r} does not exist or is not a directory.")
  private = data_sources.private_download_dir(data_dir, builder.info.full_name)
  if manual_dir is not None:
    folders.append(pathlib.Path(manual_dir))
  folders.append(private)
  record = data_sources.load_record(builder, data_dir) if builder.is_prepared() else None
  if record is None:
    if not builder.is_prepared():
      _build(builder, base, private, manual_dir)
    record = data_sources.verify(builder, data_dir, folders)
  splits = builder.info.splits
  for split in ("train", "test"):
    if split not in splits:
      raise DataError(f"dataset {base!r} is not supported: it has no {split!r} split "
                      f"(splits: {', '.join(splits.keys())}).")
  return _Opened(
      name=name, builder=builder,
      image_shape=shape or tuple(int(d) for d in builder.info.features["image"].shape),
      class_names=tuple(builder.info.features["label"].names),
      num_train=splits["train"].num_examples, num_test=splits["test"].num_examples,
      record=record)


def _build(builder, name: str, private: pathlib.Path, manual_dir: str | None) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # A download/extract folder of this dataset version alone: tfds keys cached
  # extractions by the file's base name, so datasets whose official files share
  # names would otherwise get each other's data.
  config = tfds.download.DownloadConfig(manual_dir=manual_dir,
                                        extract_dir=str(private / "extracted"))
  # tfds writes into a temporary folder and renames on success, so an
  # interrupted build leaves nothing half-written behind.
  try:
    builder.download_and_prepare(download_dir=str(private), download_config=config)
  except Exception as e:  # tfds raises many types for missing data / no network
    hint = (f"put the official files for {name!r} in a folder and pass it as "
            f"`manual_dir` (for cifar10: cifar-10-binary.tar.gz from the "
            f"CIFAR-10 page), or run where tfds can download them")
    raise DataError(f"could not prepare dataset {name!r}: {e}\nFix: {hint}.") from e


def resolve_validation_size(validation_size: int | None, n_train: int) -> int:
  """``validation_size``, or by default ``min(5000, n_train // 10)`` (5000 for MNIST)."""
  if validation_size is None:
    return min(DEFAULT_VALIDATION_SIZE, n_train // 10)
  _check_validation_size(validation_size, n_train)
  return int(validation_size)


def info(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
         validation_size: int | None = None) -> DatasetInfo:
  """Returns the image shape, classes, split sizes and source digests of a dataset.

  Raises:
    DataError: as ``prepare``, or a bad ``validation_size``.
  """
  opened = _open(name, data_dir, manual_dir)
  n_val = resolve_validation_size(validation_size, opened.num_train)
  return DatasetInfo(
      name=name, image_shape=opened.image_shape, num_classes=len(opened.class_names),
      num_train=opened.num_train - n_val, num_validation=n_val, num_test=opened.num_test,
      class_names=opened.class_names, version=str(opened.record.get("version", "")),
      sources=dict(opened.record.get("sources", {})),
      content_check=str(opened.record.get("content_check", "")))


def source_image_shapes(name: str, *, data_dir: str | None = None,
                        manual_dir: str | None = None) -> tuple[tuple, ...]:
  """The shapes of a dataset's images as stored, before any ``@HxWxC`` conversion.

  One shape for a tfds dataset (None for a variable dimension), every shape
  found for a folder.

  Raises:
    DataError: as ``prepare``.
  """
  opened = _open(name, data_dir, manual_dir)
  shapes = getattr(opened.builder, "shapes_found", None)
  if shapes is not None:
    return tuple(shapes)
  return (tuple(opened.builder.info.features["image"].shape),)


def _check_validation_size(validation_size: int, n_train: int) -> None:
  if not 0 <= validation_size < n_train:
    raise DataError(
        f"`validation_size` must be in [0, {n_train}); got {validation_size}.")


def _tfds_split(split: str, validation_size: int | None, n_train: int) -> str:
  if split not in SPLITS:
    raise DataError(f"`split` must be one of {', '.join(SPLITS)}; got {split!r}.")
  cut = n_train - resolve_validation_size(validation_size, n_train)
  if split == "train":
    return f"train[:{cut}]"
  if split == "validation":
    return f"train[{cut}:]"
  return "test"


def _to_float(image, label):
  return tf.cast(image, tf.float32) / 255.0, label


def _cached_split(name: str, split: str, *, batch_size: int, limit: int | None,
                  data_dir: str | None, manual_dir: str | None,
                  validation_size: int | None) -> tf.data.Dataset:
  """The split's (uint8 image, label) examples, first ``limit`` only, cached."""
  if int(batch_size) < 1:
    raise DataError(f"`batch_size` must be >= 1; got {batch_size}.")
  if limit is not None and int(limit) < 1:
    raise DataError(f"`limit` must be >= 1 or None; got {limit}.")
  if split not in SPLITS:
    raise DataError(f"`split` must be one of {', '.join(SPLITS)}; got {split!r}.")
  opened = _open(name, data_dir, manual_dir)
  ds = opened.examples(_tfds_split(split, validation_size, opened.num_train))
  if limit is not None:
    ds = ds.take(int(limit))
  return ds.cache()


def load_split(name: str, split: str, *, batch_size: int = 128,
               shuffle: bool = False, seed: int = 0, limit: int | None = None,
               data_dir: str | None = None, manual_dir: str | None = None,
               validation_size: int | None = None,
               repeat: bool = False) -> tf.data.Dataset:
  """Loads one split as batches of (float32 [B,H,W,C] in [0,1], int64 [B]).

  Args:
    name: tfds dataset name ("mnist", "cifar10", "fashion_mnist", ...).
    split: "train", "validation" or "test".
    batch_size: examples per batch (>= 1).
    shuffle: reshuffle every epoch, deterministically from ``seed``.
    seed: shuffle seed.
    limit: keep only the first ``limit`` examples (before shuffling).
    data_dir, manual_dir: see ``prepare``.
    validation_size: training examples held out as ``validation``.
    repeat: repeat forever.

  Returns:
    A ``tf.data.Dataset``.

  Raises:
    DataError: bad split, batch size or limit, or the data cannot be prepared.
  """
  ds = _cached_split(name, split, batch_size=batch_size, limit=limit, data_dir=data_dir,
                     manual_dir=manual_dir, validation_size=validation_size)
  if shuffle:
    ds = ds.shuffle(10000, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(int(batch_size)).map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def load_epochs(name: str, split: str, *, batch_size: int, seed: int, epochs: int,
                first_epoch: int = 0, limit: int | None = None,
                data_dir: str | None = None, manual_dir: str | None = None,
                validation_size: int | None = None
                ) -> tuple[tf.data.Dataset, int]:
  """Epochs ``first_epoch .. epochs-1`` back to back, each shuffled by (seed, epoch) only.

  Epoch ``e`` is the split shuffled with a seed that is a pure function of
  ``seed`` and ``e``, cut into batches (the last one may be smaller), so a run
  resumed at epoch ``e`` after a crash sees exactly the batches an
  uninterrupted run would have seen. Pass ``steps_per_epoch`` (returned) to
  ``Model.fit``.

  Args:
    name, split, batch_size, limit, data_dir, manual_dir, validation_size: as
      ``load_split``.
    seed: shuffle seed.
    epochs: one past the last epoch (the ``epochs`` given to ``fit``).
    first_epoch: the epoch the stream starts with, in [0, epochs].

  Returns:
    (dataset of (float32 images, int64 labels) batches, steps per epoch).

  Raises:
    DataError: as ``load_split``, or ``first_epoch`` outside [0, epochs].
  """
  if not 0 <= int(first_epoch) <= int(epochs):
    raise DataError(f"`first_epoch` must be in [0, {epochs}]; got {first_epoch}.")
  ds = _cached_split(name, split, batch_size=batch_size, limit=limit, data_dir=data_dir,
                     manual_dir=manual_dir, validation_size=validation_size)
  n = int(ds.reduce(0, lambda count, _: count + 1))
  buffer = min(n, 60000)

  def epoch(e: int) -> tf.data.Dataset:
    epoch_seed = (int(seed) * 1_000_003 + e) % (2**31 - 1)
    return ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False).batch(
        int(batch_size))

  stream = None
  for e in range(int(first_epoch), int(epochs)):
    stream = epoch(e) if stream is None else stream.concatenate(epoch(e))
  if stream is None:  # nothing left to train: an empty stream of the right type
    stream = ds.take(0).batch(int(batch_size))
  stream = stream.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
  return stream.prefetch(tf.data.AUTOTUNE), -(-n // int(batch_size))


def load_arrays(name: str, split: str, *, limit: int | None = None,
                data_dir: str | None = None, manual_dir: str | None = None,
                validation_size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split into memory: float32 images in [0, 1] and int64 labels."""
  ds = load_split(name, split, batch_size=1024, limit=limit, data_dir=data_dir,
                  manual_dir=manual_dir, validation_size=validation_size)
  xs, ys = [], []
  for x, y in ds.as_numpy_iterator():
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys).astype(np.int64)
