"""Hardening a user's own Keras 3 model: the bridge, kd-train --init_model, kd-prune, BN."""

import json
from unittest import mock

import numpy as np
import pytest

import _helpers
from keras_defense import data
from keras_defense import defenses
from keras_defense import training
from keras_defense.defenses import pruning
from keras_defense.defenses import trainer
from keras_defense.models import export
from keras_defense.models import keras_bridge
from keras_defense.models import user_model
from keras_defense.util.compat import keras as tf_keras
from keras_defense.util.compat import tf

keras3 = keras_bridge.keras3()

# A few hundred MNIST images, 1 epoch, a 2-step PGD: the path, not the numbers.
TINY = dict(dataset="mnist", train_limit=128, test_limit=50, validation_size=50,
            batch_size=64, optimizer="adam", learning_rate=1e-3, verbose=0)
SPEC = training.AdversarialSpec("pgd", epsilon=0.3, steps=2, robust_val_size=32)


def residual_keras3(width: int = 4) -> "keras3.Model":
  """conv + BN + ReLU, a residual block (conv + BN, Add), GAP, Dense logits: Keras 3."""
  L = keras3.layers
  inputs = keras3.Input((28, 28, 1), name="images")
  x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(
      L.Conv2D(width, 3, strides=2, padding="same", name="stem_conv")(inputs)))
  y = L.BatchNormalization(name="block_bn")(L.Conv2D(width, 3, padding="same",
                                                     name="block_conv")(x))
  x = L.ReLU(name="block_out")(L.Add(name="block_add")([x, y]))
  logits = L.Dense(10, name="logits")(L.GlobalAveragePooling2D(name="gap")(x))
  return keras3.Model(inputs, logits, name="tiny_residual")


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory):
  """The tiny residual model trained naturally in Keras 3 (1 epoch, 128 images), saved."""
  keras3.utils.set_random_seed(0)
  x, y = data.load_arrays("mnist", "train", limit=128, validation_size=50)
  model = residual_keras3()
  model.compile(optimizer="adam",
                loss=keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, batch_size=64, epochs=1, verbose=0)
  path = tmp_path_factory.mktemp("user") / "m.keras"
  model.save(str(path))
  return path


def test_bridge_rebuilds_the_residual_model_and_back_with_the_same_logits(keras3_file):
  k3 = keras3.saving.load_model(str(keras3_file), safe_mode=True, compile=False)
  model = keras_bridge.to_tf_keras(k3)
  assert isinstance(model, tf_keras.Model)
  assert [l.name for l in model.layers] == [l.name for l in k3.layers]
  x = keras_bridge.probe_batch(k3, batch=16, seed=1)
  diff = np.max(np.abs(np.asarray(k3(x, training=False)) - model(x, training=False).numpy()))
  assert diff <= 1e-5
  back = keras_bridge.to_keras3(model)
  assert isinstance(back, keras3.Model)
  for a, b in zip(back.get_weights(), k3.get_weights()):
    np.testing.assert_array_equal(a, b)
  # The file detection and loader pick the bridge for a Keras 3 file.
  assert user_model.keras_major_version(keras3_file) == 3
  user = user_model.load_user_model(keras3_file)
  assert (user.kind, user.keras_major) == ("keras3", 3)


def test_bridge_lists_custom_layers_and_refuses_subclassed_models(tmp_path):
  class Doubler(keras3.layers.Layer):
    def call(self, x):
      return 2 * x

  inputs = keras3.Input((4,))
  model = keras3.Model(inputs, keras3.layers.Dense(2)(Doubler(name="doubler")(inputs)))
  with pytest.raises(keras_bridge.BridgeError, match=r"doubler \(Doubler.*a custom layer"):
    keras_bridge.to_tf_keras(model)

  class Sub(keras3.Model):
    def call(self, x):
      return x

  with pytest.raises(keras_bridge.BridgeError, match="Sub .* subclassed model"):
    keras_bridge.to_tf_keras(Sub())
  # From a file: refused before anything is deserialized, every offender listed.
  keras3.saving.register_keras_serializable("Test")(Doubler)
  path = tmp_path / "custom.keras"
  model.save(str(path))
  with pytest.raises(keras_bridge.BridgeError, match=r"doubler \(Doubler.*Test>Doubler"):
    user_model.load_user_model(path)


