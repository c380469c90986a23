"""Per-dataset tfds builds, verified against their source files (issue: never the wrong data).

Two tiny MNIST-format datasets are written as real idx.gz files with the same
four file names and different pixels. Each has its own tfds builder (derived
from tfds' MNIST builder, as fashion_mnist and kmnist are) registered from a
module in a temporary folder with its own checksums.tsv, so the product path
(``data.prepare``, with its verification) runs unchanged on them.
"""

import gzip
import hashlib
import importlib.util
import itertools
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_defense import data
from keras_defense.data import sources as data_sources

N = {"train": 60, "test": 20}
FILES = {"train": data_sources.IDX_FILES["train"], "test": data_sources.IDX_FILES["test"]}
_COUNTER = itertools.count()


def _write_idx(directory: pathlib.Path, seed: int) -> dict:
  """Writes the four idx.gz files; returns {split: (uint8 images (N,28,28), labels)}."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, (img_name, lab_name) in FILES.items():
    n = N[split]
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    with gzip.open(directory / img_name, "wb") as f:
      f.write(np.array([2051, n, 28, 28], ">u4").tobytes() + images.tobytes())
    with gzip.open(directory / lab_name, "wb") as f:
      f.write(np.array([2049, n], ">u4").tobytes() + labels.tobytes())
    arrays[split] = (images, labels.astype(np.int64))
  return arrays


_BUILDER_SOURCE = '''
import urllib.parse
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

FILES = {FILES!r}
N = {N!r}


class {cls}(tfds_mnist.MNIST):
  """A tiny MNIST-format dataset for tests; its files have MNIST's names."""
  VERSION = tfds.core.Version("1.0.0")
  URL = "https://example.invalid/{name}/"

  def _split_generators(self, dl_manager):
    urls = {{f"{{split}}_{{i}}": urllib.parse.urljoin(self.URL, n)
             for split, names in FILES.items() for i, n in enumerate(names)}}
    paths = dl_manager.download_and_extract(urls)
    return [tfds.core.SplitGenerator(
        name=split, gen_kwargs=dict(num_examples=N[split], data_path=paths[f"{{split}}_0"],
                                    label_path=paths[f"{{split}}_1"]))
            for split in ("train", "test")]
