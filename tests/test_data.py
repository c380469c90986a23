"""Tests for keras_defense.data.datasets: offline MNIST, splits, checksums, CIFAR path."""

import hashlib
import os
import shutil

import numpy as np
import pytest

from keras_defense import data
import fake_cifar10


def test_shipped_mnist_files_verify():
  assert data.verify_mnist_files(data.SHIPPED_DIR / "mnist").is_dir()


def test_mnist_info_and_splits():
  info = data.info("mnist")
  assert info.image_shape == (28, 28, 1)
  assert info.num_classes == 10
  assert (info.num_train, info.num_validation, info.num_test) == (55000, 5000, 10000)


def test_test_split_is_float_in_unit_range():
  x, y = data.load_arrays("mnist", "test", limit=500)
  assert x.shape == (500, 28, 28, 1) and x.dtype == np.float32
  assert 0.0 == x.min() and x.max() == 1.0
  assert y.dtype == np.int64 and set(np.unique(y)) <= set(range(10))


def test_test_split_has_the_official_label_counts():
  # Per-class counts of LeCun's t10k-labels-idx1-ubyte (tfds reorders examples).
  _, y = data.load_arrays("mnist", "test")
  np.testing.assert_array_equal(np.bincount(y, minlength=10),
                                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_validation_is_held_out_of_train():
  xv, _ = data.load_arrays("mnist", "validation", validation_size=100)
  xt, _ = data.load_arrays("mnist", "train", validation_size=100)
  assert len(xv) == 100 and len(xt) == 59900
  held_out, train = set(_digests(xv)), set(_digests(xt))
  # MNIST's 60,000 training images are pairwise distinct (checked: 59,900 +
  # 100 distinct digests), so any image in both splits is a leak.
  assert len(held_out) == 100 and len(train) == 59900
  assert not held_out & train


def test_shuffle_is_deterministic_with_seed():
  def first_labels(seed):
    ds = data.load_split("mnist", "train", batch_size=64, shuffle=True, seed=seed,
                         limit=2000)
    return next(iter(ds))[1].numpy()
  np.testing.assert_array_equal(first_labels(3), first_labels(3))
  assert not np.array_equal(first_labels(3), first_labels(4))


def _digests(images):
  return [hashlib.sha256(a.tobytes()).hexdigest() for a in images]


def _epochs(seed, epochs, first_epoch=0):
  """(steps per epoch, per-epoch lists of (image digest, label)) of load_epochs."""
  ds, steps = data.load_epochs("mnist", "train", batch_size=50, seed=seed, epochs=epochs,
                               first_epoch=first_epoch, limit=120)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == steps * (epochs - first_epoch)
  per_epoch = []
  for e in range(epochs - first_epoch):
    chunk = batches[e * steps:(e + 1) * steps]
    assert [len(y) for _, y in chunk] == [50, 50, 20]  # the last batch is smaller
    x = np.concatenate([x for x, _ in chunk])
    y = np.concatenate([y for _, y in chunk])
    per_epoch.append(list(zip(_digests(x), y.tolist())))
  return steps, per_epoch


def test_load_epochs_shuffles_each_epoch_by_seed_and_epoch():
  steps, run = _epochs(seed=1, epochs=3)
  assert steps == 3  # ceil(120 / 50)
  # Every epoch is the same 120 (image, label) pairs, each in its own order.
  x, y = data.load_arrays("mnist", "train", limit=120)
  pairs = sorted(zip(_digests(x), y.tolist()))
  for epoch in run:
    assert sorted(epoch) == pairs
  assert run[0] != run[1] and run[1] != run[2] and run[0] != run[2]
  # A pure function of (seed, epoch): the same again, and a run resumed at
  # epoch 1 (first_epoch=1) sees exactly epochs 1 and 2.
  assert _epochs(seed=1, epochs=3)[1] == run
  assert _epochs(seed=1, epochs=3, first_epoch=1)[1] == run[1:]
  assert _epochs(seed=2, epochs=1)[1][0] != run[0]
  # Nothing left to train: an empty stream.
  done, steps = data.load_epochs("mnist", "train", batch_size=50, seed=1, epochs=3,
                                 first_epoch=3, limit=120)
  assert steps == 3 and list(done.as_numpy_iterator()) == []


@pytest.mark.parametrize("first_epoch", [-1, 4])
def test_load_epochs_refuses_first_epoch_outside_range(first_epoch):
  with pytest.raises(data.DataError,
                     match=rf"`first_epoch` must be in \[0, 3\]; got {first_epoch}\."):
    data.load_epochs("mnist", "train", batch_size=50, seed=1, epochs=3,
                     first_epoch=first_epoch, limit=120)


@pytest.fixture
def mnist_copy(tmp_path):
  d = tmp_path / "mnist"
  shutil.copytree(data.SHIPPED_DIR / "mnist", d)
  return d


def test_wrong_checksum_is_a_clear_error(mnist_copy):
  f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
  content = f.read_bytes()
  f.write_bytes(content[:-10])  # truncated download
  with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz.*SHA-256.*truncated"):
    data.verify_mnist_files(mnist_copy)


def test_missing_file_names_the_file(mnist_copy):
  os.remove(mnist_copy / "train-images-idx3-ubyte.gz")
  with pytest.raises(data.DataError, match="lacks train-images-idx3-ubyte.gz"):
    data.verify_mnist_files(mnist_copy)


def test_missing_folder(tmp_path):
  with pytest.raises(data.DataError, match="does not exist or is not a directory"):
    data.verify_mnist_files(tmp_path / "nope")


def test_corrupt_manual_dir_is_refused_before_tfds(mnist_copy, tmp_path):
  (mnist_copy / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
  with pytest.raises(data.DataError, match="SHA-256"):
    data.prepare("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(mnist_copy))
  assert not (tmp_path / "tfds" / "mnist" / "3.0.1").exists()


def test_unknown_dataset():
  with pytest.raises(data.DataError, match="not a tensorflow-datasets dataset"):
    data.info("no_such_dataset_xyz")


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="dev"), "`split` must be one of"),
    (dict(split="test", batch_size=0), "`batch_size` must be >= 1"),
    (dict(split="test", limit=0), "`limit` must be >= 1"),
    (dict(split="train", validation_size=60000), "`validation_size` must be in"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(data.DataError, match=match):
    data.load_split("mnist", **kwargs)


def test_cifar10_builds_from_manual_tarball(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  tarball = fake_cifar10.write_tarball(str(manual))
  with fake_cifar10.patched_checksum(tarball):
    info = data.info("cifar10", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(manual), validation_size=10)
    x, y = data.load_arrays("cifar10", "test", data_dir=str(tmp_path / "tfds"),
                            validation_size=10)
  assert info.image_shape == (32, 32, 3) and info.num_classes == 10
  assert (info.num_train, info.num_validation, info.num_test) == (90, 10, 40)
  assert x.shape == (40, 32, 32, 3) and 0 <= x.min() and x.max() <= 1


def test_cifar10_with_wrong_tarball_is_a_clear_error(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_cifar10.write_tarball(str(manual))  # real checksum registry: mismatch
  with pytest.raises(data.DataError, match=r"(?s)could not prepare dataset 'cifar10'.*wrong checksum.*manual_dir"):
    data.prepare("cifar10", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
