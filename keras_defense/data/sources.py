"""What a prepared dataset was built from, and the check that it is that data.

tfds caches downloads and extractions by the file's base name under its
downloads folder, so two datasets whose official files share names (the
MNIST-format ones all ship ``train-images-idx3-ubyte.gz`` and friends) can
silently get each other's data. keras-defense therefore

1. builds every dataset with a download/extract folder private to its name
   and version (``private_download_dir``), and
2. checks what tfds built against the source files before anything uses it
   (``verify``): the SHA-256 of every source file, the example count of each
   split and a digest of the split's full content (every decoded image and
   label, order-independent, since tfds reorders examples), computed once from
   the decoded source files and once from the built split. A mismatch is a
   ``DataError`` naming the dataset, the file and the folder to delete.

Content checks exist for the formats keras-defense can decode: the MNIST idx
files (mnist, fashion_mnist, kmnist and any builder derived from tfds' MNIST
builder) and the CIFAR-10 binary tarball. Other datasets get their source
digests and tfds' own counts recorded, and the record says that their content
was not checked.

The record of a passed check is kept in ``<data_dir>/keras_defense/verified/``
keyed by the prepared files, so a dataset rebuilt later is checked again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import tarfile
from typing import Any

import numpy as np

from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

# The four files of every MNIST-format dataset (tfds' MNIST builder and its subclasses).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_FILE = "cifar-10-binary.tar.gz"
CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


class DataError(UserError):
  """A dataset cannot be found, verified or built; the message says the fix."""


def sha256(path: str | os.PathLike) -> str:
  """SHA-256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def private_download_dir(data_dir: str | os.PathLike, full_name: str) -> pathlib.Path:
  """The download/extract folder of one dataset version, shared with no other.

  Args:
    data_dir: the tfds data directory.
    full_name: tfds' ``builder.info.full_name`` ("mnist/3.0.1", "emnist/digits/3.1.0").
  """
  return pathlib.Path(data_dir) / "downloads" / "keras_defense" / full_name


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """Order-independent digest of (image, label) pairs: sha256 of the sorted per-example digests.

  Args:
    images: uint8 (N, H, W, C) (or any shape with N first).
    labels: integer (N,).
  """
  images = np.ascontiguousarray(images, dtype=np.uint8)
  labels = np.asarray(labels, dtype=np.int64)
  per_example = sorted(
      hashlib.sha1(images[i].tobytes() + labels[i].tobytes()).digest()
      for i in range(len(labels)))
  h = hashlib.sha256()
  for d in per_example:
    h.update(d)
  return h.hexdigest()


# --- decoders of the official formats ---------------------------------------

def _read_idx(path: pathlib.Path, magic: int, what: str) -> np.ndarray:
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"source file {str(path)!r} is not a readable gzip file ({e}); "
                    f"replace it with the dataset's official file.") from e
  header = np.frombuffer(raw[:4], ">u4")
  if len(raw) < 8 or int(header[0]) != magic:
    raise DataError(f"source file {str(path)!r} is not an idx {what} file "
                    f"(magic {magic} expected); replace it with the official file.")
  ndim = magic & 0xFF
  dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
  body = np.frombuffer(raw[4 + 4 * ndim:], np.uint8)
  if body.size != int(np.prod(dims)):
    raise DataError(f"source file {str(path)!r} holds {body.size} bytes of data, its "
                    f"header says {int(np.prod(dims))} (truncated?); replace it.")
  return body.reshape(dims)


def decode_idx(images_path: pathlib.Path, labels_path: pathlib.Path
               ) -> tuple[np.ndarray, np.ndarray]:
  """MNIST idx files -> uint8 (N, H, W, 1) images and int64 (N,) labels."""
  images = _read_idx(images_path, 2051, "images")
  labels = _read_idx(labels_path, 2049, "labels").astype(np.int64)
  if len(images) != len(labels):
    raise DataError(f"{str(images_path)!r} has {len(images)} images but "
                    f"{str(labels_path)!r} has {len(labels)} labels.")
  return images[..., None], labels


