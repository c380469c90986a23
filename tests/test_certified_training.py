"""Tests for certified training (IBP, CROWN-IBP) as a trained defense (defenses.trainer)."""

import json

from absl import flags
import numpy as np
import pytest

import _helpers
from keras_defense import certify
from keras_defense import data
from keras_defense import defenses
from keras_defense import training
from keras_defense.certify import losses
from keras_defense.defenses import trainer
from keras_defense.models import export
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


@pytest.fixture(scope="module")
def mnist():
  x, y = data.load_arrays("mnist", "train", limit=512)
  xt, yt = data.load_arrays("mnist", "test", limit=500)
  return x, y.astype(np.int64), xt, yt.astype(np.int64)


def _tiny(seed=0):
  """A small conv net of the layers the bounds read (fast to train and to bound)."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.layers.Input((28, 28, 1)),
      keras.layers.Conv2D(8, 4, strides=2, activation="relu"),
      keras.layers.Conv2D(16, 4, strides=2, activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
      keras.layers.Dense(10)])


def _wrapper(model, certified="ibp", schedule=None, lr=1e-3):
  schedule = schedule or losses.CertifiedSchedule(0.1, 0, 0, 0.5)
  wrapper = trainer.DefenseTrainer(model, certified=certified, schedule=schedule)
  wrapper.compile(optimizer=keras.optimizers.Adam(lr))
  wrapper(tf.zeros([1, *model.input_shape[1:]]))
  return wrapper


# --- the schedule -----------------------------------------------------------------

def test_ramps_are_functions_of_the_step():
  schedule = losses.CertifiedSchedule(0.4, 100, 1000, 0.5)
  for step, want in [(0, (0.0, 1.0, 1.0)), (100, (0.0, 1.0, 1.0)), (600, (0.2, 0.75, 0.5)),
                     (1100, (0.4, 0.5, 0.0)), (50_000, (0.4, 0.5, 0.0))]:
    np.testing.assert_allclose(schedule(step), want, atol=1e-7)
    # The compiled step reads the optimizer's counter: the same values from a tensor.
    np.testing.assert_allclose([float(v) for v in schedule(tf.constant(step, tf.int64))],
                               want, atol=1e-6)
  # No ramp: the target from the end of the warm-up on.
  assert losses.CertifiedSchedule(0.3, 10, 0)(9)[0] == 0.0
  assert losses.CertifiedSchedule(0.3, 10, 0)(10)[0] == 0.3
  assert float(losses.CertifiedSchedule(0.3, 10, 0)(tf.constant(10))[0]) == pytest.approx(0.3)
  spec = training.CertifiedSpec("ibp", warmup_epochs=0.5, ramp_epochs=2.25)
  assert spec.ramp_steps(100) == (50, 225)


def test_a_restored_trainer_continues_the_ramp_where_it_stopped(mnist, tmp_path):
  """What BackupAndRestore gives a run resumed after kill -9: the step counter, so ε."""
  x, y = mnist[0][:64], mnist[1][:64]
  schedule = losses.CertifiedSchedule(0.2, 2, 10, 0.5)
  first = _wrapper(_tiny(), schedule=schedule)
  for _ in range(5):
    logs = first.train_on_batch(x, y, return_dict=True)
  assert logs["cert_epsilon"] == pytest.approx(schedule(4)[0])  # steps 0..4 ran
  path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "c"))
  resumed = _wrapper(_tiny(seed=1), schedule=schedule)
  tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
  assert int(resumed.optimizer.iterations) == 5
  logs = resumed.train_on_batch(x, y, return_dict=True)
  assert logs["cert_epsilon"] == pytest.approx(schedule(5)[0])
  assert logs["cert_kappa"] == pytest.approx(schedule(5)[1])


# --- the training step -----------------------------------------------------------

def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])


def test_ibp_training_certifies_more_than_standard_training(mnist):
  x, y, xt, yt = mnist
  standard = _mlp()
  standard.compile(optimizer=keras.optimizers.Adam(1e-2),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  standard.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
  ibp = _mlp()
  # 16 steps per epoch: 8 warm-up steps, then ε ramped to 0.1 over 16 steps.
  _wrapper(ibp, schedule=losses.CertifiedSchedule(0.1, 8, 16, 0.5), lr=1e-2).fit(
      x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
  cert_standard = certify.certify(standard, xt, yt, 0.05).mean()
  cert_ibp = certify.certify(ibp, xt, yt, 0.05).mean()
  clean_ibp = np.mean(np.argmax(ibp.predict(xt, verbose=0), -1) == yt)
  # Seen once (500 test images, eps 0.05): standard 0.084, IBP 0.376 certified; IBP clean 0.75.
  assert cert_ibp >= cert_standard + 0.15, (cert_standard, cert_ibp)
  assert clean_ibp >= cert_ibp


def test_the_step_logs_the_batch_certified_accuracy_and_skips_the_bound_in_warm_up(mnist):
  x, y = mnist[0][:64], mnist[1][:64]
  wrapper = _wrapper(_tiny(), schedule=losses.CertifiedSchedule(0.1, 1, 0, 0.5))
  warm = wrapper.train_on_batch(x, y, return_dict=True)
  assert warm["cert_epsilon"] == 0.0 and warm["cert_kappa"] == 1.0
  # In warm-up (ε 0) the "worst case" is the clean point: certified = correct.
  np.testing.assert_allclose(warm["certified_accuracy"], warm["accuracy"])
  wrapper.reset_metrics()
  logs = wrapper.train_on_batch(x, y, return_dict=True)
  assert logs["cert_epsilon"] == pytest.approx(0.1)
  assert logs["certified_accuracy"] <= logs["accuracy"]


def test_crown_ibp_mixes_the_bounds_with_beta_and_trains(mnist):
  x, y = tf.constant(mnist[0][:16]), tf.constant(mnist[1][:16])
  model = _tiny()
  ibp = losses.worst_case_logits(model, x, y, 0.02, method="ibp")
  np.testing.assert_allclose(
      losses.worst_case_logits(model, x, y, 0.02, method="crown_ibp", beta=0.0), ibp)
  crown = losses.worst_case_logits(model, x, y, 0.02, method="crown_ibp", beta=1.0)
  half = losses.worst_case_logits(model, x, y, 0.02, method="crown_ibp", beta=0.5)
  np.testing.assert_allclose(half, (ibp + crown) / 2, rtol=1e-4, atol=1e-4)
  wrapper = _wrapper(model, certified="crown_ibp",
                     schedule=losses.CertifiedSchedule(0.05, 0, 4, 0.5))
  first = wrapper.train_on_batch(x, y, return_dict=True)["loss"]
  for _ in range(4):
    logs = wrapper.train_on_batch(x, y, return_dict=True)
  assert np.isfinite(logs["loss"]) and np.isfinite(first)


# --- kd-train end to end ----------------------------------------------------------

def test_kd_train_certified_keeps_the_best_certified_epoch(tmp_path):
  # (Resume after kill -9: BackupAndRestore restores the optimizer's step counter, which
  # the ramps read; test_a_restored_trainer_continues_the_ramp_where_it_stopped.)
  spec = training.CertifiedSpec("ibp", epsilon=0.1, warmup_epochs=0.5, ramp_epochs=1.0,
                                val_epsilon=0.05, val_size=100)
  config = training.TrainConfig(
      dataset="mnist", model="cw_mnist", run_dir=str(tmp_path / "run"), epochs=2,
      train_limit=128, test_limit=100, validation_size=200, batch_size=64, optimizer="adam",
      learning_rate=1e-3, lr_decay_epochs=(9,), dropout=0.0, certified=spec, verbose=0,
      export_dir=str(tmp_path / "sm"), export_version=1)
  assert config.defended()
  result = defenses.train(config)
  assert result.epochs_run == 2
  guard = result.defense["certified_guard"]
  assert sorted(guard["history"]) == ["0", "1"] and guard["epsilon"] == 0.05
  assert result.defense["certified"] == "ibp"
  state = json.loads((tmp_path / "run" / "certified_guard.json").read_text())
  assert state["best_epoch"] == guard["best_epoch"]
  assert list((tmp_path / "run").glob("certified_best_*.npz")) == [
      tmp_path / "run" / f"certified_best_{guard['best_epoch']}.npz"]
  record = export.read_provenance(result.saved_model_path)
  assert record["defense"]["certified"] == "ibp"
  dumped = json.loads((tmp_path / "run" / "train_result.json").read_text())
  assert dumped["config"]["certified"] == "ibp" and dumped["config"]["cert_val_size"] == 100


# --- validation ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value,flag", [
    ("method", "crown", "certified"), ("epsilon", 0.0, "cert_epsilon"),
    ("warmup_epochs", -1.0, "cert_warmup_epochs"), ("ramp_epochs", -0.5, "cert_ramp_epochs"),
    ("kappa_final", 1.5, "cert_kappa_final"), ("val_epsilon", 2.0, "cert_val_epsilon"),
    ("val_size", -1, "cert_val_size")])
def test_bad_spec_names_the_flag(field, value, flag):
  spec = training.CertifiedSpec(**{"method": "ibp", field: value})
  with pytest.raises(training.ConfigError, match=f"`{flag}`"):
    training.TrainConfig(certified=spec).validate()


def test_certified_does_not_combine_with_other_defenses():
  spec = training.CertifiedSpec("ibp")
  with pytest.raises(training.ConfigError, match="`certified`.*`adversarial`"):
    training.TrainConfig(certified=spec,
                         adversarial=training.AdversarialSpec("pgd")).validate()
  with pytest.raises(training.ConfigError, match="`compute_dtype`"):
    training.TrainConfig(certified=spec, compute_dtype="bfloat16").validate()
  with pytest.raises(training.ConfigError, match="`certified` must be None or a"):
    training.TrainConfig(certified="ibp").validate()


def _parsed(*argv):
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  fv = _helpers.fresh_flags()
  fv(["kd-train", *argv])
  return fv


def test_flags_fill_the_spec_and_bad_flags_name_themselves():
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  config = kd_flags.train_config(_parsed(
      "--certified=crown_ibp", "--cert_epsilon=0.2", "--cert_warmup_epochs=0.5",
      "--cert_ramp_epochs=3", "--cert_kappa_final=0", "--cert_val_epsilon=0.1",
      "--cert_val_size=50")).validate()
  assert config.certified == training.CertifiedSpec("crown_ibp", 0.2, 0.5, 3.0, 0.0, 0.1, 50)
  assert kd_flags.train_config(_parsed()).certified is None
  for argv, name in [(["--certified=crown"], "certified"), (["--cert_epsilon=0"], "cert_epsilon"),
                     (["--cert_kappa_final=2"], "cert_kappa_final"),
                     (["--cert_ramp_epochs=-1"], "cert_ramp_epochs"),
                     (["--certified=ibp", "--adversarial=pgd"], "certified")]:
    with pytest.raises(flags.IllegalFlagValueError, match=name):
      _parsed(*argv)
  prune = kd_flags.prune_config(_parsed("--certified=ibp", "--cert_epsilon=0.3"))
  assert prune.validate().certified == training.CertifiedSpec("ibp", 0.3)


# --- certified robust pruning -----------------------------------------------------

def test_bounds_read_a_model_being_pruned_as_its_stripped_model(mnist):
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
  x, y = mnist[0][:32], mnist[1][:32]
  wrapped = pruning.prune_model(_tiny(), dense_sparsity=0.8, conv_sparsity=0.8, begin_step=0,
                                end_step=2, frequency=1, initial_sparsity=0.8)
  wrapper = _wrapper(wrapped, schedule=losses.CertifiedSchedule(0.05, 0, 0, 0.5))
  wrapper.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=pruning.pruning_callbacks(None))
  stripped = pruning.strip_pruning(wrapped)
  assert np.mean(stripped.layers[0].kernel.numpy() == 0) >= 0.79  # masked in place
  np.testing.assert_allclose(certify.margin_bounds(wrapped, x, y, 0.05),
                             certify.margin_bounds(stripped, x, y, 0.05), rtol=1e-5, atol=1e-5)


def test_certified_and_adversarial_pruning_do_not_combine():
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
  with pytest.raises(training.ConfigError, match="`certified`.*`adversarial`"):
    pruning.PruneConfig(certified=training.CertifiedSpec("ibp"),
                        adversarial=training.AdversarialSpec("pgd")).validate()
  with pytest.raises(training.ConfigError, match="`cert_epsilon`"):
    pruning.PruneConfig(certified=training.CertifiedSpec("ibp", epsilon=2.0)).validate()