def test_bridge_names_the_layer_where_the_logits_part(keras3_file):
  k3 = keras3.saving.load_model(str(keras3_file), safe_mode=True, compile=False)
  model = keras_bridge.to_tf_keras(k3)
  bn = model.get_layer("block_bn")
  gamma, beta, mean, var = bn.get_weights()
  bn.set_weights([gamma, beta + 0.5, mean, var])
  with pytest.raises(keras_bridge.BridgeError,
                     match=r"logits differ by up to .* first difference at layer 'block_bn'"):
    keras_bridge.check_same_logits(k3, model, keras3, tf_keras)


def test_crafting_leaves_batchnorm_statistics_and_the_loss_step_updates_them():
  inputs = tf_keras.Input((28, 28, 1))
  x = tf_keras.layers.BatchNormalization(name="bn")(tf_keras.layers.Conv2D(4, 3)(inputs))
  logits = tf_keras.layers.Dense(10)(tf_keras.layers.GlobalAveragePooling2D()(x))
  model = tf_keras.Model(inputs, logits)
  wrapped = trainer.DefenseTrainer(model, adversarial="pgd", epsilon=0.3, step_size=0.1,
                                   steps=5)
  wrapped.compile(optimizer=tf_keras.optimizers.SGD(0.01))
  x = tf.random.uniform([16, 28, 28, 1], seed=0)
  y = tf.zeros([16], tf.int64)
  wrapped(x)  # builds the optimizer's step counter's owner
  bn = model.get_layer("bn")
  before = [v.numpy().copy() for v in (bn.moving_mean, bn.moving_variance)]
  x_adv = wrapped.adversarial_batch(x, y)
  assert float(tf.reduce_max(tf.abs(x_adv - x))) > 0  # it did craft
  for v, b in zip((bn.moving_mean, bn.moving_variance), before):
    np.testing.assert_array_equal(v.numpy(), b)
  wrapped.train_step((x, y))
  assert not np.allclose(bn.moving_mean.numpy(), before[0])  # train mode on the adv. batch


class _Killed(Exception):
  pass


def test_kd_train_init_model_pgd_resumes_after_a_kill_and_gives_the_model_back(keras3_file,
                                                                              tmp_path):
  # The cheap kill of test_adversarial_training: epoch 2 ends before its checkpoint.
  backup_save = tf_keras.callbacks.BackupAndRestore.on_epoch_end

  def killed_at_epoch_2(self, epoch, logs=None):
    if epoch == 1:
      raise _Killed()
    return backup_save(self, epoch, logs)

  config = training.TrainConfig(
      init_model=str(keras3_file), run_dir=str(tmp_path / "run"), epochs=2,
      adversarial=SPEC, export_dir=str(tmp_path / "sm"), export_version=1, **TINY)
  with mock.patch.object(tf_keras.callbacks.BackupAndRestore, "on_epoch_end",
                         killed_at_epoch_2):
    with pytest.raises(_Killed):
      defenses.train(config)
  assert training.resume_epoch(tmp_path / "run" / "backup") == 1
  result = defenses.train(config)
  assert result.epochs_run == 1  # epoch 1 came from the checkpoint, not from m.keras
  assert set(result.defense["robust_guard"]["history"]) == {"0", "1"}
  assert result.defense["robust_guard"]["images"] == 32
  assert result.saved_model_path == str(tmp_path / "sm" / "1")
  assert result.keras_path == str(tmp_path / "sm" / "1.keras")
  assert (tmp_path / "run" / "tensorboard").is_dir()
  record = export.read_provenance(result.saved_model_path)
  assert record["init_model"] == str(keras3_file) and record["init_model_kind"] == "keras3"
  identity = json.loads((tmp_path / "run" / "run.json").read_text())
  assert identity["model"] == f"init_model:{keras3_file}"
  # The user's format back: Keras 3, the trained weights.
  assert user_model.keras_major_version(result.keras_path) == 3
  back = keras3.saving.load_model(result.keras_path, safe_mode=True, compile=False)
  x = keras_bridge.probe_batch(back)
  served = export.load_model(result.saved_model_path)
  np.testing.assert_allclose(np.asarray(back(x, training=False)),
                             served(x, training=False).numpy(), atol=1e-5)


