"""Magnitude pruning of a trained classifier with tfmot: M0 -> M1 (C0 -> C1).

The pruning run: ``PruneConfig`` in, M1 and its compression report out.
``prune`` loads a trained SavedModel, prunes it while fine-tuning
(``magnitude_pruning``: tfmot's ``prune_low_magnitude`` with a
``PolynomialDecay`` schedule per layer type, ``UpdatePruningStep``,
``PruningSummaries`` to TensorBoard), strips the wrappers, evaluates on the
full test split, exports a plain Keras SavedModel and writes the compression
report (``compression_report``). With ``adversarial`` set it is robust
pruning: the fine-tuning runs adversarial training's step and guard
(``trainer.DefenseSetup``). This module is the defense's face: it re-exports
the names of the other two.

The defense (Wang et al., "Defending DNN adversarial attacks with pruning and
logits augmentation", ICLR 2018 workshop / GlobalSIP 2018) prunes "10% nonzero
weights for fully connected layers and 5% for convolutional layers". The design
card reads that as *retention*: final sparsity 0.90 (Dense) and 0.95 (Conv2D).
The authors' code instead ran 20 rounds that each removed 10% / 5% of the
remaining weights, i.e. final sparsities 1 - 0.9**20 ~= 0.878 and
1 - 0.95**20 ~= 0.642 (flags/mnist_m1_paper.flags).

Example:
  >>> result = prune(PruneConfig(base_model_path="saved_models/mnist_m0/1",
  ...                            run_dir="/tmp/m1", export_dir="/tmp/mnist_m1"))
  >>> print(result.report.to_markdown())
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense import training
from keras_defense.defenses import base
from keras_defense.defenses import trainer
from keras_defense.defenses.compression_report import CompressionReport
from keras_defense.defenses.compression_report import gzipped_size
from keras_defense.defenses.compression_report import sparsity_report
from keras_defense.defenses import magnitude_pruning
from keras_defense.defenses.magnitude_pruning import aligned_end_step
from keras_defense.defenses.magnitude_pruning import has_pruning_wrappers  # noqa: F401
from keras_defense.defenses.magnitude_pruning import kept_at_most  # noqa: F401
from keras_defense.defenses.magnitude_pruning import prune_model
from keras_defense.defenses.magnitude_pruning import pruning_callbacks
from keras_defense.defenses.magnitude_pruning import strip_pruning
from keras_defense.defenses.magnitude_pruning import validate_sparsity
from keras_defense.models import export
from keras_defense.models import user_model
from keras_defense.training import distribution
from keras_defense.training.config import AdversarialSpec
from keras_defense.training.config import ConfigError
from keras_defense.util import config_checks
from keras_defense.util import io_utils
from keras_defense.util import provenance
from keras_defense.util.compat import keras


@dataclasses.dataclass
class PruneConfig:
  """What ``prune`` needs. Field names match the flags that fill them."""
  base_model_path: str = "saved_models/mnist_m0/1"
  dataset: str = "mnist"
  run_dir: str = "runs/prune"
  dense_sparsity: float = 0.90  # design card: keep 10% of FC weights
  conv_sparsity: float = 0.95  # design card: keep 5% of conv weights
  initial_sparsity: float = 0.0
  prune_logits: bool = True
  finetune_dropout: float | None = None  # None: keep the base model's dropout rate
  pruning_begin_epoch: float = 0.0
  pruning_end_epoch: float = 4.0
  pruning_frequency: int = 100  # steps between mask updates
  finetune_epochs: int = 8
  batch_size: int = 128
  optimizer: str = "sgd"
  learning_rate: float = 0.01
  momentum: float = 0.9
  nesterov: bool = True
  lr_decay_epochs: tuple[int, ...] = (4, 6)
  lr_decay_factor: float = 0.2
  seed: int = 0
  train_limit: int | None = None
  test_limit: int | None = None
  validation_size: int | None = None  # None: min(5000, n_train // 10)
  data_dir: str | None = None
  manual_dir: str | None = None
  export_dir: str | None = None
  export_version: int | None = None
  report_path: str | None = None  # prefix: writes <prefix>.json and <prefix>.md
  deterministic: bool = False
  strategy: str = "default"  # distribution.STRATEGIES; default: one device, as before
  num_cpu_devices: int | None = None  # mirrored without GPUs: logical CPU devices
  verbose: int = 1
  # Robust pruning (Ye et al. 2019, HYDRA 2020): fine-tune on adversarial batches,
  # the same training step as adversarial training (defenses.trainer). None: plain
  # fine-tuning, as before. The spec TrainConfig's adversarial training takes.
  adversarial: AdversarialSpec | None = None
  # Certified robust pruning: fine-tune with the certified-training loss (IBP or
  # CROWN-IBP, defenses.trainer) while pruning; its ramps count fine-tuning steps.
  certified: training.CertifiedSpec | None = None

  def validate(self) -> "PruneConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    need = config_checks.checker(ConfigError)
    for name in ("dense_sparsity", "conv_sparsity", "initial_sparsity"):
      try:
        validate_sparsity(getattr(self, name), name)
      except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    need(self.finetune_dropout is None or 0 <= self.finetune_dropout < 1,
         f"`finetune_dropout` must be in [0, 1); got {self.finetune_dropout}.")
    need(self.initial_sparsity <= min(self.dense_sparsity, self.conv_sparsity),
         f"`initial_sparsity` must be <= both final sparsities; got {self.initial_sparsity}.")
    need(bool(self.base_model_path),
         "`base_model_path` must name a SavedModel, e.g. saved_models/mnist_m0/1.")
    need(int(self.finetune_epochs) >= 1,
         f"`finetune_epochs` must be >= 1; got {self.finetune_epochs}.")
    need(self.pruning_begin_epoch >= 0,
         f"`pruning_begin_epoch` must be >= 0; got {self.pruning_begin_epoch}.")
    need(self.pruning_begin_epoch < self.pruning_end_epoch <= self.finetune_epochs,
         f"`pruning_end_epoch` must be in (`pruning_begin_epoch`, `finetune_epochs`] = "
         f"({self.pruning_begin_epoch}, {self.finetune_epochs}]; got {self.pruning_end_epoch}.")
    need(int(self.pruning_frequency) >= 1,
         f"`pruning_frequency` must be >= 1 step; got {self.pruning_frequency}.")
    training.check_fit_fields(self)
    training.check_adversarial(self.adversarial)
    training.check_certified(self.certified)
    need(self.certified is None or self.adversarial is None,
         f"`certified` ({self.certified and self.certified.method!r}) cannot be combined "
         f"with `adversarial` ({self.adversarial and self.adversarial.method!r}): pick one "
         f"fine-tuning loss.")
    return self


@dataclasses.dataclass
class PruneResult:
  """What ``prune`` produced."""
  model: keras.Model  # stripped, plain Keras layers
  report: CompressionReport
  base_accuracy: float
  test_accuracy: float
  validation_accuracy: float | None
  begin_step: int
  end_step: int
  steps: int
  wall_seconds: float
  saved_model_path: str | None
  report_paths: tuple[str, ...] = ()
  defense: dict | None = None  # robust pruning: its settings and the guard's history
  keras_path: str | None = None  # a user's .keras/.h5 base: the pruned model in its format

  def to_dict(self) -> dict[str, Any]:
    extra = {} if self.defense is None else {"defense": self.defense}
    if self.keras_path is not None:
      extra["keras_path"] = self.keras_path
    return {"base_accuracy": self.base_accuracy, "test_accuracy": self.test_accuracy,
            "validation_accuracy": self.validation_accuracy,
            "compression_ratio": self.report.compression_ratio,
            "model_compression_ratio": self.report.model_compression_ratio,
            "kept_fraction_by_type": {k: v["kept_fraction"]
                                      for k, v in self.report.pruned["by_type"].items()},
            "begin_step": self.begin_step, "end_step": self.end_step, "steps": self.steps,
            "wall_seconds": self.wall_seconds, "saved_model_path": self.saved_model_path,
            "report_paths": list(self.report_paths), **extra}

  def summary(self) -> str:
    kept = ", ".join(f"{k} {100 * v['kept_fraction']:.2f}%"
                     for k, v in sorted(self.report.pruned["by_type"].items()))
    return (f"test accuracy {100 * self.base_accuracy:.2f}% -> {100 * self.test_accuracy:.2f}%; "
            f"kept {kept}; compression {self.report.compression_ratio:.2f}x (whole model "
            f"{self.report.model_compression_ratio or float('nan'):.2f}x); "
            f"{self.wall_seconds:.0f} s")


def evaluate_accuracy(model: keras.Model, dataset) -> float:
  """Top-1 accuracy of a logits model on a batched (images, labels) dataset."""
  correct = total = 0
  for x, y in dataset:
    pred = np.argmax(model(x, training=False).numpy(), axis=-1)
    correct += int(np.sum(pred == y.numpy()))
    total += int(y.shape[0])
  return correct / max(total, 1)


def prune(config: PruneConfig) -> PruneResult:
  """Prunes the model at ``config.base_model_path`` while fine-tuning.

  The base is a SavedModel, or a user's own ``.keras`` (Keras 3 through
  ``models.keras_bridge``, logits checked) or ``.h5`` file
  (``models.user_model``); every layer tfmot can prune is pruned, the others
  (BatchNormalization, ...) are left and logged (``left_unpruned``), and a
  ``.keras``/``.h5`` base also gets the pruned model back in its format,
  ``<export_dir>/<version>.keras``.

  Fine-tunes for ``finetune_epochs`` on the training split (minus the
  validation hold-out) with the configured optimizer and a stepped learning
  rate; pruning runs from ``pruning_begin_epoch`` to ``pruning_end_epoch``
  (converted to steps; the end is moved down onto the mask-update grid so the
  final sparsity is actually reached). Checkpoints every epoch under
  ``<run_dir>/backup`` (``BackupAndRestore``, wrappers' masks and step
  included), so a rerun resumes. TensorBoard: ``<run_dir>/tensorboard``
  (loss/accuracy) and ``<run_dir>/tensorboard/metrics`` (per-layer sparsity
  and threshold).

  Returns:
    The stripped model, accuracies on the test split, the compression report
    and the SavedModel path.

  Raises:
    ConfigError: a bad config field.
    ModelLoadError: the base model cannot be loaded.
    DataError: the data cannot be found.
  """
  config.validate()
  start = time.time()
  strategy = distribution.make_strategy(config.strategy,
                                        num_cpu_devices=config.num_cpu_devices)
  chief = distribution.is_chief(strategy)
  training.setup_determinism(config.seed, config.deterministic)
  run_dir = pathlib.Path(config.run_dir)
  common = dict(data_dir=config.data_dir, manual_dir=config.manual_dir,
                validation_size=config.validation_size)
  ds_info = data.info(config.dataset, **common)  # the data first: unknown or unsupported?
  base_record = export.read_provenance(config.base_model_path)
  if base_record is not None and base_record.get("dataset") != config.dataset:
    export.check_model_dataset(config.base_model_path, config.dataset, what="base model")
  # A SavedModel as before, or the user's own .keras (Keras 3 through the bridge) / .h5.
  user = user_model.load_user_model(config.base_model_path)
  base = training.to_float32(user.model)
  first_epoch = min(training.resume_epoch(run_dir / "backup"), int(config.finetune_epochs))
  identity = {"stage": "prune", "model": base.name, "dataset": config.dataset}
  defense = None
  if config.adversarial is not None or config.certified is not None:
    # robust pruning: adversarial or certified fine-tuning
    defense = trainer.DefenseSetup(run_dir, dataset=config.dataset, seed=config.seed,
                                   first_epoch=first_epoch, chief=chief,
                                   adversarial=config.adversarial, certified=config.certified,
                                   batch_size=config.batch_size,
                                   train_limit=config.train_limit, **common)
    identity["defense"] = defense.identity()
  if chief:
    training.claim_run_dir(run_dir, identity)

  # The test split stays whole: evaluate_accuracy reads it here, not fit.
  train_ds, val_ds, test_ds, steps_per_epoch = training.fit_datasets(
      config, strategy, ds_info.num_validation, epochs=int(config.finetune_epochs),
      first_epoch=first_epoch, shard_test=False)

  total_steps = steps_per_epoch * int(config.finetune_epochs)
  begin_step = int(round(config.pruning_begin_epoch * steps_per_epoch))
  end_step = aligned_end_step(
      begin_step, min(int(round(config.pruning_end_epoch * steps_per_epoch)), total_steps),
      config.pruning_frequency)
  if end_step <= begin_step:
    raise ConfigError(
        f"the pruning window ({config.pruning_begin_epoch}..{config.pruning_end_epoch} "
        f"epochs = {steps_per_epoch} steps/epoch) is shorter than `pruning_frequency` "
        f"({config.pruning_frequency} steps); lower the frequency or widen the window.")

  base_accuracy = evaluate_accuracy(base, test_ds)
  # tfmot's wrappers update masks through merge_call, so pruning runs under
  # MirroredStrategy and MultiWorkerMirroredStrategy (docs/DISTRIBUTED.md).
  with distribution.scope(strategy):  # default: no scope, numbers as before
    model = prune_model(base, dense_sparsity=config.dense_sparsity,
                        conv_sparsity=config.conv_sparsity, begin_step=begin_step,
                        end_step=end_step, frequency=config.pruning_frequency,
                        initial_sparsity=config.initial_sparsity,
                        prune_logits=config.prune_logits, dropout=config.finetune_dropout)
    optimizer = training.make_optimizer(config.optimizer, config.learning_rate,
                                        config.momentum, config.nesterov)
    if defense is None:
      training.compile_classifier(model, optimizer)
      fitted = model
    else:
      # The guard keeps the best robust epoch among those that end after the
      # schedule's last mask update (an earlier epoch holds a denser model);
      # if none does, the last epoch's weights are kept.
      fitted = defense.wrap(model, optimizer,
                            first_eligible_epoch=end_step // steps_per_epoch)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        training.EpochSeeder(config.seed),
        *pruning_callbacks(run_dir / "tensorboard"),  # TensorBoard: chief-only writes
        keras.callbacks.LearningRateScheduler(training.step_schedule(
            config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor)),
    ]
    if defense is not None:
      callbacks = defense.callbacks() + callbacks  # the guard saves before the checkpoint
    history = fitted.fit(train_ds, epochs=int(config.finetune_epochs),
                         steps_per_epoch=steps_per_epoch, validation_data=val_ds,
                         callbacks=callbacks, verbose=config.verbose)
    if defense is not None:
      defense.restore_best()
    stripped = strip_pruning(model)
  for row in magnitude_pruning.left_unpruned(stripped):
    logging.info("left unpruned: %s (%s, %d weights): %s", row["name"], row["type"],
                 row["weights"], row["why"])
  val_acc = history.history.get("val_accuracy", [None])[-1] if history.history else None

  test_accuracy = evaluate_accuracy(stripped, test_ds)
  saved = None
  if config.export_dir:  # multi-worker: only the chief's copy is kept
    record = provenance.model_provenance("prune", ds_info,
                                         base_model=str(config.base_model_path))
    if defense is not None:
      record["defense"] = defense.identity()
    saved = distribution.export_saved_model(
        stripped, config.export_dir, strategy, version=config.export_version,
        provenance=record)
  keras_path = None
  if saved and chief and user.kind != "saved_model":  # the user's format back, beside it
    keras_path = user_model.save_user_format(stripped, f"{saved}.keras",
                                             keras_major=user.keras_major)
  n_test = sum(int(y.shape[0]) for _, y in test_ds)
  base_path = pathlib.Path(config.base_model_path)
  report = CompressionReport(
      base=sparsity_report(base), pruned=sparsity_report(stripped),
      base_accuracy=base_accuracy, pruned_accuracy=test_accuracy, test_examples=n_test,
      base_gzip_bytes=gzipped_size(base_path) if base_path.is_dir() else None,  # SavedModels
      pruned_gzip_bytes=gzipped_size(saved) if saved else None,
      base_model_path=str(config.base_model_path), pruned_model_path=saved,
      recipe={k: v for k, v in training.config_dict(config).items()
              if k not in ("verbose", "data_dir", "manual_dir")}
      | {"begin_step": begin_step, "end_step": end_step, "steps_per_epoch": steps_per_epoch})
  paths = report.write(config.report_path) if config.report_path and chief else ()
  result = PruneResult(
      model=stripped, report=report, base_accuracy=base_accuracy,
      test_accuracy=test_accuracy,
      validation_accuracy=None if val_acc is None else float(val_acc),
      begin_step=begin_step, end_step=end_step, steps=total_steps,
      wall_seconds=time.time() - start, saved_model_path=saved, report_paths=tuple(paths),
      defense=None if defense is None else defense.summary(), keras_path=keras_path)
  if chief:
    io_utils.write_json(run_dir / "prune_result.json", result.to_dict())
  return result


def prune_defense(model: str | None, data_spec: base.DataSpec,
                  config: PruneConfig) -> tuple[keras.Model, dict]:
  """The registry's entry: ``prune`` of the SavedModel at ``model`` (default: the config's).

  Args:
    model: path of the SavedModel to prune, or None for ``config.base_model_path``.
    data_spec: the dataset and its limits.
    config: a ``PruneConfig``.

  Returns:
    (the stripped pruned model, provenance with the pruning results).
  """
  config = data_spec.apply(dataclasses.replace(
      config, base_model_path=model or config.base_model_path))
  result = prune(config)
  return result.model, base.record("pruning", config, result.to_dict())
