"""Tests for adversarial training on the training loop (keras_defense.defenses)."""

import json
from unittest import mock

import numpy as np
import pytest

import _helpers
from keras_defense import data
from keras_defense import defenses
from keras_defense.models import export
from keras_defense import models
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.training import attack as training_attack
from keras_defense.defenses import guards
from keras_defense.defenses import trainer

EPS = 0.2
# The tiny setup every training test shares: 2,048 MNIST training images,
# Adam, batch 64, a 3-step inner maximisation (fgsm_rs: its one step). With 2
# epochs at eps 0.2 (seen once: PGD-10 accuracy on 300 test images 0.14
# standard, 0.48 FGSM-RS, 0.50 PGD-AT; at eps 0.1 the undertrained standard
# model was already at 0.57 and the gap only 3-10 points).
TINY = dict(dataset="mnist", train_limit=2048, test_limit=200, validation_size=200,
            batch_size=64, optimizer="adam", learning_rate=1e-3, lr_decay_epochs=(9,),
            verbose=0)


def _spec(method, **kwargs):
  if method is None:
    return None
  return training.AdversarialSpec(method, epsilon=EPS, **{
      "robust_val_size": 100, "steps": None if method == "fgsm_rs" else 3, **kwargs})


def _config(tmp_path, name, method, epochs=2, robust_val_size=100, **kwargs):
  return training.TrainConfig(
      run_dir=str(tmp_path / name), epochs=epochs,
      adversarial=_spec(method, robust_val_size=robust_val_size), **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def images():
  return data.load_arrays("mnist", "test", limit=300)


@pytest.mark.parametrize("method", defenses.ADVERSARIAL_METHODS)
def test_crafted_batches_stay_in_the_ball_and_the_box_and_raise_the_loss(method, images):
  x, y = images[0][:64], images[1][:64]
  model = models.build_model("cw_mnist", seed=0)
  spec = training.AdversarialSpec(method, epsilon=EPS, steps=None if method == "fgsm_rs" else 5)
  steps, step_size = spec.attack_steps()
  wrapper = trainer.DefenseTrainer(model, adversarial=method, epsilon=EPS,
                                   step_size=step_size, steps=steps, seed=3)
  wrapper.compile(optimizer=keras.optimizers.SGD(0.01))
  # As train_step calls it: compiled, on tensors.
  x_adv = tf.function(wrapper.adversarial_batch)(tf.constant(x), tf.constant(y)).numpy()
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.abs(x_adv - x).max() <= EPS + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(x_adv - x).mean() > 0.2 * EPS  # it moved
  clean, adv = model(x).numpy(), model(x_adv).numpy()
  if method == "trades":  # ascends KL(f(x) || f(x'))
    kl = training_attack.kl_divergence(clean, adv).numpy()
    noise = np.clip(x + np.random.default_rng(0).uniform(-EPS, EPS, x.shape), 0, 1)
    kl_noise = training_attack.kl_divergence(clean, model(noise)).numpy()
    assert kl.mean() > 2 * kl_noise.mean()
  else:
    ce = training_attack.cross_entropy(y, adv).numpy()
    assert ce.mean() > training_attack.cross_entropy(y, clean).numpy().mean()


def _robust_accuracy(model, images):
  x, y = images
  return guards.robust_accuracy(model, x, y, EPS, steps=10, seed=1)


@pytest.fixture(scope="module")
def standard_robust_accuracy(tmp_path_factory, images):
  """The PGD-10 accuracy of the standard model (seeded: the same for every method)."""
  tmp = tmp_path_factory.mktemp("standard")
  return _robust_accuracy(defenses.train(_config(tmp, "run", None)).model, images)


@pytest.mark.parametrize("method", defenses.ADVERSARIAL_METHODS)
def test_adversarial_training_raises_pgd_robust_accuracy(method, tmp_path,
                                                         standard_robust_accuracy, images):
  result = defenses.train(_config(tmp_path, "run", method))
  standard = standard_robust_accuracy
  robust = _robust_accuracy(result.model, images)
  # The same data, epochs and seed; only the training step differs.
  assert robust > standard + 0.15, (method, standard, robust)
  assert result.test_accuracy > 0.6, result.test_accuracy  # it still classifies
  guard = result.defense["robust_guard"]
  assert guard["images"] == 100 and set(guard["history"]) == {"0", "1"}


def test_best_robust_epoch_is_restored_exported_and_a_collapse_is_warned(tmp_path, images):
  scripted = iter([0.30, 0.60, 0.10])  # epoch 3 "collapses" below half the best
  weights = []

  def fake_measure(guard):
    weights.append(guard.classifier.get_weights())
    return next(scripted)

  config = defenses.AdversarialTrainingConfig(
      **{**TINY, "train_limit": None, "test_limit": None, "validation_size": None},
      run_dir=str(tmp_path / "run"), epochs=3, adversarial=_spec("fgsm_rs"),
      export_dir=str(tmp_path / "sm"), export_version=1)
  spec = defenses.DataSpec("mnist", train_limit=512, test_limit=200, validation_size=200)
  with mock.patch.object(trainer.RobustAccuracyGuard, "measure", fake_measure), \
      mock.patch.object(guards.logging, "warning") as warning:
    model, record = defenses.adversarially_train(None, spec, config)
  assert record["config"]["train_limit"] == 512  # the DataSpec's limits were applied
  assert len(weights) == 3
  assert warning.call_count == 1 and "collapsed at epoch 3" in warning.call_args[0][0] % (
      warning.call_args[0][1:])
  # The returned and exported model hold epoch 2's weights, not the last epoch's.
  for got, best, last in zip(model.get_weights(), weights[1], weights[2]):
    np.testing.assert_array_equal(got, best)
  assert any(not np.array_equal(b, l) for b, l in zip(weights[1], weights[2]))
  guard = record["results"]["defense"]["robust_guard"]
  assert guard["best_epoch"] == 1 and guard["best_accuracy"] == 0.60
  assert guard["collapses"] == [2]
  assert sorted(p.name for p in (tmp_path / "run").glob("robust_best_*.npz")) == [
      "robust_best_1.npz"]
  saved = json.loads((tmp_path / "run" / "train_result.json").read_text())
  assert saved["defense"]["robust_guard"]["history"] == {"0": 0.3, "1": 0.6, "2": 0.1}
  # Exported as a plain functional model: export.load_model and plain TF serve it.
  path = record["results"]["saved_model_path"]
  x = images[0][:16]
  loaded = export.load_model(path)
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)
  served = tf.saved_model.load(path).signatures[export.SERVING_SIGNATURE]
  np.testing.assert_allclose(served(images=tf.constant(x))["logits"].numpy(),
                             model(x).numpy(), atol=1e-5)
  assert export.read_provenance(path)["defense"]["adversarial"] == "fgsm_rs"
  # TensorBoard: training robust accuracy, and the guard's PGD accuracy.
  from tensorboard.backend.event_processing import event_accumulator
  tags = {}
  for split in ("train", "validation"):
    ea = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard" / split))
    ea.Reload()
    tags[split] = set(ea.Tags()["tensors"]) | set(ea.Tags()["scalars"])
  assert {"epoch_loss", "epoch_robust_accuracy"} <= tags["train"], tags
  assert {"epoch_accuracy", "epoch_pgd_accuracy"} <= tags["validation"], tags