'''


def _register(tmp_path: pathlib.Path, manual: pathlib.Path) -> str:
  """Registers a builder whose checksums are those of ``manual``'s files; returns its name."""
  k = next(_COUNTER)
  cls, name = f"KdFakeDigits{k}", f"kd_fake_digits{k}"
  module_dir = tmp_path / f"builder_{name}"
  module_dir.mkdir()
  (module_dir / f"{name}.py").write_text(_BUILDER_SOURCE.format(
      FILES=FILES, N=N, cls=cls, name=name))
  lines = []
  for names in FILES.values():
    for n in names:
      p = manual / n
      lines.append(f"https://example.invalid/{name}/{n}\t{p.stat().st_size}\t"
                   f"{hashlib.sha256(p.read_bytes()).hexdigest()}\t{n}")
  (module_dir / "checksums.tsv").write_text("\n".join(lines) + "\n")
  spec = importlib.util.spec_from_file_location(name, module_dir / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return name


def _sorted_pairs(images, labels):
  keys = [img.tobytes() + bytes([int(l)]) for img, l in zip(images, labels)]
  return sorted(keys)


def _as_uint8(x):
  return np.round(x[..., 0] * 255).astype(np.uint8)


@pytest.fixture
def two_datasets(tmp_path):
  dir_a, dir_b = tmp_path / "files_a", tmp_path / "files_b"
  arrays_a, arrays_b = _write_idx(dir_a, seed=1), _write_idx(dir_b, seed=2)
  assert [p.name for p in sorted(dir_a.iterdir())] == [p.name for p in sorted(dir_b.iterdir())]
  name_a, name_b = _register(tmp_path, dir_a), _register(tmp_path, dir_b)
  return (name_a, dir_a, arrays_a), (name_b, dir_b, arrays_b)


def test_second_dataset_with_the_same_file_names_gets_its_own_data(two_datasets, tmp_path):
  (name_a, dir_a, arrays_a), (name_b, dir_b, arrays_b) = two_datasets
  tfds_dir = str(tmp_path / "tfds")
  info_a = data.info(name_a, data_dir=tfds_dir, manual_dir=str(dir_a), validation_size=0)
  info_b = data.info(name_b, data_dir=tfds_dir, manual_dir=str(dir_b), validation_size=0)
  for name, manual, arrays, info in ((name_a, dir_a, arrays_a, info_a),
                                     (name_b, dir_b, arrays_b, info_b)):
    assert info.content_check == "passed"
    assert info.sources == {n: data_sources.sha256(manual / n)
                            for pair in FILES.values() for n in pair}
    for split in ("train", "test"):
      x, y = data.load_arrays(name, split, data_dir=tfds_dir, manual_dir=str(manual),
                              validation_size=0)
      assert len(y) == N[split]
      # tfds reorders examples: compare as multisets of (image, label).
      assert _sorted_pairs(_as_uint8(x), y) == _sorted_pairs(*arrays[split])
  # Different pixels, so the check above could not pass for both with one copy.
  assert info_a.sources != info_b.sources


def test_a_build_that_reused_another_datasets_extraction_is_refused(two_datasets, tmp_path):
  (name_a, dir_a, _), (name_b, dir_b, _) = two_datasets
  tfds_dir = tmp_path / "tfds"
  # What plain tfds does: one shared downloads/extracted folder keyed by base
  # name, so B is silently built from A's extracted files.
  for name, manual in ((name_a, dir_a), (name_b, dir_b)):
    tfds.builder(name, data_dir=str(tfds_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  with pytest.raises(data.DataError) as e:
    data.prepare(name_b, data_dir=str(tfds_dir), manual_dir=str(dir_b))
  message = str(e.value)
  assert f"dataset '{name_b}/1.0.0'" in message
  assert "does not hold the images and labels of its source" in message
  assert str(dir_b / "train-images-idx3-ubyte.gz") in message
  assert str(tfds_dir / name_b / "1.0.0") in message and "delete" in message
  # A passes: it really holds its own files.
  assert data.info(name_a, data_dir=str(tfds_dir), manual_dir=str(dir_a),
                   validation_size=0).content_check == "passed"


def test_verification_record_is_per_prepared_files(two_datasets, tmp_path):
  (name_a, dir_a, _), _ = two_datasets
  tfds_dir = tmp_path / "tfds"
  data.prepare(name_a, data_dir=str(tfds_dir), manual_dir=str(dir_a))
  builder = tfds.builder(name_a, data_dir=str(tfds_dir))
  record = data_sources.load_record(builder, tfds_dir)
  assert record["content_check"] == "passed"
  assert set(record["splits"]) == {"train", "test"}
  # A changed prepared dataset (here: its info file) invalidates the record.
  info_file = pathlib.Path(str(builder.data_dir)) / "dataset_info.json"
  info_file.write_text(info_file.read_text() + " ")
  assert data_sources.load_record(builder, tfds_dir) is None


def test_corrupt_source_file_is_named(tmp_path):
  bad = tmp_path / "train-images-idx3-ubyte.gz"
  bad.write_bytes(b"not gzip")
  with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz.*not a readable gzip"):
    data_sources.decode_idx(bad, bad)


def test_content_digest_is_order_independent_and_label_sensitive():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(10, 4, 4, 1), dtype=np.uint8)
  y = rng.integers(0, 10, size=10)
  perm = rng.permutation(10)
  assert data_sources.content_digest(x, y) == data_sources.content_digest(x[perm], y[perm])
  y2 = y.copy()
  y2[3] = (y2[3] + 1) % 10
  assert data_sources.content_digest(x, y) != data_sources.content_digest(x, y2)


def test_experiment_on_the_second_dataset_uses_its_data_everywhere(two_datasets, tmp_path):
  from keras_defense.evaluation import grid as evaluation  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import experiment  # pylint: disable=g-import-not-at-top
  from keras_defense.models import export  # pylint: disable=g-import-not-at-top
  from keras_defense.defenses import logits_augmentation  # pylint: disable=g-import-not-at-top
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
  from keras_defense import training  # pylint: disable=g-import-not-at-top
  (name_a, dir_a, _), (name_b, dir_b, arrays_b) = two_datasets
  tfds_dir = str(tmp_path / "tfds")
  data.prepare(name_a, data_dir=tfds_dir, manual_dir=str(dir_a))  # A first, as on a user's machine
  common = dict(dataset=name_b, data_dir=tfds_dir, manual_dir=str(dir_b))
  run_dir = tmp_path / "run"
  experiment.run(experiment.ExperimentConfig(
      run_dir=str(run_dir), **common,
      train=training.TrainConfig(epochs=1, batch_size=16, verbose=0, **common),
      prune=pruning.PruneConfig(finetune_epochs=1, pruning_end_epoch=0.5, pruning_frequency=1,
                                dense_sparsity=0.5, conv_sparsity=0.5, batch_size=16,
                                optimizer="adam", learning_rate=1e-3, verbose=0, **common),
      augment=logits_augmentation.AugmentConfig(**common),
      eval=evaluation.EvalConfig(attacks=("fgsm",), epsilons=(0.3,), targeted_modes=(False,),
                                 threat_models=("grey_box",), cw_attacks=()),
      deterministic=True))
  results = __import__("json").loads((run_dir / "results.json").read_text())
  sources = {n: data_sources.sha256(dir_b / n) for pair in FILES.values() for n in pair}
  assert results["dataset"]["name"] == name_b
  assert results["dataset"]["sources"] == sources
  assert results["dataset"]["content_check"] == "passed"
  assert (run_dir / "report.md").read_text().startswith(f"# {name_b.upper()}:")
  for model in ("m0", "m1", "m2"):
    path = run_dir / "saved_models" / f"{name_b}_{model}" / "1"
    record = export.read_provenance(path)
    assert (record["dataset"], record["dataset_sources"]) == (name_b, sources)
    assert results["models"][model]["n_test"] == N["test"]
  assert name_a not in (run_dir / "report.md").read_text()
