"""Training of the C&W classifiers: config in, trained model + SavedModel out.

Keras ``fit`` with a progress bar, TensorBoard scalars (loss, accuracy, learning
rate) under ``<run_dir>/tensorboard``, a checkpoint every epoch under
``<run_dir>/backup`` (``BackupAndRestore``: rerunning after a crash resumes from
the last finished epoch, so ``kill -9`` loses at most the current epoch), and a
final SavedModel export.

Recipe defaults follow C&W 2017 (SGD, momentum 0.9, Nesterov, batch 128) with a
stepped learning rate, which reaches the paper's accuracy in fewer epochs.

Trained defenses run on this same loop, supplied by their caller: with
``adversarial``, ``temperature`` or ``teacher_model_path`` set, ``train``
needs a ``defense_factory`` (``defenses.trainer.defense_factory``; or call
``defenses.train``, which passes it) whose ``Defense`` wraps the model in its
training step (adversarial batches crafted inside the compiled step; a
per-epoch PGD check keeps the most robust epoch); the plain functional model
is exported. With them unset, training is exactly as before.

Example:
  >>> result = train(TrainConfig(dataset="mnist", run_dir="/tmp/m0", epochs=10))
  >>> result.test_accuracy
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable, Protocol

from keras_defense import data
from keras_defense import models
from keras_defense.training import distribution
from keras_defense.training import initial_model
from keras_defense.training.config import claim_run_dir
from keras_defense.training.config import config_dict
from keras_defense.training.config import ConfigError
from keras_defense.training.config import TrainConfig
from keras_defense.util import io_utils
from keras_defense.util import provenance
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


@dataclasses.dataclass
class TrainResult:
  """What ``train`` produced."""
  model: keras.Model
  test_accuracy: float
  test_loss: float
  epochs_run: int
  wall_seconds: float
  saved_model_path: str | None
  defense: dict | None = None  # trained defenses: what was on, the robust-accuracy guard
  keras_path: str | None = None  # init_model: the trained model in the user's format

  def to_dict(self) -> dict:
    out = {"test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
           "epochs_run": self.epochs_run, "wall_seconds": self.wall_seconds,
           "saved_model_path": self.saved_model_path}
    if self.keras_path is not None:
      out["keras_path"] = self.keras_path
    if self.defense is not None:
      out["defense"] = self.defense
    return out


class Defense(Protocol):
  """A trained defense's training step, as ``train`` uses it.

  ``defenses.trainer.DefenseSetup`` is one; ``train`` gets it from the
  ``defense_factory`` its caller passes.
  """

  def identity(self) -> dict:
    """The defense's settings: part of the run-dir identity and the SavedModel provenance."""

  def wrap(self, model: keras.Model, optimizer) -> keras.Model:
    """The compiled model ``fit`` trains instead of ``model`` (which is exported)."""

  def callbacks(self) -> list:
    """Callbacks to run before the checkpoint callback."""

  def restore_best(self) -> None:
    """Gives ``model`` the weights to keep, after ``fit``."""

  def summary(self) -> dict:
    """JSON-able: the settings and what the defense measured (``TrainResult.defense``)."""


# defense_factory(run_dir, *, first_epoch, chief, data_dir, manual_dir,
# validation_size) -> Defense; see ``train``.
DefenseFactory = Callable[..., Defense]


def setup_determinism(seed: int, deterministic: bool) -> None:
  """Seeds Python, NumPy and TF; optionally enables TF op determinism."""
  keras.utils.set_random_seed(int(seed))
  if deterministic:
    tf.config.experimental.enable_op_determinism()


def step_schedule(base_lr: float, decay_epochs, factor: float):
  """lr(epoch) = base_lr * factor ** (number of decay epochs <= epoch)."""
  decay_epochs = sorted(int(e) for e in decay_epochs)
  def schedule(epoch, lr=None):  # pylint: disable=unused-argument
    return float(base_lr * factor ** sum(epoch >= e for e in decay_epochs))
  return schedule


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                   nesterov: bool = True) -> keras.optimizers.Optimizer:
  if name == "sgd":
    return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)
  return keras.optimizers.Adam(learning_rate)


