"""A tiny CIFAR-10 in the official binary format, for offline tests.

The real tfds ``cifar10`` builder reads it from ``manual_dir``; only the
registered checksum is swapped for the fake tarball's (``patched_checksum``).
"""

import contextlib
import hashlib
import io
import os
import tarfile
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
FILENAME = "cifar-10-binary.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
           "horse", "ship", "truck"]


def _batch(rng, n):
  labels = rng.integers(0, 10, size=n, dtype=np.uint8)
  # Class-dependent brightness so a model can learn something.
  images = (rng.integers(0, 60, size=(n, 3072)) + labels[:, None] * 19).astype(np.uint8)
  return np.concatenate([labels[:, None], images], axis=1).tobytes()


def write_tarball(directory, *, per_batch=20, n_test=40, seed=0):
  """Writes cifar-10-binary.tar.gz into ``directory``; returns its path."""
  rng = np.random.default_rng(seed)
  path = os.path.join(directory, FILENAME)
  with tarfile.open(path, "w:gz") as tar:
    files = {f"data_batch_{i}.bin": _batch(rng, per_batch) for i in range(1, 6)}
    files["test_batch.bin"] = _batch(rng, n_test)
    files["batches.meta.txt"] = ("\n".join(CLASSES) + "\n").encode()
    for name, content in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


@contextlib.contextmanager
def patched_checksum(tarball):
  """Registers ``tarball``'s size and SHA-256 as cifar10's expected download."""
  with open(tarball, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  info = tfds.core.download.checksums.UrlInfo(
      size=os.path.getsize(tarball), checksum=digest, filename=FILENAME)
  cls = tfds.builder_cls("cifar10")
  with mock.patch.object(cls, "url_infos", {URL: info}):
    yield
