"""Training of the C&W classifiers: config in, trained model + SavedModel out.

Keras ``fit`` with a progress bar, TensorBoard scalars (loss, accuracy, learning
rate) under ``<run_dir>/tensorboard``, a checkpoint every epoch under
``<run_dir>/backup`` (``BackupAndRestore``: rerunning after a crash resumes from
the last finished epoch, so ``kill -9`` loses at most the current epoch), and a
final SavedModel export.

Recipe defaults follow C&W 2017 (SGD, momentum 0.9, Nesterov, batch 128) with a
stepped learning rate, which reaches the paper's accuracy in fewer epochs.

Trained defenses run on this same loop: with ``adversarial`` (PGD-AT, FGSM-RS,
TRADES), ``temperature`` or ``teacher_model_path`` set, ``fit`` trains a
``defenses.trainer.DefenseTrainer`` around the model (adversarial batches
crafted inside the compiled step; a per-epoch PGD check keeps the most robust
epoch), and the plain functional model is exported. With them unset, training
is exactly as before.

Example:
  >>> result = train(TrainConfig(dataset="mnist", run_dir="/tmp/m0", epochs=10))
  >>> result.test_accuracy
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

from keras_defense import data
from keras_defense.training import distribution
from keras_defense.util import io_utils
from keras_defense import models
from keras_defense.util import provenance
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

OPTIMIZERS = ("sgd", "adam")
COMPUTE_DTYPES = ("float32", "bfloat16")
ADVERSARIAL_METHODS = ("pgd", "fgsm_rs", "trades")  # keras_defense.defenses.adversarial_training
# The adversarial-training fields TrainConfig and defenses.pruning.PruneConfig
# (robust pruning) both have, with the same meaning and flags.
ADVERSARIAL_FIELDS = ("adversarial", "adv_epsilon", "adv_steps", "adv_step_size",
                      "trades_beta", "robust_val_size")


class ConfigError(UserError):
  """A configuration value is out of range or inconsistent."""


RUN_FILE = "run.json"  # what a run directory holds: stage, model, dataset


def check_output_dir(name: str, path: str | os.PathLike | None) -> None:
  """Raises ConfigError if ``path`` is empty or an existing non-directory.

  Args:
    name: the config field, for the message (``run_dir``, ``export_dir``).
    path: a directory to create or reuse; None means "not used".
  """
  if path is None:
    return
  if not str(path):
    raise ConfigError(f"`{name}` must be a directory path; got an empty string.")
  blocker = io_utils.file_in_the_way(path)
  if blocker is not None:
    raise ConfigError(f"`{name}` {str(path)!r} cannot be a directory: "
                      f"{str(blocker)!r} exists and is not a directory.")


def check_strategy(strategy: str, num_cpu_devices: int | None) -> None:
  """Raises ConfigError unless ``strategy`` names a strategy and the device count fits."""
  if strategy not in distribution.STRATEGIES:
    raise ConfigError(f"`strategy` must be one of {', '.join(distribution.STRATEGIES)}; "
                      f"got {strategy!r}.")
  if num_cpu_devices is not None and (strategy != "mirrored" or int(num_cpu_devices) < 1):
    raise ConfigError(f"`num_cpu_devices` must be >= 1 and only goes with strategy "
                      f"'mirrored'; got {num_cpu_devices} with {strategy!r}.")


def claim_run_dir(run_dir: str | os.PathLike, identity: dict) -> None:
  """Records what ``run_dir`` holds; refuses to mix in a different run.

  Checkpoints (``BackupAndRestore``) of one architecture cannot be resumed by
  another, and a finished run's results must not be overwritten by an
  unrelated one, so a run directory is bound to its first ``identity``
  (e.g. ``{"stage": "train", "model": "cw_mnist", "dataset": "mnist"}``).

  Raises:
    ConfigError: ``run_dir`` already holds a run with a different identity.
  """
  path = pathlib.Path(run_dir) / RUN_FILE
  if path.is_file():
    held = io_utils.read_json(path)
    if held != identity:
      theirs = ", ".join(f"{k}={held.get(k)!r}" for k in identity if held.get(k) != identity[k])
      ours = ", ".join(f"{k}={identity[k]!r}" for k in identity if held.get(k) != identity[k])
      raise ConfigError(
          f"`run_dir` {str(run_dir)!r} holds another run ({theirs}); this one has "
          f"{ours}. Its checkpoints cannot be resumed by a different run: pass a new "
          f"`run_dir` or delete that one.")
    return
  io_utils.write_json(path, identity)


@dataclasses.dataclass
class TrainConfig:
  """What ``train`` needs. Field names match the flags that fill them."""
  dataset: str = "mnist"
  model: str | None = None  # default: the C&W network for the dataset's image shape
  run_dir: str = "runs/train"
  epochs: int = 10
  batch_size: int = 128  # C&W 2017
  optimizer: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9  # C&W 2017
  nesterov: bool = True  # C&W 2017
  lr_decay_epochs: tuple[int, ...] = (5, 8)
  lr_decay_factor: float = 0.2
  dropout: float = 0.5  # C&W 2017
  seed: int = 0
  train_limit: int | None = None
  test_limit: int | None = None
  validation_size: int | None = None  # None: min(5000, n_train // 10)
  data_dir: str | None = None
  manual_dir: str | None = None
  export_dir: str | None = None  # e.g. saved_models/mnist_m0; None: no export
  export_version: int | None = None
  compute_dtype: str = "float32"
  deterministic: bool = False
  strategy: str = "default"  # distribution.STRATEGIES; default: one device, as before
  num_cpu_devices: int | None = None  # mirrored without GPUs: logical CPU devices
  verbose: int = 1
  # Trained defenses (keras_defense.defenses); the defaults leave training as it was.
  adversarial: str | None = None  # None, or ADVERSARIAL_METHODS: "pgd" | "fgsm_rs" | "trades"
  adv_epsilon: float = 0.3  # L-inf radius; Madry, Wong and TRADES on MNIST: 0.3
  adv_steps: int | None = None  # None: 40 for pgd/trades (Madry's MNIST), 1 for fgsm_rs
  adv_step_size: float | None = None  # None: 2.5 eps / steps (Madry's rule); fgsm_rs 1.25 eps
  trades_beta: float = 6.0  # TRADES (Zhang et al. 2019): 6
  robust_val_size: int = 1000  # held-out images of the per-epoch PGD-10 check; 0: none
  temperature: float = 1.0  # softmax temperature of the training loss (distillation)
  teacher_model_path: str | None = None  # distillation: learn this model's soft labels at T

  def validate(self) -> "TrainConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    def need(cond, msg):
      if not cond:
        raise ConfigError(msg)
    need(self.model is None or self.model in models.MODEL_NAMES,
         f"`model` must be one of {', '.join(models.MODEL_NAMES)}; got {self.model!r}.")
    need(int(self.epochs) >= 1, f"`epochs` must be >= 1; got {self.epochs}.")
    need(0 <= self.dropout < 1, f"`dropout` must be in [0, 1); got {self.dropout}.")
    need(self.compute_dtype in COMPUTE_DTYPES,
         f"`compute_dtype` must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}.")
    check_defense_fields(self)
    check_fit_fields(self)
    return self

  def defended(self) -> bool:
    """True if a trained defense changes the training step (else: plain ``fit``)."""
    return (self.adversarial is not None or self.temperature != 1.0
            or self.teacher_model_path is not None)

  def adversarial_steps(self) -> tuple[int, float]:
    """(steps, step size) of the inner maximisation, defaults filled in."""
    return adversarial_steps(self)

  def model_name(self, image_shape) -> str:
    """``model``, or the C&W network for ``image_shape`` (models.model_for_shape)."""
    return self.model or models.model_for_shape(image_shape)


def adversarial_steps(config) -> tuple[int, float]:
  """(steps, step size) of ``config``'s training attack, defaults filled in.

  ``config`` is a ``TrainConfig`` or a ``defenses.pruning.PruneConfig`` (robust
  pruning): both have ``adversarial``, ``adv_epsilon``, ``adv_steps`` and
  ``adv_step_size``.
  """
  steps = config.adv_steps or (1 if config.adversarial == "fgsm_rs" else 40)
  if config.adv_step_size is not None:
    return int(steps), float(config.adv_step_size)
  if config.adversarial == "fgsm_rs":
    return 1, 1.25 * float(config.adv_epsilon)  # Wong et al. 2020: alpha = 1.25 eps
  return int(steps), 2.5 * float(config.adv_epsilon) / int(steps)


def check_defense_fields(config) -> None:
  """Checks the trained-defense fields of a ``TrainConfig`` (or a ``PruneConfig``).

  Raises ConfigError naming the field.
  """
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)
  need(config.adversarial is None or config.adversarial in ADVERSARIAL_METHODS,
       f"`adversarial` must be None or one of {', '.join(ADVERSARIAL_METHODS)}; "
       f"got {config.adversarial!r}.")
  need(0 < config.adv_epsilon <= 1, f"`adv_epsilon` must be in (0, 1]; got {config.adv_epsilon}.")
  need(config.adv_steps is None or int(config.adv_steps) >= 1,
       f"`adv_steps` must be >= 1; got {config.adv_steps}.")
  need(config.adversarial != "fgsm_rs" or config.adv_steps in (None, 1),
       f"`adv_steps` must be 1 (or unset) with adversarial='fgsm_rs'; got {config.adv_steps}.")
  need(config.adv_step_size is None or config.adv_step_size > 0,
       f"`adv_step_size` must be > 0; got {config.adv_step_size}.")
  need(config.trades_beta >= 0, f"`trades_beta` must be >= 0; got {config.trades_beta}.")
  need(int(config.robust_val_size) >= 0,
       f"`robust_val_size` must be >= 0; got {config.robust_val_size}.")
  need(config.temperature > 0, f"`temperature` must be > 0; got {config.temperature}.")
  need(config.adversarial is None or (config.temperature == 1.0
                                      and config.teacher_model_path is None),
       f"`adversarial` ({config.adversarial!r}) cannot be combined with `temperature` != 1 "
       f"or `teacher_model_path`; got temperature={config.temperature}, "
       f"teacher_model_path={config.teacher_model_path!r}.")
  need(config.teacher_model_path is None or bool(config.teacher_model_path),
       "`teacher_model_path` must name a SavedModel or be None; got an empty string.")


def check_fit_fields(config) -> None:
  """Checks the fields training and pruning share (optimizer, schedule, data, output).

  Args:
    config: a ``TrainConfig`` or ``pruning.PruneConfig``.

  Raises:
    ConfigError: naming the first bad field.
  """
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)
  need(int(config.batch_size) >= 1, f"`batch_size` must be >= 1; got {config.batch_size}.")
  need(config.optimizer in OPTIMIZERS,
       f"`optimizer` must be one of {', '.join(OPTIMIZERS)}; got {config.optimizer!r}.")
  need(config.learning_rate > 0, f"`learning_rate` must be > 0; got {config.learning_rate}.")
  need(0 <= config.momentum < 1, f"`momentum` must be in [0, 1); got {config.momentum}.")
  need(all(int(e) >= 1 for e in config.lr_decay_epochs),
       f"`lr_decay_epochs` must be epochs >= 1; got {list(config.lr_decay_epochs)}.")
  need(0 < config.lr_decay_factor <= 1,
       f"`lr_decay_factor` must be in (0, 1]; got {config.lr_decay_factor}.")
  for name in ("train_limit", "test_limit"):
    v = getattr(config, name)
    need(v is None or int(v) >= 1, f"`{name}` must be >= 1; got {v}.")
  need(config.export_version is None or int(config.export_version) >= 1,
       f"`export_version` must be >= 1; got {config.export_version}.")
  check_strategy(config.strategy, config.num_cpu_devices)
  check_output_dir("run_dir", config.run_dir)
  check_output_dir("export_dir", config.export_dir)


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

  def to_dict(self) -> dict:
    out = {"test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
           "epochs_run": self.epochs_run, "wall_seconds": self.wall_seconds,
           "saved_model_path": self.saved_model_path}
    if self.defense is not None:
      out["defense"] = self.defense
    return out


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


def train(config: TrainConfig) -> TrainResult:
  """Trains a classifier per ``config``; resumes from ``run_dir`` if interrupted.

  Returns:
    The trained float32 model, its test accuracy and the SavedModel path.

  Raises:
    ConfigError: a bad config field.
    DataError: the data cannot be found or built.
  """
  config.validate()
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
  # Epoch e's batch order depends only on (seed, e): a run resumed from its
  # last epoch checkpoint sees the batches an uninterrupted run would have.
  first_epoch = min(resume_epoch(run_dir / "backup"), config.epochs)
  train_ds, steps_per_epoch = data.load_epochs(
      config.dataset, "train", batch_size=config.batch_size, seed=config.seed,
      epochs=config.epochs, first_epoch=first_epoch,
      limit=config.train_limit, **common)
  val_ds = None
  if ds_info.num_validation > 0:
    val_ds = data.load_split(config.dataset, "validation", batch_size=1000,
                             limit=config.test_limit, **common)
  test_ds = data.load_split(config.dataset, "test", batch_size=1000,
                            limit=config.test_limit, **common)
  # Multi-worker: element-wise sharding (no-op for one process).
  train_ds, val_ds, test_ds = (None if d is None else distribution.shard_by_data(d, strategy)
                               for d in (train_ds, val_ds, test_ds))

  identity = {"stage": "train", "model": config.model_name(ds_info.image_shape),
              "dataset": config.dataset}
  defense = None
  if config.defended():  # trained defenses: keras_defense.defenses.trainer
    from keras_defense.defenses import trainer as defense_trainer  # pylint: disable=g-import-not-at-top
    defense = defense_trainer.DefenseSetup(config, run_dir, first_epoch=first_epoch,
                                           chief=distribution.is_chief(strategy), **common)
    identity["defense"] = defense.identity()
  if distribution.is_chief(strategy):
    claim_run_dir(run_dir, identity)
  with distribution.scope(strategy):  # default: no scope, numbers as before
    model, loss, acc, epochs_run = _fit(config, ds_info, run_dir,
                                        train_ds, val_ds, test_ds, steps_per_epoch,
                                        defense=defense)
  saved = None
  if config.export_dir:  # multi-worker: only the chief's copy is kept
    record = provenance.model_provenance("train", ds_info)
    if defense is not None:
      record["defense"] = defense.identity()
    saved = distribution.export_saved_model(
        model, config.export_dir, strategy, version=config.export_version,
        provenance=record)
  result = TrainResult(model=model, test_accuracy=float(acc), test_loss=float(loss),
                       epochs_run=epochs_run, wall_seconds=time.time() - start,
                       saved_model_path=saved,
                       defense=None if defense is None else defense.summary())
  if distribution.is_chief(strategy):
    io_utils.write_json(run_dir / "train_result.json",
                        {"config": dataclasses.asdict(config), **result.to_dict(),
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
         train_ds, val_ds, test_ds, steps_per_epoch: int, defense=None):
  """Builds, compiles, fits and evaluates; call under ``strategy.scope()``.

  ``defense`` (a ``defenses.trainer.DefenseSetup``): fit its training wrapper
  around the model instead of the model, with its guard callback first.
  """
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
