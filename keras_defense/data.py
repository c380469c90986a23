"""Image-classification data from tensorflow-datasets, offline where possible.

Any tfds image-classification dataset loads by name as batched ``tf.data``
pipelines of float32 NHWC images in [0, 1] and int64 labels. MNIST works with no
network: the package carries the four official MNIST files (byte-identical,
checked against their SHA-256 before tfds sees them) and builds the tfds
dataset from them through tfds's ``manual_dir``. For any other dataset pass
``manual_dir`` (for CIFAR-10: the directory holding the official
``cifar-10-binary.tar.gz``) or let tfds download it.

Splits: ``train`` is the training split minus the last ``validation_size``
examples, which form ``validation`` (C&W hold out 5,000); ``test`` is the test
split.

Example:
  >>> ds = load_split("mnist", "test", batch_size=128)
  >>> x, y = load_arrays("mnist", "test", limit=1000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile

import numpy as np

from keras_defense.compat import tf
from keras_defense.errors import UserError

SPLITS = ("train", "validation", "test")
DEFAULT_VALIDATION_SIZE = 5000
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent / "data_files"

# The official MNIST files (what tfds's `mnist` builder checks), as carried in
# keras_defense/data_files/mnist/SHA256SUMS.
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class DataError(UserError):
  """A dataset cannot be found, verified or built; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about a dataset that models and attacks need."""
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_validation: int
  num_test: int


def default_data_dir() -> str:
  """Where tfds stores prepared datasets (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets)."""
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


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
    got = _sha256(d / n)
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
        f"(e.g. mnist, fashion_mnist, cifar10).") from e


def prepare(name: str, *, data_dir: str | None = None,
            manual_dir: str | None = None):
  """Makes sure tfds has ``name`` prepared, building it offline if it can.

  MNIST is built from the shipped files (or ``manual_dir``) with no network.
  Other datasets are built from ``manual_dir`` if given, else downloaded.

  Args:
    name: a tfds dataset name.
    data_dir: tfds data directory (default ``default_data_dir()``).
    manual_dir: folder holding the dataset's official files.

  Returns:
    The prepared tfds builder.

  Raises:
    DataError: unknown dataset, missing/corrupt files or a failed download.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if name == "mnist":
    manual_dir = str(verify_mnist_files(manual_dir or SHIPPED_DIR / "mnist"))
  elif manual_dir is not None and not pathlib.Path(manual_dir).is_dir():
    raise DataError(
        f"`manual_dir` {manual_dir!r} does not exist or is not a directory.")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  # tfds writes into a temporary folder and renames on success, so an
  # interrupted build leaves nothing half-written behind.
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # tfds raises many types for missing data / no network
    hint = (f"put the official files for {name!r} in a folder and pass it as "
            f"`manual_dir` (for cifar10: cifar-10-binary.tar.gz from the "
            f"CIFAR-10 page), or run where tfds can download them")
    raise DataError(f"could not prepare dataset {name!r}: {e}\nFix: {hint}.") from e
  return builder


def info(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
         validation_size: int = DEFAULT_VALIDATION_SIZE) -> DatasetInfo:
  """Returns the image shape, class count and split sizes of a dataset."""
  builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  feats = builder.info.features
  n_train = builder.info.splits["train"].num_examples
  _check_validation_size(validation_size, n_train)
  return DatasetInfo(
      name=name,
      image_shape=tuple(int(d) for d in feats["image"].shape),
      num_classes=int(feats["label"].num_classes),
      num_train=n_train - validation_size,
      num_validation=validation_size,
      num_test=builder.info.splits["test"].num_examples)


def _check_validation_size(validation_size: int, n_train: int) -> None:
  if not 0 <= validation_size < n_train:
    raise DataError(
        f"`validation_size` must be in [0, {n_train}); got {validation_size}.")


def _tfds_split(split: str, validation_size: int, n_train: int) -> str:
  if split not in SPLITS:
    raise DataError(f"`split` must be one of {', '.join(SPLITS)}; got {split!r}.")
  _check_validation_size(validation_size, n_train)
  cut = n_train - validation_size
  if split == "train":
    return f"train[:{cut}]"
  if split == "validation":
    return f"train[{cut}:]"
  return "test"


def _to_float(image, label):
  return tf.cast(image, tf.float32) / 255.0, label


def _cached_split(name: str, split: str, *, batch_size: int, limit: int | None,
                  data_dir: str | None, manual_dir: str | None,
                  validation_size: int) -> tf.data.Dataset:
  """The split's (uint8 image, label) examples, first ``limit`` only, cached."""
  if int(batch_size) < 1:
    raise DataError(f"`batch_size` must be >= 1; got {batch_size}.")
  if limit is not None and int(limit) < 1:
    raise DataError(f"`limit` must be >= 1 or None; got {limit}.")
  builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
  n_train = builder.info.splits["train"].num_examples
  ds = builder.as_dataset(split=_tfds_split(split, validation_size, n_train),
                          as_supervised=True, shuffle_files=False)
  if limit is not None:
    ds = ds.take(int(limit))
  return ds.cache()


def load_split(name: str, split: str, *, batch_size: int = 128,
               shuffle: bool = False, seed: int = 0, limit: int | None = None,
               data_dir: str | None = None, manual_dir: str | None = None,
               validation_size: int = DEFAULT_VALIDATION_SIZE,
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
                validation_size: int = DEFAULT_VALIDATION_SIZE
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
                validation_size: int = DEFAULT_VALIDATION_SIZE
                ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split into memory: float32 images in [0, 1] and int64 labels."""
  ds = load_split(name, split, batch_size=1024, limit=limit, data_dir=data_dir,
                  manual_dir=manual_dir, validation_size=validation_size)
  xs, ys = [], []
  for x, y in ds.as_numpy_iterator():
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys).astype(np.int64)
