"""Tests of keras_defense.pruning: tfmot magnitude pruning, strip, report, run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_defense import export
from keras_defense import models
from keras_defense import pruning
from keras_defense import training
from keras_defense.compat import keras
from keras_defense.compat import tf
from keras_defense.training import ConfigError


def _random_data(n=256, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.rand(n, 28, 28, 1).astype("float32")
  y = rng.randint(0, 10, n).astype("int64")
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(32), x


def _fit_pruned(model, ds, epochs, log_dir=None):
  training.compile_classifier(model, keras.optimizers.SGD(0.01))
  model.fit(ds, epochs=epochs, verbose=0, callbacks=pruning.pruning_callbacks(log_dir))
  return model


@pytest.fixture(scope="module")
def pruned_and_base(tmp_path_factory):
  """cw_mnist pruned to 0.9 Dense / 0.95 Conv over 16 of 24 steps."""
  keras.utils.set_random_seed(0)
  base = models.build_model("cw_mnist", seed=0)
  ds, _ = _random_data()  # 8 steps per epoch
  base_weights = [w.copy() for w in base.get_weights()]
  wrapped = pruning.prune_model(base, dense_sparsity=0.9, conv_sparsity=0.95,
                                begin_step=0, end_step=16, frequency=4)
  log_dir = tmp_path_factory.mktemp("tb")
  _fit_pruned(wrapped, ds, epochs=3, log_dir=str(log_dir))
  return base, base_weights, wrapped, pruning.strip_pruning(wrapped), log_dir


def test_sparsity_targets_reached_per_layer_type(pruned_and_base):
  _, _, _, stripped, _ = pruned_and_base
  report = pruning.sparsity_report(stripped)
  targets = {"Dense": 0.10, "Conv2D": 0.05}
  assert set(report["by_type"]) == set(targets)
  for row in report["layers"]:
    # tfmot keeps round(n * (1 - sparsity)) weights per kernel.
    expected = round(row["kernel_total"] * targets[row["type"]])
    assert row["kernel_nonzero"] == pytest.approx(expected, abs=1), row
  for kind, target in targets.items():
    assert report["by_type"][kind]["kept_fraction"] == pytest.approx(target, abs=1e-3)
  assert report["by_type"]["Dense"]["kernel_total"] == 1024 * 200 + 200 * 200 + 200 * 10
  assert report["weights_total"] == report["kernel_total"] + 2 * 32 + 2 * 64 + 2 * 200 + 10


def test_strip_leaves_no_wrapper_and_keeps_logits(pruned_and_base):
  _, _, wrapped, stripped, _ = pruned_and_base
  assert pruning.has_pruning_wrappers(wrapped)
  assert not pruning.has_pruning_wrappers(stripped)
  assert all(type(l).__module__.startswith("tf_keras") for l in stripped.layers)
  x = np.random.RandomState(3).rand(8, 28, 28, 1).astype("float32")
  np.testing.assert_allclose(stripped(x, training=False), wrapped(x, training=False),
                             rtol=1e-5, atol=1e-5)
  assert stripped.layers[-1].name == models.LOGITS_LAYER_NAME
  assert [v.name for v in stripped.weights] == [
      v.name for v in models.build_model("cw_mnist").weights]  # no wrapper prefix


def test_base_model_is_not_modified(pruned_and_base):
  base, base_weights, _, _, _ = pruned_and_base
  for before, after in zip(base_weights, base.get_weights()):
    np.testing.assert_array_equal(before, after)


def test_pruning_summaries_written(pruned_and_base):
  *_, log_dir = pruned_and_base
  events = [f for _, _, fs in os.walk(log_dir / "metrics") for f in fs]
  assert any(f.startswith("events.out.tfevents") for f in events)


def test_logits_layer_can_be_left_dense():
  base = models.build_model("cw_mnist", seed=1)
  wrapped = pruning.prune_model(base, dense_sparsity=0.5, conv_sparsity=0.5, begin_step=0,
                                end_step=4, frequency=2, prune_logits=False)
  assert type(wrapped.layers[-1]) is keras.layers.Dense
  assert isinstance(wrapped.get_layer("prune_low_magnitude_dense1").layer, keras.layers.Dense)
  np.testing.assert_array_equal(wrapped.layers[-1].get_weights()[0],
                                base.layers[-1].get_weights()[0])


def test_finetune_dropout_overrides_only_the_dropout_rate():
  base = models.build_model("cw_mnist", seed=1)
  wrapped = pruning.prune_model(base, dense_sparsity=0.5, conv_sparsity=0.5, begin_step=0,
                                end_step=4, frequency=2, dropout=0.1)
  assert wrapped.get_layer("dropout").rate == 0.1
  assert base.get_layer("dropout").rate == 0.5
  with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\) or None"):
    pruning.prune_model(base, dense_sparsity=0.5, conv_sparsity=0.5, begin_step=0,
                        end_step=4, frequency=2, dropout=1.0)


@pytest.mark.parametrize("field", ["dense_sparsity", "conv_sparsity"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(field, value):
  base = models.build_model("cw_mnist", seed=0)
  kwargs = dict(dense_sparsity=0.5, conv_sparsity=0.5, begin_step=0, end_step=10,
                frequency=1)
  kwargs[field] = value
  with pytest.raises(ValueError, match=rf"`{field}` must be in \[0, 1\)"):
    pruning.prune_model(base, **kwargs)
  with pytest.raises(ConfigError, match=rf"`{field}` must be in \[0, 1\)"):
    pruning.PruneConfig(**{field: value}).validate()


def test_bad_step_range_is_refused():
  base = models.build_model("cw_mnist", seed=0)
  with pytest.raises(ValueError, match="`end_step` must be > `begin_step`"):
    pruning.prune_model(base, dense_sparsity=0.5, conv_sparsity=0.5, begin_step=5,
                        end_step=5, frequency=1)
  with pytest.raises(ConfigError, match="`pruning_end_epoch` must be in"):
    pruning.PruneConfig(pruning_end_epoch=9, finetune_epochs=8).validate()


def test_aligned_end_step_is_on_the_mask_update_grid():
  assert pruning.aligned_end_step(0, 1290, 100) == 1200
  assert pruning.aligned_end_step(10, 1290, 40) == 1290
  assert pruning.aligned_end_step(0, 50, 50) == 50


def test_gzipped_size_shrinks_with_sparsity(tmp_path):
  dense = models.build_model("cw_mnist", seed=0)
  sparse = models.build_model("cw_mnist", seed=0)
  sparse.set_weights([np.where(np.abs(w) > np.quantile(np.abs(w), 0.9), w, 0)
                      for w in dense.get_weights()])
  a = export.export_saved_model(dense, tmp_path / "dense", version=1)
  b = export.export_saved_model(sparse, tmp_path / "sparse", version=1)
  assert pruning.gzipped_size(a) == pruning.gzipped_size(a)  # deterministic
  assert pruning.gzipped_size(b) < 0.4 * pruning.gzipped_size(a)


def test_prune_run_on_real_mnist_exports_a_plain_sparse_savedmodel(tmp_path):
  """prune(config) end to end: 640 real MNIST training images, 2 epochs."""
  base = models.build_model("cw_mnist", seed=0)
  base_path = export.export_saved_model(base, tmp_path / "m0", version=1)
  config = pruning.PruneConfig(
      base_model_path=base_path, run_dir=str(tmp_path / "run"), dense_sparsity=0.9,
      conv_sparsity=0.95, pruning_end_epoch=1, pruning_frequency=5, finetune_epochs=2,
      batch_size=64, learning_rate=0.01, lr_decay_epochs=(1,), train_limit=640,
      test_limit=300, export_dir=str(tmp_path / "m1"), export_version=1,
      report_path=str(tmp_path / "report" / "m1"), verbose=0)
  result = pruning.prune(config)
  assert result.end_step == 10  # 10 steps/epoch, 1 epoch, on the 5-step grid
  kept = {k: v["kept_fraction"] for k, v in result.report.pruned["by_type"].items()}
  assert kept["Dense"] == pytest.approx(0.10, abs=1e-3)
  assert kept["Conv2D"] == pytest.approx(0.05, abs=1e-3)
  assert result.report.compression_ratio > 10
  assert result.report.pruned_gzip_bytes < result.report.base_gzip_bytes
  assert 0 <= result.test_accuracy <= 1 and result.report.test_examples == 300
  with open(tmp_path / "report" / "m1.json") as f:
    saved_report = json.load(f)
  assert saved_report["compression_ratio"] == pytest.approx(result.report.compression_ratio)
  assert pruning.CompressionReport.from_dict(saved_report).to_dict() == saved_report
  assert "| **total** |" in (tmp_path / "report" / "m1.md").read_text()
  assert (tmp_path / "run" / "tensorboard" / "metrics").is_dir()
  # Plain TensorFlow in a fresh process: no keras_defense, no tfmot needed.
  script = (
      "import sys, numpy as np, tensorflow as tf\n"
      "m = tf.saved_model.load(sys.argv[1])\n"
      "k = [v.numpy() for v in m.variables if 'kernel' in v.name]\n"
      "print(sum(int(np.count_nonzero(a)) for a in k), sum(a.size for a in k))\n"
      "print(m.signatures['serving_default'](images=tf.zeros([2, 28, 28, 1]))"
      "['classes'].shape[0])\n")
  out = subprocess.run([sys.executable, "-c", script, result.saved_model_path],
                       capture_output=True, text=True, check=True,
                       env={**{k: v for k, v in os.environ.items()
                               if k != "TF_USE_LEGACY_KERAS"},
                            "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout.split()
  assert int(out[0]) == result.report.pruned["kernel_nonzero"]
  assert int(out[1]) == result.report.pruned["kernel_total"]
  assert out[2] == "2"


def test_kept_at_most_never_keeps_more_than_asked():
  from keras_defense.compat import keras
  for n_in, n_out, s in [(32 * 9, 32, 0.95), (200, 10, 0.9), (7, 3, 0.5), (3, 1, 0.99)]:
    layer = keras.layers.Dense(n_out)
    layer.build((None, n_in))
    n = n_in * n_out
    s2 = pruning.kept_at_most(s, layer)
    kept = round(n * (1 - s2))  # what tfmot keeps
    assert kept <= max(1, n * (1 - s) + 1e-9), (n, s, kept)
    assert kept >= min(n, max(1, int(n * (1 - s)))), (n, s, kept)
    assert 0 <= s2 < 1