def test_kd_prune_adversarial_prunes_conv_and_dense_and_leaves_batchnorm(keras3_file,
                                                                         tmp_path):
  config = pruning.PruneConfig(
      base_model_path=str(keras3_file), run_dir=str(tmp_path / "run"), finetune_epochs=1,
      pruning_end_epoch=1.0, pruning_frequency=1, dense_sparsity=0.8, conv_sparsity=0.8,
      adversarial=SPEC, export_dir=str(tmp_path / "sm"), export_version=1,
      **{k: v for k, v in TINY.items()})
  result = pruning.prune(config)
  pruned = result.report.pruned
  assert {r["name"] for r in pruned["layers"]} == {"stem_conv", "block_conv", "logits"}
  for row in pruned["layers"]:
    assert row["kept_fraction"] <= 0.2 + 1e-9, row
  left = {r["name"]: r for r in pruned["left_unpruned"]}
  assert set(left) == {"stem_bn", "block_bn"} and left["stem_bn"]["type"] == (
      "BatchNormalization")
  assert result.report.kernel_compression_ratio >= 4.5  # 1 / 0.2, less the kept biases
  # The whole model counts BatchNorm's weights, so it compresses less.
  assert 1.0 < result.report.model_compression_ratio < result.report.compression_ratio
  assert result.defense["adv_steps"] == 2
  assert user_model.keras_major_version(result.keras_path) == 3


@pytest.mark.parametrize("fields, match", [
    (dict(init_model="m.keras", model="cw_mnist"), "`init_model` .* cannot be combined"),
    (dict(init_model="m.keras", compute_dtype="bfloat16"), "`init_model` .* cannot be combined"),
    (dict(export_keras="out.keras"), "`export_keras` .* goes with `init_model`"),
])
def test_bad_init_model_config(fields, match):
  with pytest.raises(training.ConfigError, match=match):
    training.TrainConfig(**fields).validate()


def test_init_model_of_another_image_shape_is_refused_before_training(tmp_path):
  path = tmp_path / "rgb.keras"
  inputs = keras3.Input((32, 32, 3))
  keras3.Model(inputs, keras3.layers.Dense(10)(keras3.layers.Flatten()(inputs))).save(str(path))
  config = training.TrainConfig(init_model=str(path), run_dir=str(tmp_path / "run"), **TINY)
  with pytest.raises(training.ConfigError, match=r"takes images of shape \[32, 32, 3\]"):
    defenses.train(config)
  assert not (tmp_path / "run" / "backup").exists()


def test_a_missing_init_model_is_named_before_training(tmp_path):
  missing = tmp_path / "stage1" / "1"
  config = training.TrainConfig(init_model=str(missing), run_dir=str(tmp_path / "run"), **TINY)
  with pytest.raises(training.ConfigError,
                     match=r"`init_model` '.*stage1/1' does not exist; .* Make it first"):
    defenses.train(config)
  assert not (tmp_path / "run" / "backup").exists()


def test_the_flagfile_fills_an_init_model_pgd_config():
  import pathlib  # pylint: disable=g-import-not-at-top
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  flagfile = pathlib.Path(__file__).resolve().parents[1] / "flags" / "harden_your_model.flags"
  fv = _helpers.fresh_flags()
  fv(["kd-train", f"--flagfile={flagfile}", "--export_keras=out/m_at.keras"])
  config = kd_flags.train_config(fv).validate()
  assert (config.init_model, config.model, config.export_keras) == (
      "m.keras", None, "out/m_at.keras")
  assert config.adversarial.attack_steps() == (10, pytest.approx(0.075))


def test_tf_keras_files_and_savedmodels_load_directly_and_go_back_as_keras_2(tmp_path):
  inputs = tf_keras.Input((28, 28, 1))
  model = tf_keras.Model(inputs, tf_keras.layers.Dense(10)(tf_keras.layers.Flatten()(inputs)))
  model.save(str(tmp_path / "m2.keras"))
  model.save(str(tmp_path / "m2.h5"))
  export.export_saved_model(model, tmp_path / "sm", version=1)
  for name, kind in (("m2.keras", "tf_keras"), ("m2.h5", "tf_keras"), ("sm/1", "saved_model")):
    user = user_model.load_user_model(tmp_path / name)
    assert (user.kind, user.keras_major) == (kind, 2), name
  assert user_model.keras_major_version(tmp_path / "m2.keras") == 2
  out = user_model.save_user_format(user.model, tmp_path / "back.keras", keras_major=2)
  assert user_model.keras_major_version(out) == 2
  with pytest.raises(export.ModelLoadError, match="does not exist"):
    user_model.load_user_model(tmp_path / "nope.keras")