def decode_cifar10(tarball: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The official ``cifar-10-binary.tar.gz`` -> {split: (uint8 NHWC images, labels)}."""
  out = {}
  try:
    with tarfile.open(tarball, "r:gz") as tar:
      members = {pathlib.PurePath(m.name).name: m for m in tar.getmembers()}
      for split, names in CIFAR10_BATCHES.items():
        chunks = []
        for name in names:
          if name not in members:
            raise DataError(f"source file {str(tarball)!r} lacks {name}; replace it "
                            f"with the official {CIFAR10_FILE}.")
          chunks.append(np.frombuffer(tar.extractfile(members[name]).read(), np.uint8))
        records = np.concatenate(chunks).reshape(-1, 1 + 3 * 32 * 32)
        images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[split] = (images, records[:, 0].astype(np.int64))
  except (OSError, EOFError, tarfile.TarError, ValueError) as e:
    raise DataError(f"source file {str(tarball)!r} is not the official CIFAR-10 binary "
                    f"tarball ({e}); replace it.") from e
  return out


# --- where the source files are ---------------------------------------------

def source_format(builder: Any) -> str | None:
  """"idx", "cifar10" or None (content not decodable by keras-defense)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(builder, tfds.image_classification.MNIST) and not isinstance(
      builder, tfds.image_classification.EMNIST):
    return "idx"
  if type(builder) is tfds.image_classification.Cifar10:  # pylint: disable=unidiomatic-typecheck
    return "cifar10"
  return None


def _find(name: str, folders: list[pathlib.Path]) -> pathlib.Path | None:
  """``name`` in the first folder that has it; downloaded files carry a URL prefix."""
  for folder in folders:
    if (folder / name).is_file():
      return folder / name
  stem = name.split(".")[0]  # tfds names a download <url>_<name stem><checksum>.<ext>
  for folder in folders:
    if folder.is_dir():
      for p in sorted(folder.rglob(f"*{stem}*")):
        if p.is_file() and "extracted" not in p.parts and not p.name.endswith(".INFO"):
          return p
  return None


def source_files(builder: Any, folders: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """The official files of ``builder``'s dataset found in ``folders`` (by base name)."""
  fmt = source_format(builder)
  if fmt == "idx":
    names = [n for pair in IDX_FILES.values() for n in pair]
  elif fmt == "cifar10":
    names = [CIFAR10_FILE]
  else:
    files = {}
    for folder in folders:
      if folder.is_dir():
        for p in sorted(folder.rglob("*")):
          if p.is_file() and "extracted" not in p.parts and not p.name.endswith(".INFO"):
            files.setdefault(str(p.relative_to(folder)), p)
    return files
  found = {n: _find(n, folders) for n in names}
  return {n: p for n, p in found.items() if p is not None}


def _decoded_splits(fmt: str, files: dict[str, pathlib.Path]
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  if fmt == "idx":
    return {split: decode_idx(files[img], files[lab]) for split, (img, lab) in IDX_FILES.items()}
  return decode_cifar10(files[CIFAR10_FILE])


# --- the check --------------------------------------------------------------

def prepared_fingerprint(builder: Any) -> str:
  """Digest of the prepared dataset's files (names, sizes, dataset_info.json)."""
  d = pathlib.Path(str(builder.data_dir))
  h = hashlib.sha256()
  for p in sorted(d.iterdir()):
    if p.is_file():
      h.update(f"{p.name}:{p.stat().st_size}\n".encode())
  info_file = d / "dataset_info.json"
  if info_file.is_file():
    h.update(info_file.read_bytes())
  return h.hexdigest()


def record_path(data_dir: str | os.PathLike, full_name: str) -> pathlib.Path:
  return pathlib.Path(data_dir) / "keras_defense" / "verified" / f"{full_name}.json"


def load_record(builder: Any, data_dir: str | os.PathLike) -> dict | None:
  """The record of an earlier passed check of exactly these prepared files, if any."""
  path = record_path(data_dir, builder.info.full_name)
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if record.get("prepared_fingerprint") != prepared_fingerprint(builder):
    return None
  return record


def _built_split(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                          batch_size=-1)
  images, labels = tfds.as_numpy(ds)
  return images, labels.astype(np.int64)


def verify(builder: Any, data_dir: str | os.PathLike, folders: list[pathlib.Path]
           ) -> dict:
  """Checks the prepared ``builder`` against its source files; returns the record.

  Args:
    builder: a prepared tfds builder.
    data_dir: its tfds data directory (where the record is written).
    folders: where the source files are (manual dir, the private download dir).

  Returns:
    ``{"dataset", "version", "sources": {file: sha256}, "splits": {split:
    {"num_examples", "content_sha256"}}, "content_check": "passed" | reason}``.

  Raises:
    DataError: a split's example count or content differs from the source files.
  """
  full_name = builder.info.full_name
  files = source_files(builder, folders)
  fmt = source_format(builder)
  record: dict[str, Any] = {
      "dataset": builder.info.name, "version": str(builder.info.version),
      "full_name": full_name,
      "sources": {n: sha256(p) for n, p in sorted(files.items())},
      "splits": {s: {"num_examples": int(i.num_examples)}
                 for s, i in builder.info.splits.items()}}
  cache = pathlib.Path(str(builder.data_dir))
  fix = (f"delete {str(cache)!r} (and {str(private_download_dir(data_dir, full_name))!r}) "
         f"and prepare it again from the dataset's own official files")
  if fmt is None:
    record["content_check"] = (f"not available: keras-defense cannot decode the source "
                               f"format of {builder.info.name!r}")
  elif len(files) < (4 if fmt == "idx" else 1):
    missing = sorted(set(n for pair in IDX_FILES.values() for n in pair) - set(files)
                     if fmt == "idx" else {CIFAR10_FILE} - set(files))
    record["content_check"] = (f"not available: source files {', '.join(missing)} not "
                               f"found (pass the folder holding them as manual_dir)")
  else:
    for split, (images, labels) in _decoded_splits(fmt, files).items():
      built_images, built_labels = _built_split(builder, split)
      src = ", ".join(str(files[n]) for n in (IDX_FILES[split] if fmt == "idx"
                                              else (CIFAR10_FILE,)))
      if len(built_labels) != len(labels):
        raise DataError(
            f"dataset {full_name!r}: the prepared {split!r} split has "
            f"{len(built_labels)} examples, its source {src} has {len(labels)}: it was "
            f"built from other files. Fix: {fix}.")
      expected = content_digest(images, labels)
      got = content_digest(built_images, built_labels)
      if got != expected:
        raise DataError(
            f"dataset {full_name!r}: the prepared {split!r} split does not hold the "
            f"images and labels of its source {src} (content digest {got[:16]}... vs "
            f"{expected[:16]}...): it was built from other files, e.g. a cached "
            f"extraction of another dataset. Fix: {fix}.")
      record["splits"][split]["content_sha256"] = expected
    record["content_check"] = "passed"
  record["prepared_fingerprint"] = prepared_fingerprint(builder)
  io_utils.write_json(record_path(data_dir, full_name), record)
  return record