def compile_classifier(model: keras.Model, optimizer) -> keras.Model:
  """Compiles ``model`` (logits out) with sparse CE and accuracy."""
  model.compile(
      optimizer=optimizer,
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
  return model


def build_for_training(name: str, input_shape, num_classes: int, *, dropout: float,
                       seed: int, compute_dtype: str) -> keras.Model:
  """Builds the model, under ``mixed_bfloat16`` if asked (float32 logits out)."""
  if compute_dtype == "float32":
    return models.build_model(name, input_shape=input_shape,
                              num_classes=num_classes, dropout=dropout, seed=seed)
  old = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = models.build_model(name, input_shape=input_shape,
                               num_classes=num_classes, dropout=dropout, seed=seed)
  finally:
    keras.mixed_precision.set_global_policy(old)
  return model


def to_float32(model: keras.Model, seed: int = 0) -> keras.Model:
  """A float32 copy of a (possibly mixed-precision) functional model."""
  if all(l.dtype_policy.name == "float32" for l in model.layers):
    return model
  old = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    config = model.get_config()
    for layer in config["layers"]:
      layer["config"]["dtype"] = "float32"
    clone = keras.Model.from_config(config)
  finally:
    keras.mixed_precision.set_global_policy(old)
  clone.set_weights(model.get_weights())
  return clone


def fit_datasets(config: Any, strategy: Any, num_validation: int, *, epochs: int,
                 first_epoch: int, shard_test: bool = True) -> tuple[Any, Any, Any, int]:
  """The datasets a fit reads: ``config``'s train epochs, validation and test splits.

  Epoch e's batch order depends only on (seed, e): a run resumed from its last
  epoch checkpoint (``first_epoch``) sees the batches an uninterrupted run
  would have. Multi-worker: the splits are sharded element-wise for ``strategy``
  (a no-op for one process); the test split only with ``shard_test`` (fine
  tuning evaluates it itself, outside the strategy).

  Args:
    config: a config with the fit fields (``check_fit_fields``): dataset,
      batch_size, seed, train_limit, test_limit, data_dir, manual_dir,
      validation_size.
    strategy: the run's ``tf.distribute`` strategy.
    num_validation: images in the validation split (0: no validation set).
    epochs: epochs of the whole run.
    first_epoch: the epoch the run starts (or resumes) at.
    shard_test: shard the test split too.

  Returns:
    (train_ds, val_ds or None, test_ds, steps_per_epoch).
  """
  common = dict(data_dir=config.data_dir, manual_dir=config.manual_dir,
                validation_size=config.validation_size)
  train_ds, steps_per_epoch = data.load_epochs(
      config.dataset, "train", batch_size=config.batch_size, seed=config.seed,
      epochs=epochs, first_epoch=first_epoch, limit=config.train_limit, **common)
  val_ds = None
  if num_validation > 0:
    val_ds = data.load_split(config.dataset, "validation", batch_size=1000,
                             limit=config.test_limit, **common)
  test_ds = data.load_split(config.dataset, "test", batch_size=1000,
                            limit=config.test_limit, **common)
  train_ds, val_ds = (None if d is None else distribution.shard_by_data(d, strategy)
                      for d in (train_ds, val_ds))
  if shard_test:
    test_ds = distribution.shard_by_data(test_ds, strategy)
  return train_ds, val_ds, test_ds, steps_per_epoch


def train(config: TrainConfig, *,
          defense_factory: DefenseFactory | None = None) -> TrainResult:
  """Trains a classifier per ``config``; resumes from ``run_dir`` if interrupted.

  Args:
    config: the recipe.
    defense_factory: for a ``config.defended()`` run, makes the defense's
      training step: called as ``defense_factory(run_dir, first_epoch=...,
      chief=..., data_dir=..., manual_dir=..., validation_size=...)``, it
      returns a ``Defense``. ``defenses.trainer.defense_factory(config)`` is
      the one for a ``TrainConfig``; ``defenses.train(config)`` passes it.
      Not used when ``config`` is not defended.

  Returns:
    The trained float32 model, its test accuracy and the SavedModel path.

  Raises:
    ConfigError: a bad config field, or a defended config without a
      ``defense_factory``.
    DataError: the data cannot be found or built.
  """
  config.validate()
  if config.defended() and defense_factory is None:
    raise ConfigError(
        "`config` sets a trained defense (`adversarial`, `certified`, `temperature` != 1 "
        "or `teacher_model_path`), but `training.train` got no `defense_factory` to make its "
        "training step; call `keras_defense.defenses.train(config)` (or `kd.train`), which "
        "supplies it.")
  start = time.time()
  # First: a mirrored strategy over logical CPUs must configure them before
  # TensorFlow initialises its devices.
  strategy = distribution.make_strategy(config.strategy,
                                        num_cpu_devices=config.num_cpu_devices)
  setup_determinism(config.seed, config.deterministic)
  run_dir = pathlib.Path(config.run_dir)
  ds_info = data.info(config.dataset, data_dir=config.data_dir,
                      manual_dir=config.manual_dir,
                      validation_size=config.validation_size)
  common = dict(data_dir=config.data_dir, manual_dir=config.manual_dir,
                validation_size=config.validation_size)
  first_epoch = min(resume_epoch(run_dir / "backup"), config.epochs)
  train_ds, val_ds, test_ds, steps_per_epoch = fit_datasets(
      config, strategy, ds_info.num_validation, epochs=config.epochs,
      first_epoch=first_epoch)

  user = None  # the user's model (init_model), checked against the data before training
  if config.init_model:
    user = initial_model.load_initial(config.init_model, ds_info.image_shape,
                                      ds_info.num_classes)
  identity = {"stage": "train", "model": config.model_name(ds_info.image_shape),
              "dataset": config.dataset}
  defense = None
  if config.defended():  # trained defenses: the caller's training step
    defense = defense_factory(run_dir, first_epoch=first_epoch,
                              chief=distribution.is_chief(strategy), **common)
    identity["defense"] = defense.identity()
  if distribution.is_chief(strategy):
    claim_run_dir(run_dir, identity)
  with distribution.scope(strategy):  # default: no scope, numbers as before
    model, loss, acc, epochs_run = _fit(config, ds_info, run_dir,
                                        train_ds, val_ds, test_ds, steps_per_epoch,
                                        defense=defense, user=user)
  saved = None
  if config.export_dir:  # multi-worker: only the chief's copy is kept
    record = provenance.model_provenance("train", ds_info)
    if defense is not None:
      record["defense"] = defense.identity()
    if user is not None:
      record.update(user.identity())
    saved = distribution.export_saved_model(
        model, config.export_dir, strategy, version=config.export_version,
        provenance=record)
  keras_path = None
  if user is not None and distribution.is_chief(strategy):
    keras_path = initial_model.write_user_format(model, user, config.export_keras, saved)
  result = TrainResult(model=model, test_accuracy=float(acc), test_loss=float(loss),
                       epochs_run=epochs_run, wall_seconds=time.time() - start,
                       saved_model_path=saved,
                       defense=None if defense is None else defense.summary(),
                       keras_path=keras_path)
  if distribution.is_chief(strategy):
    io_utils.write_json(run_dir / "train_result.json",
                        {"config": config_dict(config), **result.to_dict(),
                         "versions": provenance.versions()})
  return result


def resume_epoch(backup_dir: str | os.PathLike) -> int:
  """The epoch ``BackupAndRestore`` will resume at: 0, or the last saved epoch + 1."""
  backup = pathlib.Path(backup_dir)
  if not backup.is_dir():
    return 0
  dirs = sorted({p.parent for p in backup.rglob("checkpoint")},
                key=lambda d: d.name != "chief")
  for d in dirs:
    path = tf.train.latest_checkpoint(str(d))
    if not path:
      continue
    for name, _ in tf.train.list_variables(path):
      if name.startswith("ckpt_saved_epoch"):
        return max(0, int(tf.train.load_variable(path, name)) + 1)
  return 0


def _fit(config: TrainConfig, ds_info, run_dir: pathlib.Path,
         train_ds, val_ds, test_ds, steps_per_epoch: int, defense=None, user=None):
  """Builds, compiles, fits and evaluates; call under ``strategy.scope()``.

  ``defense`` (a ``Defense``): fit its training wrapper around the model
  instead of the model, with its callbacks (the guard) first. ``user`` (a
  ``models.user_model.UserModel``): train a copy of it instead of a C&W net.
  """
  if user is not None:
    model = initial_model.fresh_copy(user.model)
  else:
    model = build_for_training(config.model_name(ds_info.image_shape), ds_info.image_shape,
                               ds_info.num_classes, dropout=config.dropout,
                               seed=config.seed, compute_dtype=config.compute_dtype)
  optimizer = make_optimizer(config.optimizer, config.learning_rate,
                             config.momentum, config.nesterov)
  if defense is None:
    fitted = compile_classifier(model, optimizer)
  else:
    fitted = defense.wrap(model, optimizer)
  epochs_done = _EpochCounter()
  callbacks = [
      keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
      EpochSeeder(config.seed),
      keras.callbacks.LearningRateScheduler(step_schedule(
          config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor)),
      keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), update_freq="epoch",
                                  write_graph=False, profile_batch=0),
      epochs_done,
  ]
  if defense is not None:
    callbacks = defense.callbacks() + callbacks  # the guard saves before the checkpoint
  fitted.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
             validation_data=val_ds, callbacks=callbacks, verbose=config.verbose)
  if defense is not None:
    defense.restore_best()
  model = to_float32(model)
  compile_classifier(model, "sgd")
  loss, acc = model.evaluate(test_ds, verbose=0)
  return model, loss, acc, epochs_done.count


class EpochSeeder(keras.callbacks.Callback):
  """Re-seeds every random layer (Dropout) at the start of each epoch from (seed, epoch).

  Together with ``data.load_epochs`` this makes epoch ``e`` depend only on the
  weights it starts from, so a run resumed from a checkpoint after a crash
  matches an uninterrupted one: the generators' state is not in Keras
  checkpoints. Uses tf_keras's ``RandomGenerator`` internals (stateful
  ``tf.random.Generator`` mode, enabled in ``compat``).
  """

  def __init__(self, seed: int):
    super().__init__()
    self.seed = int(seed)

  def on_epoch_begin(self, epoch, logs=None):
    for module in self.model.submodules:
      rng = getattr(module, "_random_generator", None)
      if rng is None or not hasattr(rng, "_maybe_init"):
        continue
      rng._maybe_init()  # pylint: disable=protected-access
      generator = getattr(rng, "_generator", None)
      if isinstance(generator, tf.random.Generator):
        generator.reset_from_seed(self.seed * 1_000_003 + int(epoch) + 1)


class _EpochCounter(keras.callbacks.Callback):
  """Counts the epochs this call ran (resumed epochs are not rerun)."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def on_epoch_end(self, epoch, logs=None):
    self.count += 1
