"""Training's configuration: ``TrainConfig``, the adversarial spec, their checks.

``TrainConfig`` is what ``loop.train`` needs, field for field the flags that
fill it. ``AdversarialSpec`` is adversarial training's attack (method, epsilon,
steps, step size, TRADES' beta, the robust-validation size): ``TrainConfig``
and robust pruning's ``defenses.pruning.PruneConfig`` both hold one (or None)
and ``defenses.trainer.DefenseSetup`` takes it. The checks raise
``ConfigError`` naming the field or flag; ``claim_run_dir`` binds a run
directory to the run that made it, so a different run cannot resume its
checkpoints.

Dumps keep the flags' vocabulary: ``config_dict`` spreads the spec into the
six fields its flags name (``adversarial``, ``adv_epsilon``, ``adv_steps``,
``adv_step_size``, ``trades_beta``, ``robust_val_size``), so results files,
reports and run-directory bindings read as they did before the spec.

Example:
  >>> config = TrainConfig(adversarial=AdversarialSpec("pgd", epsilon=0.3, steps=40))
  >>> config.validate().adversarial.attack_steps()
  (40, 0.01875)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from keras_defense import models
from keras_defense.training import distribution
from keras_defense.util import config_checks
from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

OPTIMIZERS = ("sgd", "adam")
COMPUTE_DTYPES = ("float32", "bfloat16")
ADVERSARIAL_METHODS = ("pgd", "fgsm_rs", "trades")  # keras_defense.defenses.adversarial_training
CERTIFIED_METHODS = ("ibp", "crown_ibp")  # keras_defense.defenses.trainer (certified training)


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


def _spec_checker(spec: Any, method_flag: str, methods: tuple[str, ...],
                  epsilon_flag: str):
  """Checks what both training specs have, then returns ``need`` for the rest.

  ``spec.method`` must be one of ``methods`` and ``spec.epsilon`` (an L-inf
  training radius) in (0, 1]; the messages name the flags that set them.

  Raises:
    ConfigError: either is bad.
  """
  need = config_checks.checker(ConfigError)
  need(spec.method in methods,
       f"`{method_flag}` must be None or one of {', '.join(methods)}; got {spec.method!r}.")
  need(0 < spec.epsilon <= 1, f"`{epsilon_flag}` must be in (0, 1]; got {spec.epsilon}.")
  return need


@dataclasses.dataclass(frozen=True)
class AdversarialSpec:
  """Adversarial training's attack, one for training and robust pruning alike.

  The flags that fill it keep their names (``--adversarial --adv_epsilon
  --adv_steps --adv_step_size --trades_beta --robust_val_size``), and so do the
  messages of ``validate``: they name the flag a user sets.

  Attributes:
    method: ``ADVERSARIAL_METHODS``: "pgd" (Madry et al. 2018), "fgsm_rs"
      (Wong et al. 2020) or "trades" (Zhang et al. 2019).
    epsilon: L-inf radius, (0, 1]; Madry, Wong and TRADES on MNIST: 0.3.
    steps: steps of the inner maximisation; None: 40 for pgd/trades (Madry's
      MNIST), 1 for fgsm_rs.
    step_size: None: 2.5 eps / steps (Madry's rule); fgsm_rs 1.25 eps (Wong).
    trades_beta: TRADES' weight of the KL term (TRADES: 6).
    robust_val_size: held-out images of the per-epoch PGD-10 check; 0: none.
  """
  method: str
  epsilon: float = 0.3
  steps: int | None = None
  step_size: float | None = None
  trades_beta: float = 6.0
  robust_val_size: int = 1000

  def validate(self) -> "AdversarialSpec":
    """Checks every field; returns self. Raises ConfigError naming the flag."""
    need = _spec_checker(self, "adversarial", ADVERSARIAL_METHODS, "adv_epsilon")
    need(self.steps is None or int(self.steps) >= 1,
         f"`adv_steps` must be >= 1; got {self.steps}.")
    need(self.method != "fgsm_rs" or self.steps in (None, 1),
         f"`adv_steps` must be 1 (or unset) with adversarial='fgsm_rs'; got {self.steps}.")
    need(self.step_size is None or self.step_size > 0,
         f"`adv_step_size` must be > 0; got {self.step_size}.")
    need(self.trades_beta >= 0, f"`trades_beta` must be >= 0; got {self.trades_beta}.")
    need(int(self.robust_val_size) >= 0,
         f"`robust_val_size` must be >= 0; got {self.robust_val_size}.")
    return self

  def attack_steps(self) -> tuple[int, float]:
    """(steps, step size) of the inner maximisation, the method's defaults filled in."""
    steps = self.steps or (1 if self.method == "fgsm_rs" else 40)
    if self.step_size is not None:
      return int(steps), float(self.step_size)
    if self.method == "fgsm_rs":
      return 1, 1.25 * float(self.epsilon)  # Wong et al. 2020: alpha = 1.25 eps
    return int(steps), 2.5 * float(self.epsilon) / int(steps)

  def identity(self) -> dict[str, Any]:
    """The attack as it runs (defaults filled in): run-dir identity and provenance."""
    steps, step_size = self.attack_steps()
    out = {"adversarial": self.method, "adv_epsilon": self.epsilon, "adv_steps": steps,
           "adv_step_size": step_size}
    if self.method == "trades":
      out["trades_beta"] = self.trades_beta
    return out


def adversarial_flags(spec: AdversarialSpec | None) -> dict[str, Any]:
  """``spec`` as its six flags (None: no ``--adversarial``, the others at their defaults)."""
  if spec is None:
    return {"adversarial": None, **{k: v for k, v in adversarial_flags(
        AdversarialSpec("pgd")).items() if k != "adversarial"}}
  return {"adversarial": spec.method, "adv_epsilon": spec.epsilon, "adv_steps": spec.steps,
          "adv_step_size": spec.step_size, "trades_beta": spec.trades_beta,
          "robust_val_size": spec.robust_val_size}


ADVERSARIAL_FLAGS = tuple(adversarial_flags(None))  # the six flag names, in order


@dataclasses.dataclass(frozen=True)
class CertifiedSpec:
  """Certified training's bound and schedules (Gowal et al. 2018; Zhang et al. 2020).

  The loss is ``κ·CE(z(x), y) + (1-κ)·CE(ẑ(x, ε), y)`` with ``ẑ`` the
  worst-case logits of the ε-ball (``certify.losses``). ε ramps linearly
  from 0 to ``epsilon`` over ``ramp_epochs`` after ``warmup_epochs`` of
  clean training, κ from 1 to ``kappa_final`` over the same steps; with
  "crown_ibp" the bound mixes CROWN-IBP and IBP, β·CROWN-IBP + (1-β)·IBP,
  β from 1 to 0 over the ramp (Zhang et al.). The ramps are functions of the
  optimizer's step counter, so a resumed run continues them where it stopped.
  Flags: ``--certified --cert_epsilon --cert_warmup_epochs --cert_ramp_epochs
  --cert_kappa_final --cert_val_epsilon --cert_val_size``.

  Attributes:
    method: ``CERTIFIED_METHODS``: "ibp" or "crown_ibp".
    epsilon: L-inf training radius, (0, 1]; Gowal et al. MNIST: 0.4 to test at 0.3.
    warmup_epochs: clean-training epochs before the ramp (Gowal et al. MNIST:
      2k steps at batch 100, ~3.6 epochs of 55k images).
    ramp_epochs: epochs over which ε and κ ramp (Gowal et al. MNIST: 10k steps, ~18 epochs).
    kappa_final: κ after the ramp, [0, 1] (Gowal et al.: 0.5).
    val_epsilon: the per-epoch IBP-certified-accuracy check's radius (None: ``epsilon``).
    val_size: held-out validation images of that check; 0: none.
  """
  method: str
  epsilon: float = 0.4
  warmup_epochs: float = 1.0
  ramp_epochs: float = 5.0
  kappa_final: float = 0.5
  val_epsilon: float | None = None
  val_size: int = 1000

  def validate(self) -> "CertifiedSpec":
    """Checks every field; returns self. Raises ConfigError naming the flag."""
    need = _spec_checker(self, "certified", CERTIFIED_METHODS, "cert_epsilon")
    need(self.warmup_epochs >= 0,
         f"`cert_warmup_epochs` must be >= 0; got {self.warmup_epochs}.")
    need(self.ramp_epochs >= 0, f"`cert_ramp_epochs` must be >= 0; got {self.ramp_epochs}.")
    need(0 <= self.kappa_final <= 1,
         f"`cert_kappa_final` must be in [0, 1]; got {self.kappa_final}.")
    need(self.val_epsilon is None or 0 < self.val_epsilon <= 1,
         f"`cert_val_epsilon` must be in (0, 1]; got {self.val_epsilon}.")
    need(int(self.val_size) >= 0, f"`cert_val_size` must be >= 0; got {self.val_size}.")
    return self

  def guard_epsilon(self) -> float:
    """The radius of the per-epoch certified-accuracy check."""
    return float(self.epsilon if self.val_epsilon is None else self.val_epsilon)

  def ramp_steps(self, steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, ramp steps) for ``steps_per_epoch`` optimizer steps per epoch."""
    return (int(round(self.warmup_epochs * steps_per_epoch)),
            int(round(self.ramp_epochs * steps_per_epoch)))

  def identity(self) -> dict[str, Any]:
    """The training as it runs: run-dir identity and provenance."""
    return {"certified": self.method, "cert_epsilon": self.epsilon,
            "cert_warmup_epochs": self.warmup_epochs, "cert_ramp_epochs": self.ramp_epochs,
            "cert_kappa_final": self.kappa_final}


def certified_flags(spec: CertifiedSpec) -> dict[str, Any]:
  """``spec`` as its seven flags."""
  return {"certified": spec.method, "cert_epsilon": spec.epsilon,
          "cert_warmup_epochs": spec.warmup_epochs, "cert_ramp_epochs": spec.ramp_epochs,
          "cert_kappa_final": spec.kappa_final, "cert_val_epsilon": spec.val_epsilon,
          "cert_val_size": spec.val_size}


def check_certified(spec: CertifiedSpec | None) -> None:
  """Checks a ``certified`` field. Raises ConfigError: not None or a ``CertifiedSpec``, or bad."""
  if spec is None:
    return
  if not isinstance(spec, CertifiedSpec):
    raise ConfigError(f"`certified` must be None or a training.CertifiedSpec (e.g. "
                      f"CertifiedSpec({CERTIFIED_METHODS[0]!r})); got {spec!r}.")
  spec.validate()


# Fields added after the reports they would appear in were made (--init_model,
# --export_keras): unset, they are left out of the dumps like an unset ``certified``.
_LEFT_OUT_WHEN_UNSET = ("init_model", "export_keras")


def config_dict(config: Any) -> dict[str, Any]:
  """``dataclasses.asdict(config)`` with an ``adversarial`` spec spread into its flags.

  The dumps (results files, reports, the sweep's binding) keep the keys the
  flags name, in the order the fields had before the spec. A ``certified``
  spec is spread into its flags too; unset (None) it is left out, so the
  dumps of other runs read as before it existed; so are ``init_model`` and
  ``export_keras``.
  """
  out = {}
  for name, value in dataclasses.asdict(config).items():
    spec = getattr(config, name)
    if name == "adversarial" and (spec is None or isinstance(spec, AdversarialSpec)):
      out.update(adversarial_flags(spec))
    elif name == "certified" and (spec is None or isinstance(spec, CertifiedSpec)):
      out.update({} if spec is None else certified_flags(spec))
    elif name in _LEFT_OUT_WHEN_UNSET and value is None:
      continue
    else:
      out[name] = value
  return out


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
  adversarial: AdversarialSpec | None = None  # adversarial training (flags --adversarial ...)
  temperature: float = 1.0  # softmax temperature of the training loss (distillation)
  teacher_model_path: str | None = None  # distillation: learn this model's soft labels at T
  certified: CertifiedSpec | None = None  # certified training (flags --certified ...)
  # Start from the user's model (Keras 3/tf_keras .keras, .h5, SavedModel) instead of a
  # C&W net (training.initial_model); `model` and `dropout` then do not apply.
  init_model: str | None = None
  export_keras: str | None = None  # init_model's format back; None: <export_dir>/<version>.keras

  def validate(self) -> "TrainConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    need = config_checks.checker(ConfigError)
    need(self.model is None or self.model in models.MODEL_NAMES,
         f"`model` must be one of {', '.join(models.MODEL_NAMES)}; got {self.model!r}.")
    need(int(self.epochs) >= 1, f"`epochs` must be >= 1; got {self.epochs}.")
    need(0 <= self.dropout < 1, f"`dropout` must be in [0, 1); got {self.dropout}.")
    need(self.compute_dtype in COMPUTE_DTYPES,
         f"`compute_dtype` must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}.")
    check_adversarial(self.adversarial)
    need(self.temperature > 0, f"`temperature` must be > 0; got {self.temperature}.")
    need(self.adversarial is None or (self.temperature == 1.0
                                      and self.teacher_model_path is None),
         f"`adversarial` ({self.adversarial.method if self.adversarial else None!r}) cannot "
         f"be combined with `temperature` != 1 or `teacher_model_path`; got "
         f"temperature={self.temperature}, teacher_model_path={self.teacher_model_path!r}.")
    need(self.teacher_model_path is None or bool(self.teacher_model_path),
         "`teacher_model_path` must name a SavedModel or be None; got an empty string.")
    check_certified(self.certified)
    if self.certified is not None:
      need(self.adversarial is None and self.temperature == 1.0
           and self.teacher_model_path is None,
           f"`certified` ({self.certified.method!r}) cannot be combined with `adversarial`, "
           f"`temperature` != 1 or `teacher_model_path`; got adversarial="
           f"{self.adversarial.method if self.adversarial else None!r}, temperature="
           f"{self.temperature}, teacher_model_path={self.teacher_model_path!r}.")
      need(self.compute_dtype == "float32",
           f"`certified` training bounds the network in float32: `compute_dtype` must be "
           f"'float32'; got {self.compute_dtype!r}.")
    need(self.init_model is None or (bool(self.init_model) and self.model is None
                                     and self.compute_dtype == "float32"),
         f"`init_model` must name a model file or SavedModel and cannot be combined with "
         f"`model` or a `compute_dtype` other than float32; got init_model="
         f"{self.init_model!r}, model={self.model!r}, compute_dtype={self.compute_dtype!r}.")
    need(self.export_keras is None or (self.init_model is not None
                                       and str(self.export_keras).endswith(".keras")),
         f"`export_keras` must be a path ending in .keras and goes with `init_model`; got "
         f"{self.export_keras!r} (init_model={self.init_model!r}).")
    check_fit_fields(self)
    return self

  def defended(self) -> bool:
    """True if a trained defense changes the training step (else: plain ``fit``)."""
    return (self.adversarial is not None or self.temperature != 1.0
            or self.teacher_model_path is not None or self.certified is not None)

  def model_name(self, image_shape) -> str:
    """``init_model:<path>``, ``model``, or the C&W network for ``image_shape``."""
    if self.init_model:
      return f"init_model:{self.init_model}"
    return self.model or models.model_for_shape(image_shape)


def check_adversarial(spec: AdversarialSpec | None) -> None:
  """Checks an ``adversarial`` field (``TrainConfig``'s or ``PruneConfig``'s).

  Raises:
    ConfigError: not None or an ``AdversarialSpec``, or a bad spec field.
  """
  if spec is None:
    return
  if not isinstance(spec, AdversarialSpec):
    raise ConfigError(
        f"`adversarial` must be None or a training.AdversarialSpec (e.g. "
        f"AdversarialSpec({ADVERSARIAL_METHODS[0]!r})); got {spec!r}.")
  spec.validate()


def check_fit_fields(config) -> None:
  """Checks the fields training and pruning share (optimizer, schedule, data, output).

  Args:
    config: a ``TrainConfig`` or ``pruning.PruneConfig``.

  Raises:
    ConfigError: naming the first bad field.
  """
  need = config_checks.checker(ConfigError)
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
