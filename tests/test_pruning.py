"""Tests of keras_defense.defenses.pruning: tfmot magnitude pruning, strip, report, run."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _helpers
from keras_defense import data
from keras_defense.models import export
from keras_defense import models
from keras_defense.defenses import guards
from keras_defense.defenses import pruning
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.training.config import ConfigError


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
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(str(log_dir / "metrics"))
  ea.Reload()
  layers = ["conv1", "conv2", "conv3", "conv4", "dense1", "dense2", "logits"]
  # tfmot's PruningSummaries: one sparsity and one threshold scalar per pruned layer.
  sparsity = {l: f"prune_low_magnitude_{l}/mask:0/sparsity" for l in layers}
  threshold = {l: f"prune_low_magnitude_{l}/threshold:0/threshold" for l in layers}
  assert set(ea.Tags()["tensors"]) == set(sparsity.values()) | set(threshold.values())
  value = lambda e: float(tf.make_ndarray(e.tensor_proto))  # noqa: E731
  for layer in layers:
    series = [value(e) for e in ea.Tensors(sparsity[layer])]
    assert len(series) == 3, series  # one per epoch
    assert series[0] == 0.0 and series == sorted(series), series
    # The last value is the layer's target (conv1: 14 of 288 weights kept = 0.9514).
    assert series[-1] == pytest.approx(0.95 if layer.startswith("conv") else 0.9, abs=2e-3)
    assert value(ea.Tensors(threshold[layer])[-1]) > 0


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
  size = pruning.gzipped_size(a)
  # The number depends only on file names and contents: a copy elsewhere,
  # under a long path and with other timestamps, measures the same.
  copy = tmp_path / ("elsewhere_" * 12) / "1"
  shutil.copytree(a, copy)
  for f in copy.rglob("*"):
    os.utime(f, (1e9, 1e9))
  assert pruning.gzipped_size(copy) == size
  # Exporting the same model again gives (nearly) the same number: only the
  # traced functions' names in saved_model.pb differ between exports
  # (seen: 1,165,443 vs 1,164,858 bytes, 0.05%).
  again = export.export_saved_model(dense, tmp_path / "dense_again", version=1)
  assert pruning.gzipped_size(again) == pytest.approx(size, rel=2e-3)
  assert pruning.gzipped_size(b) < 0.4 * size


def _report_dict(layers):
  """A sparsity_report-shaped dict for hand-written (name, type, kernel, nonzero, bias, nonzero)."""
  rows = [{"name": n, "type": t, "kernel_total": k, "kernel_nonzero": kn,
           "kept_fraction": kn / k, "bias_total": b, "bias_nonzero": bn}
          for n, t, k, kn, b, bn in layers]
  by_type = {}
  for r in rows:
    agg = by_type.setdefault(r["type"], {"kernel_total": 0, "kernel_nonzero": 0})
    agg["kernel_total"] += r["kernel_total"]
    agg["kernel_nonzero"] += r["kernel_nonzero"]
  for agg in by_type.values():
    agg["kept_fraction"] = agg["kernel_nonzero"] / agg["kernel_total"]
  kt, kn = sum(r["kernel_total"] for r in rows), sum(r["kernel_nonzero"] for r in rows)
  return {"layers": rows, "by_type": by_type, "kernel_total": kt, "kernel_nonzero": kn,
          "kept_fraction": kn / kt,
          "weights_total": kt + sum(r["bias_total"] for r in rows),
          "weights_nonzero": kn + sum(r["bias_nonzero"] for r in rows)}


def test_compression_report_markdown_cell_by_cell():
  report = pruning.CompressionReport(
      base=_report_dict([("conv1", "Conv2D", 288, 288, 32, 32),
                         ("logits", "Dense", 2000, 2000, 10, 10)]),
      pruned=_report_dict([("conv1", "Conv2D", 288, 14, 32, 30),
                           ("logits", "Dense", 2000, 200, 10, 10)]),
      base_accuracy=0.9912, pruned_accuracy=0.9877, test_examples=10000,
      base_gzip_bytes=1_165_443, pruned_gzip_bytes=250_000)
  # Worked out by hand: 14/288 = 4.861%, 214/2288 = 9.353%; weights 2288 + 42
  # = 2330 vs 214 + 40 = 254 nonzero: 9.17x (kernels 2288/214 = 10.69x);
  # gzip 1,165,443 / 250,000 = 4.66x.
  lines = report.to_markdown().splitlines()
  assert lines[:-1] == [
      "| layer | type | kernel weights | nonzero | kept | biases (kept, not pruned) |",
      "|---|---|---:|---:|---:|---:|",
      "| conv1 | Conv2D | 288 | 14 | 4.861% | 30/32 |",
      "| logits | Dense | 2,000 | 200 | 10.000% | 10/10 |",
      "| all Conv2D | Conv2D | 288 | 14 | 4.861% | |",
      "| all Dense | Dense | 2,000 | 200 | 10.000% | |",
      "| **total** | | 2,288 | 214 | 9.353% | |",
      "",
      "| | M0 (base) | M1 (pruned) |",
      "|---|---:|---:|",
      "| weights (kernels + biases) | 2,330 | 254 nonzero |",
      "| test accuracy (n=10000) | 99.12% | 98.77% |",
      "| gzip'd SavedModel | 1.165 MB | 0.250 MB (4.66x smaller) |",
      "",
      "Compression ratio (M0 weights / M1 nonzero weights): **9.17x** (kernels only: 10.69x).",
      ""]
  assert lines[-1].startswith("Kept = nonzero / total kernel weights")
  # Without accuracies or SavedModels: "n/a" and no gzip row.
  bare = pruning.CompressionReport(base=report.base, pruned=report.pruned).to_markdown()
  assert "| test accuracy (n=None) | n/a | n/a |" in bare.splitlines()
  assert "gzip" not in bare


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
  assert result.report.test_examples == 300
  # The reported accuracies, recomputed here from the exported and the base
  # SavedModel on the same 300 test images.
  x, y = data.load_arrays("mnist", "test", limit=300)
  accuracy = lambda m: float(np.mean(np.argmax(m(x, training=False), -1) == y))  # noqa: E731
  pruned_accuracy = accuracy(export.load_model(result.saved_model_path))
  base_accuracy = accuracy(export.load_model(base_path))
  assert result.test_accuracy == pytest.approx(pruned_accuracy, abs=1e-9)
  assert result.report.pruned_accuracy == pytest.approx(pruned_accuracy, abs=1e-9)
  assert result.base_accuracy == pytest.approx(base_accuracy, abs=1e-9)
  assert result.report.base_accuracy == pytest.approx(base_accuracy, abs=1e-9)
  # Else the checks above could not tell the two models apart (seen: 0.107
  # pruned vs 0.087 for the untrained base).
  assert pruned_accuracy != base_accuracy
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
  from keras_defense.util.compat import keras
  for n_in, n_out, s in [(32 * 9, 32, 0.95), (200, 10, 0.9), (7, 3, 0.5), (3, 1, 0.99)]:
    layer = keras.layers.Dense(n_out)
    layer.build((None, n_in))
    n = n_in * n_out
    s2 = pruning.kept_at_most(s, layer)
    kept = round(n * (1 - s2))  # what tfmot keeps
    assert kept <= max(1, n * (1 - s) + 1e-9), (n, s, kept)
    assert kept >= min(n, max(1, int(n * (1 - s)))), (n, s, kept)
    assert 0 <= s2 < 1


def test_robust_pruning_fine_tunes_on_adversarial_batches_and_keeps_a_sparse_best_epoch(
    tmp_path):
  """Robust pruning (issue 14): FGSM-RS fine-tuning inside the pruning run.

  The guard's measurement is scripted: epoch 1 scores best but ends before the
  schedule's last mask update, so it must not be kept; epoch 2 is the best
  eligible one and epoch 3 collapses below half of it.
  """
  from unittest import mock
  from keras_defense.defenses import trainer
  x_probe, _ = data.load_arrays("mnist", "test", limit=32)
  scripted = iter([0.90, 0.60, 0.20])
  probes = []

  def fake_measure(guard):
    probes.append(guard.classifier(x_probe, training=False).numpy())
    return next(scripted)

  config = pruning.PruneConfig(
      base_model_path="saved_models/mnist_m0/1", run_dir=str(tmp_path / "run"),
      dense_sparsity=0.9, conv_sparsity=0.95, pruning_end_epoch=1.5, pruning_frequency=5,
      finetune_epochs=3, batch_size=64, learning_rate=0.01, lr_decay_epochs=(3,),
      train_limit=640, test_limit=300, validation_size=200, export_dir=str(tmp_path / "m1"),
      export_version=1, verbose=0,
      adversarial=training.AdversarialSpec("fgsm_rs", epsilon=0.3, robust_val_size=100))
  with mock.patch.object(trainer.RobustAccuracyGuard, "measure", fake_measure), \
      mock.patch.object(guards.logging, "warning") as warning:
    result = pruning.prune(config)
  assert result.end_step == 15  # 10 steps/epoch, 1.5 epochs, on the 5-step grid
  guard = result.defense["robust_guard"]
  assert guard["first_eligible_epoch"] == 1  # epoch 1 ends at step 10 < 15
  assert guard["history"] == {"0": 0.9, "1": 0.6, "2": 0.2}
  assert guard["best_epoch"] == 1 and guard["collapses"] == [2]
  assert warning.call_count == 1
  assert result.defense["adversarial"] == "fgsm_rs"
  assert result.defense["adv_step_size"] == pytest.approx(0.375)  # 1.25 eps
  # The kept weights are epoch 2's (the best eligible), at the final sparsity.
  np.testing.assert_allclose(result.model(x_probe).numpy(), probes[1], atol=1e-5)
  assert not np.allclose(probes[1], probes[2], atol=1e-3)
  kept = {k: v["kept_fraction"] for k, v in result.report.pruned["by_type"].items()}
  assert kept["Dense"] == pytest.approx(0.10, abs=1e-3)
  assert kept["Conv2D"] == pytest.approx(0.05, abs=1e-3)
  # Exported with its defense in the provenance; plain TF serves the same logits.
  assert export.read_provenance(result.saved_model_path)["defense"]["adversarial"] == "fgsm_rs"
  served = tf.saved_model.load(result.saved_model_path).signatures[export.SERVING_SIGNATURE]
  np.testing.assert_allclose(served(images=tf.constant(x_probe))["logits"].numpy(),
                             probes[1], atol=1e-4)
  # The fine-tuning ran the adversarial step: its training log is the accuracy on
  # the crafted batches, next to tfmot's pruning summaries.
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard" / "train"))
  ea.Reload()
  tags = set(ea.Tags()["tensors"]) | set(ea.Tags()["scalars"])
  assert "epoch_robust_accuracy" in tags, tags
  assert json.loads((tmp_path / "run" / "prune_result.json").read_text())[
      "defense"]["robust_guard"]["best_epoch"] == 1


def test_prune_flags_fill_the_robust_pruning_fields():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  fv = _helpers.fresh_flags()
  fv(["kd-prune", "--adversarial=pgd", "--adv_epsilon=0.2", "--adv_steps=7",
      "--trades_beta=3", "--robust_val_size=50"])
  config = kd_flags.prune_config(fv).validate()
  assert config.adversarial == training.AdversarialSpec(
      "pgd", epsilon=0.2, steps=7, trades_beta=3.0, robust_val_size=50)
  assert config.adversarial.attack_steps() == (7, pytest.approx(2.5 * 0.2 / 7))
  fv.unparse_flags()
  fv(["kd-prune"])
  assert kd_flags.prune_config(fv).adversarial is None  # no flag: plain fine-tuning
  with pytest.raises(ConfigError, match="adv_steps"):
    dataclasses.replace(config, adversarial=dataclasses.replace(
        config.adversarial, method="fgsm_rs")).validate()
  # The robust-pruning flagfile: M1's recipe on M0-AT, fine-tuned with FGSM-RS.
  flags_dir = pathlib.Path(__file__).resolve().parents[1] / "flags"
  robust, plain = ([l for l in (flags_dir / f"{n}.flags").read_text().splitlines()
                    if l.startswith("--")] for n in ("mnist_m1_at_fgsm_rs", "mnist_m1"))
  fv.unparse_flags()
  fv(["kd-prune", f"--flagfile={flags_dir / 'mnist_m1_at_fgsm_rs.flags'}"])
  config = kd_flags.prune_config(fv).validate()
  assert config.base_model_path == "saved_models/mnist_m0_at_fgsm_rs/1"
  assert config.adversarial.method == "fgsm_rs" and config.adversarial.attack_steps() == (
      1, pytest.approx(0.375))
  same = ("--dense_sparsity", "--conv_sparsity", "--pruning_end_epoch", "--pruning_frequency",
          "--finetune_epochs", "--optimizer", "--learning_rate", "--lr_decay_epochs")
  assert ([l for l in robust if l.startswith(same)]
          == [l for l in plain if l.startswith(same)])