class _Killed(Exception):
  pass


def _resume_config(tmp_path, name):
  """Two epochs on 256 images, the guard on 50 of 100 validation images: the resumed
  run redoes the last epoch (5 epochs in all, not 7 as with 3 epochs on 512)."""
  return _config(tmp_path, name, "pgd", epochs=2, robust_val_size=50, train_limit=256,
                 validation_size=100, test_limit=100)


def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
  # The worst moment: epoch 2's robust check is on disk, its checkpoint is not.
  backup_save = keras.callbacks.BackupAndRestore.on_epoch_end

  def killed_at_epoch_2(self, epoch, logs=None):
    if epoch == 1:
      raise _Killed()
    return backup_save(self, epoch, logs)

  config = _resume_config(tmp_path, "run")
  with mock.patch.object(keras.callbacks.BackupAndRestore, "on_epoch_end", killed_at_epoch_2):
    with pytest.raises(_Killed):
      defenses.train(config)
  assert training.resume_epoch(tmp_path / "run" / "backup") == 1
  held = json.loads((tmp_path / "run" / "robust_guard.json").read_text())
  assert set(held["history"]) == {"0", "1"}  # epoch 2 was measured before the "kill"
  resumed = defenses.train(config)
  assert resumed.epochs_run == 1  # epoch 2 again, from epoch 1's checkpoint
  reference = defenses.train(_resume_config(tmp_path, "reference"))
  for a, b in zip(resumed.model.get_weights(), reference.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert resumed.defense["robust_guard"]["history"] == pytest.approx(
      reference.defense["robust_guard"]["history"])
  assert resumed.defense["robust_guard"]["best_epoch"] == (
      reference.defense["robust_guard"]["best_epoch"])


def test_guard_needs_a_validation_split(tmp_path):
  with pytest.raises(training.ConfigError, match="`robust_val_size`.*`validation_size` is 0"):
    defenses.train(_config(tmp_path, "run", "fgsm_rs", validation_size=0))


def _parsed(*argv):
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  fv = _helpers.fresh_flags()
  fv(["kd-train", *argv])
  return kd_flags.train_config(fv).validate()


def test_adversarial_flags_fill_the_config():
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = _parsed("--adversarial=trades", "--adv_epsilon=0.2", "--adv_steps=7",
                   "--adv_step_size=0.05", "--trades_beta=3", "--robust_val_size=50")
  assert config.adversarial == training.AdversarialSpec("trades", 0.2, 7, 0.05, 3.0, 50)
  assert not _parsed().defended()  # no flag: standard training
  with pytest.raises(flags.IllegalFlagValueError, match="adv_steps"):
    _parsed("--adversarial=fgsm_rs", "--adv_steps=3")


@pytest.mark.parametrize("name, method, steps, step_size, beta", [
    ("mnist_m0_at_pgd", "pgd", 20, 0.0375, None),    # Madry et al.'s 2.5 eps / k rule, 20 steps
    ("mnist_m0_at_fgsm_rs", "fgsm_rs", 1, 0.375, None),  # Wong et al.: 1.25 * 0.3
    ("mnist_m0_trades", "trades", 20, 0.0375, 6.0),  # Zhang et al.'s beta, M0-AT's inner loop
])
def test_flagfiles_hold_the_papers_settings(name, method, steps, step_size, beta):
  import pathlib  # pylint: disable=g-import-not-at-top
  flagfile = pathlib.Path(__file__).resolve().parents[1] / "flags" / f"{name}.flags"
  config = _parsed(f"--flagfile={flagfile}")
  spec = config.adversarial
  assert spec.method == method and spec.epsilon == 0.3
  assert spec.attack_steps() == (steps, pytest.approx(step_size))
  if beta is not None:
    assert spec.trades_beta == beta
  assert config.export_dir == f"saved_models/{name}" and config.deterministic
