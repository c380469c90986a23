"""Tests for keras_defense.defenses: registry, configs, Defensive Dropout, distillation."""

import dataclasses

import numpy as np
import pytest

import _helpers
from keras_defense.models import classifier
from keras_defense import data
from keras_defense import defenses
from keras_defense.models import export
from keras_defense.util import randomness
from keras_defense.defenses import logits_augmentation
from keras_defense import models
from keras_defense.defenses import pruning
from keras_defense import training
from keras_defense.util.compat import tf
from keras_defense.defenses import distillation


def test_registry_lists_every_defense_with_a_config_and_a_function():
  assert set(defenses.REGISTRY) == {"adversarial_training", "distillation",
                                    "defensive_dropout", "pruning", "logits_augmentation"}
  assert defenses.REGISTRY["pruning"][0] is pruning.PruneConfig
  assert defenses.REGISTRY["logits_augmentation"][0] is logits_augmentation.AugmentConfig
  for name, (config_class, fn) in defenses.REGISTRY.items():
    assert dataclasses.is_dataclass(config_class), name
    assert callable(config_class().validate) and callable(fn), name


Spec = training.AdversarialSpec


@pytest.mark.parametrize("config, match", [
    (training.TrainConfig(adversarial=Spec("fgsm")), "`adversarial` must be None or one of"),
    (training.TrainConfig(adversarial="pgd"), "`adversarial` must be None or a training.Adv"),
    (training.TrainConfig(adversarial=Spec("pgd", epsilon=0.0)),
     r"`adv_epsilon` must be in \(0, 1\]"),
    (training.TrainConfig(adversarial=Spec("pgd", epsilon=1.5)),
     r"`adv_epsilon` must be in \(0, 1\]"),
    (training.TrainConfig(adversarial=Spec("pgd", steps=0)), "`adv_steps` must be >= 1"),
    (training.TrainConfig(adversarial=Spec("fgsm_rs", steps=5)), "`adv_steps` must be 1"),
    (training.TrainConfig(adversarial=Spec("pgd", step_size=-0.1)),
     "`adv_step_size` must be > 0"),
    (training.TrainConfig(adversarial=Spec("trades", trades_beta=-1.0)),
     "`trades_beta` must be >= 0"),
    (training.TrainConfig(adversarial=Spec("pgd", robust_val_size=-1)),
     "`robust_val_size` must be >= 0"),
    (training.TrainConfig(temperature=0.0), "`temperature` must be > 0"),
    (training.TrainConfig(adversarial=Spec("pgd"), temperature=10.0),
     "`adversarial`.*`temperature`"),
    (pruning.PruneConfig(adversarial=Spec("fgsm_rs", steps=3)), "`adv_steps` must be 1"),
    (defenses.AdversarialTrainingConfig(adversarial=None), "`adversarial` must be one of"),
    (defenses.DistillationConfig(teacher_model_path="x"), "`teacher_model_path` must be unset"),
    (defenses.DistillationConfig(adversarial=Spec("pgd")), "`adversarial` must be unset"),
    (defenses.DistillationConfig(temperature=-1.0), "`temperature` must be > 0"),
    (defenses.DefensiveDropoutConfig(rate=0.0), r"`rate` must be in \(0, 1\)"),
    (defenses.DefensiveDropoutConfig(rate=1.0), r"`rate` must be in \(0, 1\)"),
    (defenses.DefensiveDropoutConfig(layers="dense1"), "`layers` must be a non-empty tuple"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_bad_config_raises_config_error_naming_the_field(config, match):
  with pytest.raises(training.ConfigError, match=match):
    config.validate()


def test_method_defaults_follow_the_papers():
  assert Spec("fgsm_rs", epsilon=0.3).attack_steps() == (
      1, pytest.approx(0.375))  # Wong et al.: alpha = 1.25 eps
  assert Spec("pgd", epsilon=0.3).attack_steps() == (40, pytest.approx(2.5 * 0.3 / 40))
  assert Spec("trades", steps=40, step_size=0.01).attack_steps() == (40, 0.01)
  assert not training.TrainConfig().defended()


@pytest.mark.parametrize("name, prune", [
    ("mnist_m0_at_pgd", False), ("mnist_m0_trades", False), ("mnist_m1_at_pgd", True)])
def test_the_spec_keeps_the_committed_models_defense_identity(name, prune):
  # Their run directories and SavedModels were made with the six flat fields:
  # the spec must give the same identity, or they would no longer resume.
  import pathlib  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  fv = _helpers.fresh_flags()
  fv(["kd", f"--flagfile={repo / 'flags' / (name + '.flags')}"])
  config = (kd_flags.prune_config if prune else kd_flags.train_config)(fv).validate()
  held = export.read_provenance(repo / "saved_models" / name / "1")["defense"]
  setup = defenses.DefenseSetup("unused", dataset="mnist", seed=0, first_epoch=0, chief=False,
                                adversarial=dataclasses.replace(config.adversarial,
                                                                robust_val_size=0))
  assert config.adversarial.identity() == held and setup.identity() == held


def test_dumps_keep_the_flags_names_in_their_old_order():
  d = training.config_dict(training.TrainConfig(adversarial=Spec("pgd", epsilon=0.1)))
  keys = list(d)
  assert keys[keys.index("verbose") + 1:keys.index("temperature")] == list(
      training.ADVERSARIAL_FLAGS)
  assert (d["adversarial"], d["adv_epsilon"], d["adv_steps"]) == ("pgd", 0.1, None)
  assert training.config_dict(training.TrainConfig())["adv_epsilon"] == 0.3
  assert list(training.config_dict(pruning.PruneConfig()))[-6:] == list(
      training.ADVERSARIAL_FLAGS)


def test_training_takes_the_defense_step_from_its_caller(tmp_path):
  config = training.TrainConfig(run_dir=str(tmp_path / "run"), temperature=10.0)
  with pytest.raises(training.ConfigError, match="got no `defense_factory`.*defenses.train"):
    training.train(config)
  assert not (tmp_path / "run").exists()


def _served(path):
  return tf.saved_model.load(path).signatures[export.SERVING_SIGNATURE]


def test_defensive_dropout_is_random_at_inference_and_serves_randomly(tmp_path):
  base = models.build_model("cw_mnist", seed=0)
  x, _ = data.load_arrays("mnist", "test", limit=8)
  defended, record = defenses.defensive_dropout(
      base, defenses.DataSpec("mnist"), defenses.DefensiveDropoutConfig(rate=0.3))
  assert record["defense"] == "defensive_dropout" and record["randomized"]
  # After every hidden Dense layer (not the logits), as built-in Dropout layers.
  assert record["results"]["dropout_layers"] == ["defensive_dropout_1", "defensive_dropout_2"]
  names = [l.name for l in defended.layers]
  assert names.index("defensive_dropout_1") == names.index("dense1") + 1
  assert names[-1] == models.LOGITS_LAYER_NAME
  # The base model is untouched and deterministic; the defended one is random
  # with or without training=True, and its weights are the base model's.
  np.testing.assert_array_equal(base(x).numpy(), base(x).numpy())
  a, b = defended(x).numpy(), defended(x, training=False).numpy()
  assert np.abs(a - b).max() > 1e-4
  for w0, w1 in zip(base.get_weights(), defended.get_weights()):
    np.testing.assert_array_equal(w0, w1)
  path = export.export_saved_model(defended, tmp_path / "dd", version=1)
  loaded = export.load_model(path)  # built-in layers only: accepted
  assert np.abs(loaded(x).numpy() - loaded(x).numpy()).max() > 1e-4
  serve = _served(path)
  first, second = (serve(images=tf.constant(x))["logits"].numpy() for _ in range(2))
  assert np.abs(first - second).max() > 1e-4
  # Random, not broken: the expected logits are the base model's (inverted dropout).
  mean = np.mean([serve(images=tf.constant(x))["logits"].numpy() for _ in range(64)], axis=0)
  scale = np.abs(base(x).numpy()).mean()
  assert np.abs(mean - base(x).numpy()).mean() < 0.25 * scale


def test_defensive_dropout_layers_have_their_own_streams_and_reseed_repeats_the_masks(
    tmp_path):
  base = models.build_model("cw_mnist", seed=0)
  x, _ = data.load_arrays("mnist", "test", limit=8)
  defended, _ = defenses.defensive_dropout(base, None,
                                           defenses.DefensiveDropoutConfig(rate=0.5))
  defended(x)  # creates the generators
  layers = [l for l in defended.layers if l.name.startswith("defensive_dropout")]
  # Each layer's generator has a key of its own (seeds s and s + 1 would share
  # key 0 and give one stream shifted by one block: the same mask, shifted).
  keys = [int(v.numpy()[-1]) for v in randomness.generator_states(defended)
          if v.name.startswith("defensive_dropout")]
  assert len(set(keys)) == len(keys) == len(layers) == 2 and 0 not in keys
  path = export.export_saved_model(defended, tmp_path / "dd", version=1)
  served = classifier.load_classifier(path, output_key="logits")   # tf.saved_model.load
  for model in (defended, export.load_model(path), served):
    assert len(randomness.generator_states(model)) >= 2
    randomness.reseed(model, 0, "unit")
    first = np.asarray(model(x))
    assert np.abs(np.asarray(model(x)) - first).max() > 1e-4  # the state moved on
    randomness.reseed(model, 0, "unit")
    np.testing.assert_array_equal(np.asarray(model(x)), first)
    randomness.reseed(model, 0, "another unit")
    assert np.abs(np.asarray(model(x)) - first).max() > 1e-4
  # A deterministic model's outputs do not depend on reseeding.
  out = base(x).numpy()
  randomness.reseed(base, 0, "unit")
  np.testing.assert_array_equal(base(x).numpy(), out)


def test_defensive_dropout_refuses_unknown_layers():
  with pytest.raises(training.ConfigError, match="`layers` names layers"):
    defenses.defensive_dropout(models.build_model("cw_mnist"), None,
                               defenses.DefensiveDropoutConfig(layers=("dense9",)))


def test_distillation_student_learns_the_teacher_and_is_deployed_at_t1(tmp_path):
  config = defenses.DistillationConfig(
      run_dir=str(tmp_path / "run"), epochs=1, temperature=20.0, optimizer="adam",
      learning_rate=3e-3, lr_decay_epochs=(5,), batch_size=64,
      export_dir=str(tmp_path / "sm"), export_version=1, verbose=0)
  student, record = defenses.distill(
      None, defenses.DataSpec("mnist", train_limit=2048, test_limit=300, validation_size=100),
      config)
  assert record["defense"] == "distillation" and record["deployed_temperature"] == 1.0
  assert record["config"]["temperature"] == 20.0
  x, y = data.load_arrays("mnist", "test", limit=300)
  teacher = export.load_model(tmp_path / "run" / "teacher_model" / "1")
  # The student was trained on the teacher's soft labels: it agrees with it
  # far above chance (0.1), and it learned the task.
  agree = np.mean(np.argmax(student(x).numpy(), 1) == np.argmax(teacher(x).numpy(), 1))
  assert agree > 0.6, agree
  assert record["results"]["test_accuracy"] > 0.5, record["results"]["test_accuracy"]
  assert record["results"]["defense"] == {"temperature": 20.0,
                                          "teacher_model_path": str(
                                              tmp_path / "run" / "teacher_model" / "1")}
  # Deployed at T = 1: the SavedModel returns the student's own logits, not logits / T.
  served = _served(record["results"]["saved_model_path"])(images=tf.constant(x))["logits"]
  np.testing.assert_allclose(served.numpy(), student(x).numpy(), rtol=1e-5, atol=1e-4)
  assert export.read_provenance(record["results"]["saved_model_path"])["defense"] == (
      record["results"]["defense"])
  # Training at T makes the logits large: at T = 1 the softmax is far more
  # confident than the same logits at T.
  logits = student(x).numpy()
  confidence = np.mean(np.max(tf.nn.softmax(logits).numpy(), 1))
  assert confidence > 0.9, confidence
  assert distillation.DEFAULT_TEMPERATURE == 100.0


def test_distillation_flagfiles_are_m0s_recipe_at_t100():
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top

  def parsed(*argv):
    fv = _helpers.fresh_flags()
    fv(["kd-train", *argv])
    return kd_flags.train_config(fv).validate()

  repo = pathlib.Path(__file__).resolve().parents[1]
  cwd = os.getcwd()
  os.chdir(repo)  # the flagfiles name each other relative to the repository
  try:
    m0 = parsed("--flagfile=flags/mnist_m0.flags")
    teacher = parsed("--flagfile=flags/mnist_distilled_teacher.flags")
    student = parsed("--flagfile=flags/mnist_distilled.flags")
  finally:
    os.chdir(cwd)
  assert m0.temperature == 1.0 and m0.teacher_model_path is None and not m0.defended()
  assert teacher.temperature == 100.0 and teacher.teacher_model_path is None
  assert student.temperature == 100.0
  assert student.teacher_model_path == "saved_models/mnist_distilled_teacher/1"
  assert teacher.export_dir == "saved_models/mnist_distilled_teacher"
  assert student.export_dir == "saved_models/mnist_distilled"
  assert teacher.defended() and student.defended()
  differ = {"temperature", "teacher_model_path", "run_dir", "export_dir"}
  for config in (teacher, student):
    a, b = dataclasses.asdict(m0), dataclasses.asdict(config)
    assert {k for k in a if a[k] != b[k]} <= differ, config
  with pytest.raises(absl_flags.IllegalFlagValueError, match="temperature"):
    parsed("--temperature=0")
