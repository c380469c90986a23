"""Magnitude pruning of a trained classifier with tfmot: M0 -> M1 (C0 -> C1).

A thin layer over ``tensorflow_model_optimization.sparsity.keras``:
``prune_model`` wraps each layer with ``prune_low_magnitude`` and a
``PolynomialDecay`` schedule (one final sparsity for Dense layers, one for
Conv2D layers); ``prune`` loads a trained SavedModel, prunes it while
fine-tuning (``UpdatePruningStep``; ``PruningSummaries`` to TensorBoard),
strips the wrappers (``strip_pruning``), evaluates on the full test split,
exports a plain Keras SavedModel and writes the compression report.

The defense (Wang et al., "Defending DNN adversarial attacks with pruning and
logits augmentation", ICLR 2018 workshop / GlobalSIP 2018) prunes "10% nonzero
weights for fully connected layers and 5% for convolutional layers". The design
card reads that as *retention*: final sparsity 0.90 (Dense) and 0.95 (Conv2D).
The authors' code instead ran 20 rounds that each removed 10% / 5% of the
remaining weights, i.e. final sparsities 1 - 0.9**20 ~= 0.878 and
1 - 0.95**20 ~= 0.642 (flags/mnist_m1_paper.flags).

Layer handling (decided here, explicit in ``prune_model``):
  * every ``Dense`` layer, the logits layer included, is pruned to
    ``dense_sparsity`` (the design card says "all FC layers"); pass
    ``prune_logits=False`` to leave the logits layer dense;
  * every ``Conv2D`` layer is pruned to ``conv_sparsity``;
  * all other layers (pooling, flatten, dropout, input) hold no weights and
    are left as they are.
Only kernels are pruned; biases are kept (tfmot's default for Dense/Conv2D).
In the report, "kept fraction" is nonzero/total of the *kernels*; the
compression ratio counts all weights (kernels and biases) on both sides.

Example:
  >>> result = prune(PruneConfig(base_model_path="saved_models/mnist_m0/1",
  ...                            run_dir="/tmp/m1", export_dir="/tmp/mnist_m1"))
  >>> print(result.report.to_markdown())
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import pathlib
import tarfile
import time
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot

from keras_defense import data
from keras_defense.training import distribution
from keras_defense.models import export
from keras_defense.util import io_utils
from keras_defense import models
from keras_defense.util import provenance
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.defenses import base
from keras_defense.training.loop import ConfigError

_sparsity = tfmot.sparsity.keras
_WRAPPER_TYPE = _sparsity.prune_low_magnitude(keras.layers.Dense(1)).__class__

PRUNABLE_TYPES = (keras.layers.Dense, keras.layers.Conv2D)


def _validate_sparsity(value: float, name: str) -> None:
  """Raises ValueError unless ``value`` is a sparsity in [0, 1)."""
  if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
    raise TypeError(f"`{name}` must be a float in [0, 1); got {type(value).__name__}.")
  if not (0.0 <= float(value) < 1.0) or math.isnan(float(value)):
    raise ValueError(f"`{name}` must be in [0, 1) (the fraction of weights set to "
                     f"zero; 0.9 keeps 10%); got {value!r}.")


# --------------------------------------------------------------------------
# Pruning a model.
# --------------------------------------------------------------------------


def kept_at_most(sparsity: float, layer) -> float:
  """The sparsity to give tfmot so a kernel keeps at most ``(1 - sparsity)`` of its weights.

  tfmot keeps ``round(n * (1 - s))`` weights of an ``n``-weight kernel, which can be
  one more than the fraction asked for (461 of 9,216 = 5.002% for s = 0.95);
  this returns ``s'`` with ``round(n * (1 - s')) = max(1, floor(n * (1 - s)))``.
  """
  n = int(np.prod(layer.kernel.shape))
  keep = max(1, math.floor(n * (1.0 - float(sparsity)) + 1e-6))
  return 1.0 - keep / n


def prune_model(model: keras.Model, *, dense_sparsity: float, conv_sparsity: float,
                begin_step: int, end_step: int, frequency: int,
                initial_sparsity: float = 0.0,
                prune_logits: bool = True,
                dropout: float | None = None) -> keras.Model:
  """Wraps the Dense and Conv2D layers of ``model`` for magnitude pruning.

  Each prunable layer gets its own ``PolynomialDecay`` schedule (tfmot's
  default power 3) from ``initial_sparsity`` at ``begin_step`` to its final
  sparsity at ``end_step``, updating the mask every ``frequency`` steps. Train
  the result with ``UpdatePruningStep`` (see ``pruning_callbacks``), then call
  ``strip_pruning``. The mask is only updated on steps where
  ``(step - begin_step) % frequency == 0``, so choose ``end_step`` on that grid
  (``prune`` does) or the final sparsity is not reached.

  Args:
    model: a built functional or Sequential tf_keras model (weights are kept).
    dense_sparsity: final fraction of zero weights in every Dense kernel, [0, 1).
    conv_sparsity: final fraction of zero weights in every Conv2D kernel, [0, 1).
    begin_step: training step (1-based, counted by the wrappers) at which
      pruning starts, >= 0.
    end_step: step at which the final sparsity is reached, > ``begin_step``.
    frequency: steps between mask updates, >= 1.
    initial_sparsity: sparsity at ``begin_step``, [0, 1).
    prune_logits: also prune the output Dense layer (default True: the design
      card prunes all FC layers). If False it is left unwrapped and dense.
    dropout: if not None, the rate of every Dropout layer of the clone, [0, 1)
      (fine-tuning a sparse net with less dropout); None keeps the model's.
      Dropout does nothing at inference, so the served model is unchanged.

  Returns:
    A new model (clone) whose Dense/Conv2D layers are ``PruneLowMagnitude``
    wrappers holding copies of the original weights.

  Raises:
    ValueError: a sparsity outside [0, 1) or a bad step range.
  """
  _validate_sparsity(dense_sparsity, "dense_sparsity")
  _validate_sparsity(conv_sparsity, "conv_sparsity")
  _validate_sparsity(initial_sparsity, "initial_sparsity")
  if int(begin_step) < 0:
    raise ValueError(f"`begin_step` must be >= 0; got {begin_step}.")
  if int(end_step) <= int(begin_step):
    raise ValueError(f"`end_step` must be > `begin_step` ({begin_step}); got {end_step}.")
  if int(frequency) < 1:
    raise ValueError(f"`frequency` must be >= 1; got {frequency}.")
  if dropout is not None and not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1) or None; got {dropout!r}.")
  output_layer = model.layers[-1]

  def schedule(final):
    return _sparsity.PolynomialDecay(
        initial_sparsity=float(initial_sparsity), final_sparsity=float(final),
        begin_step=int(begin_step), end_step=int(end_step), frequency=int(frequency))

  def fresh(layer):  # a copy, so the pruned model never shares variables with `model`
    return layer.__class__.from_config(layer.get_config())

  def clone_layer(layer):
    if isinstance(layer, keras.layers.Conv2D):
      return _sparsity.prune_low_magnitude(
          fresh(layer), pruning_schedule=schedule(kept_at_most(conv_sparsity, layer)))
    if isinstance(layer, keras.layers.Dense) and (layer is not output_layer or prune_logits):
      return _sparsity.prune_low_magnitude(
          fresh(layer), pruning_schedule=schedule(kept_at_most(dense_sparsity, layer)))
    if isinstance(layer, keras.layers.Dropout) and dropout is not None:
      return layer.__class__.from_config({**layer.get_config(), "rate": float(dropout)})
    return fresh(layer)  # logits kept dense, or a layer without prunable weights

  pruned = keras.models.clone_model(model, clone_function=clone_layer)
  for old, new in zip(model.layers, pruned.layers):
    target = new.layer if isinstance(new, _WRAPPER_TYPE) else new
    target.set_weights(old.get_weights())
  return pruned


def pruning_callbacks(log_dir: str | os.PathLike | None = None) -> list:
  """``UpdatePruningStep`` (required) plus ``PruningSummaries`` if ``log_dir``."""
  callbacks = [_sparsity.UpdatePruningStep()]
  if log_dir is not None:
    callbacks.append(_sparsity.PruningSummaries(log_dir=str(log_dir), update_freq="epoch",
                                                write_graph=False, profile_batch=0))
  return callbacks


def strip_pruning(model: keras.Model) -> keras.Model:
  """Removes the tfmot wrappers; the zeros stay in the plain kernels.

  tfmot's ``strip_pruning`` keeps the wrappers' variables, whose names carry a
  ``prune_low_magnitude_`` prefix into the SavedModel; the result is therefore
  cloned once more so that its variables are named like the base model's
  (``dense1/kernel``), which lets plain-TensorFlow consumers match M0/M1/M2
  variables by name.
  """
  stripped = _sparsity.strip_pruning(model)
  clean = keras.models.clone_model(stripped)
  clean.set_weights(stripped.get_weights())
  return clean


def has_pruning_wrappers(model: keras.Model) -> bool:
  """True if any layer of ``model`` is still a tfmot pruning wrapper."""
  return any(isinstance(l, _WRAPPER_TYPE) for l in model.layers)


def aligned_end_step(begin_step: int, end_step: int, frequency: int) -> int:
  """The last mask-update step <= ``end_step`` on the grid begin + k*frequency."""
  k = (int(end_step) - int(begin_step)) // int(frequency)
  return int(begin_step) + k * int(frequency)


# --------------------------------------------------------------------------
# Measuring sparsity and compression.
# --------------------------------------------------------------------------


def sparsity_report(model: keras.Model) -> dict[str, Any]:
  """Per-layer and overall kept (nonzero) fraction of a model's weights.

  Args:
    model: a (stripped) tf_keras model; wrappers are looked through.

  Returns:
    ``{"layers": [{"name", "type", "kernel_total", "kernel_nonzero",
    "kept_fraction", "bias_total", "bias_nonzero"}...], "by_type": {"Dense":
    {...}, "Conv2D": {...}}, "kernel_total", "kernel_nonzero",
    "kept_fraction", "weights_total", "weights_nonzero"}``. ``kept_fraction``
    is nonzero/total over kernels only; ``weights_*`` count kernels and biases.
  """
  layers, by_type = [], {}
  for layer in model.layers:
    inner = layer.layer if isinstance(layer, _WRAPPER_TYPE) else layer
    if not isinstance(inner, PRUNABLE_TYPES):
      continue
    kernel = keras.backend.get_value(inner.kernel)
    if isinstance(layer, _WRAPPER_TYPE):  # what the stripped kernel would hold
      mask = keras.backend.get_value(layer.pruning_vars[0][1])
      kernel = kernel * mask
    bias = keras.backend.get_value(inner.bias) if inner.use_bias else np.zeros([0])
    kind = "Conv2D" if isinstance(inner, keras.layers.Conv2D) else "Dense"
    row = {"name": inner.name, "type": kind,
           "kernel_total": int(kernel.size),
           "kernel_nonzero": int(np.count_nonzero(kernel)),
           "bias_total": int(bias.size), "bias_nonzero": int(np.count_nonzero(bias))}
    row["kept_fraction"] = row["kernel_nonzero"] / max(row["kernel_total"], 1)
    layers.append(row)
    agg = by_type.setdefault(kind, {"kernel_total": 0, "kernel_nonzero": 0})
    agg["kernel_total"] += row["kernel_total"]
    agg["kernel_nonzero"] += row["kernel_nonzero"]
  for agg in by_type.values():
    agg["kept_fraction"] = agg["kernel_nonzero"] / max(agg["kernel_total"], 1)
  kt = sum(r["kernel_total"] for r in layers)
  kn = sum(r["kernel_nonzero"] for r in layers)
  return {
      "layers": layers, "by_type": by_type,
      "kernel_total": kt, "kernel_nonzero": kn, "kept_fraction": kn / max(kt, 1),
      "weights_total": kt + sum(r["bias_total"] for r in layers),
      "weights_nonzero": kn + sum(r["bias_nonzero"] for r in layers),
  }


def gzipped_size(path: str | os.PathLike) -> int:
  """Bytes of a gzip'd tar of a SavedModel directory (or file), built in memory.

  Members are added in sorted order with fixed metadata, so the number depends
  only on the files' names and contents.
  """
  path = pathlib.Path(path)
  raw = io.BytesIO()
  with tarfile.open(fileobj=raw, mode="w") as tar:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
      info = tarfile.TarInfo(str(f.relative_to(path.parent if path.is_file() else path)))
      content = f.read_bytes()
      info.size = len(content)
      info.mtime = 0
      tar.addfile(info, io.BytesIO(content))
  return len(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))


@dataclasses.dataclass
class CompressionReport:
  """M0 vs M1: weights, kept fractions, gzip'd sizes and accuracies."""
  base: dict[str, Any]  # sparsity_report(M0)
  pruned: dict[str, Any]  # sparsity_report(M1)
  base_accuracy: float | None = None
  pruned_accuracy: float | None = None
  test_examples: int | None = None
  base_gzip_bytes: int | None = None
  pruned_gzip_bytes: int | None = None
  base_model_path: str | None = None
  pruned_model_path: str | None = None
  recipe: dict[str, Any] | None = None

  @property
  def compression_ratio(self) -> float:
    """M0 weights (kernels + biases) / M1 nonzero weights (kernels + biases)."""
    return self.base["weights_total"] / max(self.pruned["weights_nonzero"], 1)

  @property
  def kernel_compression_ratio(self) -> float:
    """M0 kernel weights / M1 nonzero kernel weights."""
    return self.base["kernel_total"] / max(self.pruned["kernel_nonzero"], 1)

  def to_dict(self) -> dict[str, Any]:
    return {
        "compression_ratio": self.compression_ratio,
        "compression_ratio_definition":
            "M0 weights (kernels + biases) / M1 nonzero weights (kernels + biases)",
        "kernel_compression_ratio": self.kernel_compression_ratio,
        "kept_fraction_definition": "nonzero / total kernel weights (biases are not pruned)",
        "base_accuracy": self.base_accuracy, "pruned_accuracy": self.pruned_accuracy,
        "test_examples": self.test_examples,
        "base_gzip_bytes": self.base_gzip_bytes, "pruned_gzip_bytes": self.pruned_gzip_bytes,
        "gzip_ratio": (self.base_gzip_bytes / self.pruned_gzip_bytes
                       if self.base_gzip_bytes and self.pruned_gzip_bytes else None),
        "base_model_path": self.base_model_path, "pruned_model_path": self.pruned_model_path,
        "recipe": self.recipe, "base": self.base, "pruned": self.pruned,
    }

  def to_markdown(self) -> str:
    def pct(x, digits=2):
      return "n/a" if x is None else f"{100 * x:.{digits}f}%"
    lines = [
        "| layer | type | kernel weights | nonzero | kept | biases (kept, not pruned) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in self.pruned["layers"]:
      lines.append(f"| {r['name']} | {r['type']} | {r['kernel_total']:,} | "
                   f"{r['kernel_nonzero']:,} | {pct(r['kept_fraction'], 3)} | "
                   f"{r['bias_nonzero']}/{r['bias_total']} |")
    for kind, agg in sorted(self.pruned["by_type"].items()):
      lines.append(f"| all {kind} | {kind} | {agg['kernel_total']:,} | "
                   f"{agg['kernel_nonzero']:,} | {pct(agg['kept_fraction'], 3)} | |")
    lines.append(f"| **total** | | {self.pruned['kernel_total']:,} | "
                 f"{self.pruned['kernel_nonzero']:,} | {pct(self.pruned['kept_fraction'], 3)} | |")
    lines += ["", "| | M0 (base) | M1 (pruned) |", "|---|---:|---:|",
              f"| weights (kernels + biases) | {self.base['weights_total']:,} | "
              f"{self.pruned['weights_nonzero']:,} nonzero |",
              f"| test accuracy (n={self.test_examples}) | {pct(self.base_accuracy)} | "
              f"{pct(self.pruned_accuracy)} |"]
    if self.base_gzip_bytes and self.pruned_gzip_bytes:
      lines.append(f"| gzip'd SavedModel | {self.base_gzip_bytes / 1e6:.3f} MB | "
                   f"{self.pruned_gzip_bytes / 1e6:.3f} MB "
                   f"({self.base_gzip_bytes / self.pruned_gzip_bytes:.2f}x smaller) |")
    lines += ["", f"Compression ratio (M0 weights / M1 nonzero weights): "
              f"**{self.compression_ratio:.2f}x** (kernels only: "
              f"{self.kernel_compression_ratio:.2f}x)."]
    lines += ["", "Kept = nonzero / total kernel weights (biases are not pruned); each kernel "
              "keeps at most floor(n * (1 - sparsity)) weights (`kept_at_most`)."]
    return "\n".join(lines) + "\n"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
    """Inverse of ``to_dict`` (derived fields are recomputed)."""
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

  def write(self, path_prefix: str | os.PathLike) -> tuple[str, str]:
    """Writes ``<prefix>.json`` and ``<prefix>.md`` atomically; returns both paths."""
    prefix = pathlib.Path(path_prefix)
    json_path, md_path = prefix.with_suffix(".json"), prefix.with_suffix(".md")
    io_utils.write_json(json_path, self.to_dict())
    title = f"# Compression report: {self.pruned_model_path or 'pruned model'}\n\n"
    io_utils.write_text(md_path, title + self.to_markdown())
    return str(json_path), str(md_path)


# --------------------------------------------------------------------------
# The pruning run: config in, M1 + report out.
# --------------------------------------------------------------------------


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
  # fine-tuning, as before. The fields mean what TrainConfig's do.
  adversarial: str | None = None  # None, or "pgd" | "fgsm_rs" | "trades"
  adv_epsilon: float = 0.3
  adv_steps: int | None = None  # None: 40 for pgd/trades, 1 for fgsm_rs
  adv_step_size: float | None = None  # None: 2.5 eps / steps; fgsm_rs 1.25 eps
  trades_beta: float = 6.0
  robust_val_size: int = 1000  # held-out images of the per-epoch PGD-10 check; 0: none

  # Distillation is not a pruning option; DefenseSetup reads these two.
  temperature = 1.0
  teacher_model_path = None

  def adversarial_steps(self) -> tuple[int, float]:
    """(steps, step size) of the fine-tuning attack, defaults filled in."""
    return training.adversarial_steps(self)

  def validate(self) -> "PruneConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    def need(cond, msg):
      if not cond:
        raise ConfigError(msg)
    for name in ("dense_sparsity", "conv_sparsity", "initial_sparsity"):
      try:
        _validate_sparsity(getattr(self, name), name)
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
    training.check_defense_fields(self)
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

  def to_dict(self) -> dict[str, Any]:
    extra = {} if self.defense is None else {"defense": self.defense}
    return {"base_accuracy": self.base_accuracy, "test_accuracy": self.test_accuracy,
            "validation_accuracy": self.validation_accuracy,
            "compression_ratio": self.report.compression_ratio,
            "kept_fraction_by_type": {k: v["kept_fraction"]
                                      for k, v in self.report.pruned["by_type"].items()},
            "begin_step": self.begin_step, "end_step": self.end_step, "steps": self.steps,
            "wall_seconds": self.wall_seconds, "saved_model_path": self.saved_model_path,
            "report_paths": list(self.report_paths), **extra}

  def summary(self) -> str:
    kept = ", ".join(f"{k} {100 * v['kept_fraction']:.2f}%"
                     for k, v in sorted(self.report.pruned["by_type"].items()))
    return (f"test accuracy {100 * self.base_accuracy:.2f}% -> {100 * self.test_accuracy:.2f}%; "
            f"kept {kept}; compression {self.report.compression_ratio:.2f}x; "
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
  """Prunes the SavedModel at ``config.base_model_path`` while fine-tuning.

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
  base = training.to_float32(export.load_model(config.base_model_path))
  first_epoch = min(training.resume_epoch(run_dir / "backup"), int(config.finetune_epochs))
  identity = {"stage": "prune", "model": base.name, "dataset": config.dataset}
  defense = None
  if config.adversarial:  # robust pruning: adversarial fine-tuning
    from keras_defense.defenses import trainer as defense_trainer  # pylint: disable=g-import-not-at-top
    defense = defense_trainer.DefenseSetup(config, run_dir, first_epoch=first_epoch,
                                           chief=chief, **common)
    identity["defense"] = defense.identity()
  if chief:
    training.claim_run_dir(run_dir, identity)

  # Epoch e's batch order depends only on (seed, e), so a resumed run matches.
  train_ds, steps_per_epoch = data.load_epochs(
      config.dataset, "train", batch_size=config.batch_size, seed=config.seed,
      epochs=int(config.finetune_epochs), first_epoch=first_epoch, limit=config.train_limit,
      **common)
  val_ds = None
  if ds_info.num_validation > 0:
    val_ds = data.load_split(config.dataset, "validation", batch_size=1000,
                             limit=config.test_limit, **common)
  test_ds = data.load_split(config.dataset, "test", batch_size=1000,
                            limit=config.test_limit, **common)
  # Multi-worker: element-wise sharding for fit (no-op for one process).
  train_ds, val_ds = (None if d is None else distribution.shard_by_data(d, strategy)
                      for d in (train_ds, val_ds))

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
  n_test = sum(int(y.shape[0]) for _, y in test_ds)
  base_path = pathlib.Path(config.base_model_path)
  report = CompressionReport(
      base=sparsity_report(base), pruned=sparsity_report(stripped),
      base_accuracy=base_accuracy, pruned_accuracy=test_accuracy, test_examples=n_test,
      base_gzip_bytes=gzipped_size(base_path) if base_path.is_dir() else None,
      pruned_gzip_bytes=gzipped_size(saved) if saved else None,
      base_model_path=str(config.base_model_path), pruned_model_path=saved,
      recipe={k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("verbose", "data_dir", "manual_dir")}
      | {"begin_step": begin_step, "end_step": end_step, "steps_per_epoch": steps_per_epoch})
  paths = report.write(config.report_path) if config.report_path and chief else ()
  result = PruneResult(
      model=stripped, report=report, base_accuracy=base_accuracy,
      test_accuracy=test_accuracy,
      validation_accuracy=None if val_acc is None else float(val_acc),
      begin_step=begin_step, end_step=end_step, steps=total_steps,
      wall_seconds=time.time() - start, saved_model_path=saved, report_paths=tuple(paths),
      defense=None if defense is None else defense.summary())
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
