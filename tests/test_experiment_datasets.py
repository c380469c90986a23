"""One dataset, every stage: kd-experiment on another dataset, a folder of real PNGs, and refusals.

The folder dataset is written from real MNIST test digits (classes 0, 1, 2,
named "zero", "one", "two") as PNG files, so the model can learn it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keras_defense import data
from keras_defense.evaluation import grid as evaluation
from keras_defense.pipelines import experiment
from keras_defense.models import export
from keras_defense.defenses import logits_augmentation
from keras_defense.defenses import pruning
from keras_defense import training
from keras_defense.util.compat import tf

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = {0: "zero", 1: "one", 2: "two"}


def _write_pngs(root: pathlib.Path, per_class: dict, *, size=None, channels=1) -> pathlib.Path:
  """PATH/{train,test}/<class>/<i>.png from real MNIST test digits of classes 0-2."""
  x, y = data.load_arrays("mnist", "test", limit=2000)
  counts = {"train": per_class["train"], "test": per_class["test"]}
  for label, name in CLASSES.items():
    images = x[y == label]
    start = 0
    for split, n in counts.items():
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i, img in enumerate(images[start:start + n]):
        img = tf.cast(tf.round(img * 255), tf.uint8)
        if size is not None:
          img = tf.cast(tf.image.resize(tf.cast(img, tf.float32), size), tf.uint8)
        if channels == 3:
          img = tf.image.grayscale_to_rgb(img)
        (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
      start += n
  return root


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
  return _write_pngs(tmp_path_factory.mktemp("folder") / "digits", {"train": 120, "test": 30})


def test_folder_dataset_loads_through_image_folder(digit_folder):
  name = f"folder:{digit_folder}"
  info = data.info(name)
  assert info.image_shape == (28, 28, 1)
  assert info.class_names == ("one", "two", "zero")  # ImageFolder sorts names
  assert (info.num_train, info.num_validation, info.num_test) == (324, 36, 90)
  assert info.content_check == "every one of the 450 image files decoded"
  x, y = data.load_arrays(name, "test")
  assert x.shape == (90, 28, 28, 1) and x.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(y, minlength=3), [30, 30, 30])
  # The pixels are the PNGs' own: every loaded image is one of the written ones.
  written = {(tf.io.decode_png((digit_folder / "test" / c / f).read_bytes()).numpy().tobytes())
             for c in CLASSES.values() for f in os.listdir(digit_folder / "test" / c)}
  assert all(np.round(img * 255).astype(np.uint8).tobytes() in written for img in x)
  assert data.slug(name) == "folder_digits"


def test_folder_with_other_shapes_needs_image_size(tmp_path):
  root = _write_pngs(tmp_path / "big", {"train": 4, "test": 2}, size=(40, 40), channels=3)
  with pytest.raises(data.DataError, match=r"images of shape 40x40x3 \(18 images\).*"
                                           r"--image_size=28x28x1"):
    data.info(f"folder:{root}")
  name = data.with_image_size(f"folder:{root}", "28x28x1")
  assert name.endswith("@28x28x1")
  x, _ = data.load_arrays(name, "train", validation_size=0)
  assert x.shape == (12, 28, 28, 1)
  x3, _ = data.load_arrays(data.with_image_size(f"folder:{root}", "32x32x3"), "test")
  assert x3.shape == (6, 32, 32, 3)


def test_corrupt_image_is_named_and_nothing_is_cached(tmp_path):
  root = _write_pngs(tmp_path / "bad", {"train": 3, "test": 2})
  bad = root / "train" / "one" / "1.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(data.DataError, match=rf"image file '{bad}' cannot be read or decoded"):
    data.info(f"folder:{root}", data_dir=str(tfds_dir))
  assert not tfds_dir.exists()


def test_missing_split_and_unsupported_tfds_datasets_are_clear_errors(tmp_path):
  (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
  with pytest.raises(data.DataError, match="has no test subfolder"):
    data.info(f"folder:{tmp_path / 'only_train'}")
  with pytest.raises(data.DataError, match=r"'stl10' is not supported as is: its images are "
                                           r"96x96x3.*--image_size"):
    data.info("stl10")
  with pytest.raises(data.DataError, match=r"'imdb_reviews' is not supported: expected a uint8 "
                                           r"'image' feature.*features text, label"):
    data.info("imdb_reviews")


def _small_config(run_dir, dataset, **kwargs):
  small = dict(dataset=dataset, test_limit=200, verbose=0)
  return experiment.ExperimentConfig(
      run_dir=str(run_dir), dataset=dataset,
      train=training.TrainConfig(epochs=3, lr_decay_epochs=(100,), batch_size=32, **small),
      prune=pruning.PruneConfig(finetune_epochs=1, pruning_end_epoch=0.5, pruning_frequency=2,
                                dense_sparsity=0.5, conv_sparsity=0.5, batch_size=32,
                                optimizer="adam", learning_rate=1e-3, **small),
      augment=logits_augmentation.AugmentConfig(dataset=dataset, test_limit=200),
      eval=evaluation.EvalConfig(attacks=("fgsm",), epsilons=(0.3,), targeted_modes=(False,),
                                 eval_size=60, cw_attacks=()),
      deterministic=True, **kwargs)


def test_experiment_runs_every_stage_on_a_folder_dataset(digit_folder, tmp_path):
  dataset = f"folder:{digit_folder}"
  run_dir = tmp_path / "run"
  experiment.run(_small_config(run_dir, dataset))
  results = json.loads((run_dir / "results.json").read_text())
  assert results["dataset"]["name"] == dataset
  assert results["dataset"]["class_names"] == ["one", "two", "zero"]
  assert results["config"]["dataset"] == dataset
  # Every model path and provenance names the dataset.
  for name in ("m0", "m1", "m2"):
    path = run_dir / "saved_models" / f"folder_digits_{name}" / "1"
    assert export.read_provenance(path)["dataset"] == dataset
    assert results["models"][name]["saved_model"] == str(path)
  assert results["models"]["m0"]["clean_accuracy"] > 0.8  # 3 digit classes: learnable
  assert results["models"]["m0"]["n_test"] == 90
  report = (run_dir / "report.md").read_text()
  assert f"- Dataset: `{dataset}`" in report
  assert "train 324 / validation 36 / test 90 examples; 3 classes (one, two, zero)" in report
  assert "every one of the 450 image files decoded" in report
  assert "mnist" not in report.lower().replace("models/folder_digits", "")


def test_experiment_refuses_stage_configs_of_another_dataset(tmp_path):
  config = _small_config(tmp_path / "run", "fashion_mnist")
  config.train.dataset = "mnist"
  with pytest.raises(experiment.UserError, match=r"the train stage's `dataset` is 'mnist' but "
                                                 r"the run's is 'fashion_mnist'"):
    experiment.run(config)
  assert not (tmp_path / "run").exists()


def test_reuse_refuses_models_of_another_dataset(tmp_path):
  models_dir = tmp_path / "saved_models"
  for name in ("m0", "m1", "m2"):
    shutil.copytree(REPO / "saved_models" / f"mnist_{name}" / "1",
                    models_dir / f"fashion_mnist_{name}" / "1")
  config = _small_config(tmp_path / "run", "fashion_mnist", reuse_saved_models=True,
                         saved_models_dir=str(models_dir), stages=("attack", "report"))
  with pytest.raises(export.ModelLoadError, match=r"--reuse_saved_models: .*fashion_mnist_m0/1' "
                                                  r"was made on dataset 'mnist', but this run's "
                                                  r"dataset is 'fashion_mnist'"):
    experiment.run(config)
  assert not (tmp_path / "run").exists()


def _kd_experiment(*args, cwd=REPO):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "keras_defense.bin.experiment", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_binary_refuses_a_stage_flagfile_of_another_dataset(tmp_path):
  run_dir = tmp_path / "run"
  proc = _kd_experiment("--flagfile=flags/mnist.flags", "--dataset=fashion_mnist",
                        f"--run_dir={run_dir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (
      "error: the train stage's flagfile flags/mnist_m0.flags sets --dataset=mnist, but the "
      "run's --dataset is 'fashion_mnist' (from the command line): every stage must use the "
      "run's data. Use a train flagfile for 'fashion_mnist', drop --dataset from "
      "flags/mnist_m0.flags, or pass --dataset=mnist to the run.")
  assert "Traceback" not in proc.stderr
  assert not run_dir.exists()


def test_shipped_models_record_their_dataset():
  for name in ("m0", "m1", "m2"):
    record = export.check_model_dataset(REPO / "saved_models" / f"mnist_{name}" / "1",
                                        "mnist", what="test")
    assert record["dataset_sources"] == data.info("mnist").sources


def _experiment_config(*args):
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  with flagsaver.flagsaver():
    kd_flags.FLAGS.unparse_flags()
    kd_flags.FLAGS(["kd-experiment", *args])
    return kd_flags.experiment_config()


def test_the_runs_data_reaches_every_stage_config(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the template names its stage flagfiles relative to the repo
  manual = str(tmp_path / "fashion_files")
  config = _experiment_config("--flagfile=flags/new_dataset.flags", "--dataset=fashion_mnist",
                              f"--manual_dir={manual}", "--epsilons=0.1")
  assert (config.dataset, config.manual_dir, config.run_dir) == (
      "fashion_mnist", manual, "runs/fashion_mnist")
  for stage in (config.train, config.prune, config.augment):
    assert (stage.dataset, stage.manual_dir, stage.data_dir) == ("fashion_mnist", manual, None)
  config.validate()
  run = experiment._Run(config)  # pylint: disable=protected-access
  assert run.export_dir(0).endswith("saved_models/fashion_mnist_m0")
  assert experiment._stage_config(run, "prune", base_model_path="x").report_path.endswith(  # pylint: disable=protected-access
      "compression/fashion_mnist_m1")
  # No stage flagfile: the stages' defaults (pruning fine-tunes with Adam, as the card).
  bare = _experiment_config("--dataset=fashion_mnist", "--epsilons=0.1")
  assert (bare.prune.optimizer, bare.prune.learning_rate, bare.prune.finetune_epochs) == (
      "adam", 0.001, 10)
  assert (bare.train.optimizer, bare.train.epochs) == ("sgd", 10)
  folder = _experiment_config(f"--dataset=folder:{tmp_path}/signs", "--image_size=32x32x3",
                              "--epsilons=0.1")
  assert folder.dataset == f"folder:{tmp_path}/signs@32x32x3"
  assert folder.run_dir == "runs/folder_signs_32x32x3"
  assert folder.train.dataset == folder.dataset


def test_autoattack_defaults_are_the_largest_epsilon_on_1000_images(monkeypatch):
  monkeypatch.chdir(REPO)
  config = _experiment_config("--dataset=mnist", "--epsilons=0.1,0.3,0.2")
  assert (config.eval.autoattack_version, config.eval.autoattack_eps,
          config.eval.autoattack_size) == ("standard", (0.3,), 1000)
  shipped = _experiment_config("--flagfile=flags/mnist.flags")
  assert (shipped.eval.autoattack_eps, shipped.eval.autoattack_size) == ((0.3,), 10000)
