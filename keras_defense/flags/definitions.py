"""Flag definitions shared by the keras-defense binaries, each defined once.

Every flag is optional (has a default) so tests can import this module; range
checks are absl validators, so a bad value stops the binary with one line
naming the flag. A flag is named like the config field it fills. Library code
never reads FLAGS: binaries turn flags into a config with the ``*_config()``
functions here.
"""

from __future__ import annotations

import copy

from absl import flags

from keras_defense import data
from keras_defense import models
from keras_defense import training
from keras_defense.util.errors import UserError

FLAGS = flags.FLAGS

# --- data -------------------------------------------------------------------
flags.DEFINE_string("dataset", "mnist",
                    "tfds image-classification dataset with 28x28x1 or 32x32x3 uint8 images and "
                    "a label (mnist, fashion_mnist, kmnist, cifar10, ...), or folder:PATH for "
                    "PATH/train/<class>/*.png|jpg and PATH/test/<class>/... (tfds ImageFolder). "
                    "kd-experiment uses it for every stage.")
flags.DEFINE_string("image_size", None,
                    "Convert and resize every image to 28x28x1 or 32x32x3 (default: the images "
                    "must already have one of those shapes).")
flags.DEFINE_string("data_dir", None, "tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", None,
                    "Folder with the dataset's official files (e.g. cifar-10-binary.tar.gz). "
                    "MNIST needs none: the package carries its files.")
flags.DEFINE_integer("validation_size", None,
                     "Training examples held out for validation (default min(5000, n_train/10); "
                     "C&W: 5000).", lower_bound=0)
flags.DEFINE_integer("train_limit", None, "Use only this many training examples.", lower_bound=1)
flags.DEFINE_integer("test_limit", None, "Use only this many test/validation examples.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed for data order, weights and attacks.")
flags.DEFINE_bool("deterministic", False,
                  "Enable TensorFlow op determinism: same seed and flags give identical "
                  "numbers. Off by default for kd-train/kd-prune; flags/mnist.flags turns "
                  "it on for kd-experiment (ExperimentConfig defaults to on); no measurable "
                  "cost on CPU.")

# --- model and training -----------------------------------------------------
flags.DEFINE_enum("model", None, list(models.MODEL_NAMES),
                  "Architecture; default: the paper's model for --dataset.")
flags.DEFINE_string("run_dir", None, "Run directory: checkpoints, TensorBoard, results.")
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Batch size (C&W: 128).", lower_bound=1)
flags.DEFINE_enum("optimizer", "sgd", list(training.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 0.05, "Initial learning rate.", lower_bound=0.0)
flags.DEFINE_float("momentum", 0.9, "SGD momentum (C&W: 0.9).", lower_bound=0.0, upper_bound=0.999)
flags.DEFINE_bool("nesterov", True, "Nesterov momentum (C&W: true).")
flags.DEFINE_list("lr_decay_epochs", ["5", "8"],
                  "Epochs at which the learning rate is multiplied by --lr_decay_factor.")
flags.DEFINE_float("lr_decay_factor", 0.2, "Step decay factor in (0, 1].")
flags.DEFINE_float("dropout", 0.5, "Dropout after the first Dense layer (C&W: 0.5).")
flags.DEFINE_enum("compute_dtype", "float32", list(training.COMPUTE_DTYPES),
                  "float32, or bfloat16 (Keras mixed_bfloat16; variables stay float32).")
flags.DEFINE_string("export_dir", None,
                    "SavedModel base folder, e.g. saved_models/mnist_m0 (TF Serving layout <base>/<version>/).")
flags.DEFINE_integer("export_version", None, "SavedModel version (default: next free).", lower_bound=1)

# --- distribution (kd-train, kd-prune, kd-experiment) -----------------------
from keras_defense.training import distribution as _dist  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_enum("strategy", "default", list(_dist.STRATEGIES),
                  "tf.distribute strategy: default (one device), mirrored (all local GPUs, "
                  "or --num_cpu_devices logical CPUs), multi_worker (TF_CONFIG cluster). "
                  "See docs/DISTRIBUTED.md.")
flags.DEFINE_integer("num_cpu_devices", None,
                     "With --strategy=mirrored and no GPU: logical CPU devices (default 2).",
                     lower_bound=1)
flags.register_multi_flags_validator(
    ["strategy", "num_cpu_devices"],
    lambda d: d["num_cpu_devices"] is None or d["strategy"] == "mirrored",
    "--num_cpu_devices only goes with --strategy=mirrored.")

flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator(
    "image_size", lambda v: v is None or v.lower() in ("28x28x1", "32x32x3"),
    "--image_size must be 28x28x1 or 32x32x3.")


def dataset_name(fv=None) -> str:
  """--dataset with --image_size folded in (``data.with_image_size``)."""
  fv = FLAGS if fv is None else fv
  return data.with_image_size(fv.dataset, fv.image_size)
flags.register_validator("lr_decay_factor", lambda v: 0 < v <= 1,
                         "--lr_decay_factor must be in (0, 1].")
flags.register_validator("dropout", lambda v: 0 <= v < 1, "--dropout must be in [0, 1).")
flags.register_validator(
    "lr_decay_epochs", lambda v: all(s.strip().isdigit() and int(s) >= 1 for s in v),
    "--lr_decay_epochs must be a comma-separated list of epochs >= 1.")

# --- adversarial training (kd-train; kd-prune: robust pruning; keras_defense.defenses)
flags.DEFINE_enum("adversarial", None, list(training.ADVERSARIAL_METHODS),
                  "Train (kd-train) or fine-tune while pruning (kd-prune: robust pruning) on "
                  "adversarial examples crafted in every step: pgd (Madry et al. 2018), "
                  "fgsm_rs (FGSM from a random start, Wong et al. 2020) or trades (Zhang et "
                  "al. 2019). Default: standard training.")
flags.DEFINE_float("adv_epsilon", 0.3, "L-inf radius of the training attack (MNIST papers: 0.3).")
flags.DEFINE_integer("adv_steps", None,
                     "Steps of the training attack (default: 40 for pgd/trades, Madry's MNIST; "
                     "fgsm_rs takes 1).", lower_bound=1)
flags.DEFINE_float("adv_step_size", None,
                   "Step of the training attack (default: 2.5 * eps / steps for pgd/trades; "
                   "1.25 * eps for fgsm_rs, Wong et al.).")
flags.DEFINE_float("trades_beta", 6.0, "TRADES beta, the weight of the KL term (TRADES: 6).",
                   lower_bound=0.0)
flags.DEFINE_integer("robust_val_size", 1000,
                     "Held-out validation images of the per-epoch PGD-10 robust-accuracy check "
                     "that keeps the best epoch (0: no check).", lower_bound=0)
flags.register_validator("adv_epsilon", lambda v: 0 < v <= 1, "--adv_epsilon must be in (0, 1].")
flags.register_validator("adv_step_size", lambda v: v is None or v > 0,
                         "--adv_step_size must be > 0.")
# --- defensive distillation (kd-train twice; keras_defense.defenses.distillation)
flags.DEFINE_float("temperature", 1.0,
                   "Softmax temperature of the training loss (defensive distillation, Papernot "
                   "et al. 2016: 100 for the teacher and the student; the exported model is "
                   "deployed at T = 1). 1: standard training.")
flags.DEFINE_string("teacher_model_path", None,
                    "Distillation's student: learn this SavedModel's soft labels "
                    "softmax(logits / T) instead of the labels (train the teacher first with "
                    "the same --temperature).")
flags.register_validator("temperature", lambda v: v > 0, "--temperature must be > 0.")
flags.register_multi_flags_validator(
    ["adversarial", "adv_steps"],
    lambda d: d["adversarial"] != "fgsm_rs" or d["adv_steps"] in (None, 1),
    "--adversarial=fgsm_rs takes one step: leave --adv_steps unset or 1.")


def train_config(fv=None) -> training.TrainConfig:
  """The TrainConfig the training flags describe."""
  fv = FLAGS if fv is None else fv
  return training.TrainConfig(
      dataset=dataset_name(fv), model=fv.model,
      run_dir=fv.run_dir or f"runs/{data.slug(dataset_name(fv))}_train",
      epochs=fv.epochs, batch_size=fv.batch_size, optimizer=fv.optimizer,
      learning_rate=fv.learning_rate, momentum=fv.momentum,
      nesterov=fv.nesterov,
      lr_decay_epochs=tuple(int(e) for e in fv.lr_decay_epochs),
      lr_decay_factor=fv.lr_decay_factor, dropout=fv.dropout,
      seed=fv.seed, train_limit=fv.train_limit, test_limit=fv.test_limit,
      validation_size=fv.validation_size, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, export_dir=fv.export_dir,
      export_version=fv.export_version, compute_dtype=fv.compute_dtype,
      deterministic=fv.deterministic, strategy=fv.strategy,
      num_cpu_devices=fv.num_cpu_devices, **_adversarial_fields(fv),
      temperature=fv.temperature, teacher_model_path=fv.teacher_model_path)


def _adversarial_fields(fv) -> dict:
  """The adversarial-training flags, for TrainConfig and PruneConfig (robust pruning)."""
  return {name: fv[name].value for name in training.ADVERSARIAL_FIELDS}


# --- pruning and logits augmentation ---------------------------------------
# (kd-prune, kd-augment; reuse the data/training/export flags above:
# --learning_rate, --optimizer, --momentum, --nesterov, --lr_decay_epochs,
# --lr_decay_factor, --batch_size, --run_dir, --export_dir, --export_version,
# --seed, --dataset, --train_limit, --test_limit, --validation_size.)
from keras_defense.defenses import logits_augmentation as _la  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_string("base_model_path", None,
                    "SavedModel to transform: M0 for kd-prune (saved_models/mnist_m0/1), "
                    "M1 for kd-augment (saved_models/mnist_m1/1).")
flags.DEFINE_float("dense_sparsity", 0.90,
                   "Final fraction of zeroed weights in every Dense kernel, [0, 1). Design "
                   "card: 0.90 (keep 10%); authors' 20 rounds of 10%: 1-0.9^20 = 0.878.")
flags.DEFINE_float("conv_sparsity", 0.95,
                   "Final fraction of zeroed weights in every Conv2D kernel, [0, 1). Design "
                   "card: 0.95 (keep 5%); authors' 20 rounds of 5%: 1-0.95^20 = 0.642.")
flags.DEFINE_float("initial_sparsity", 0.0, "Sparsity when pruning begins, [0, 1).")
flags.DEFINE_bool("prune_logits", True,
                  "Prune the logits Dense layer too (design card: all FC layers).")
flags.DEFINE_float("finetune_dropout", None,
                   "Dropout rate while fine-tuning the pruned model (default: the base "
                   "model's, C&W 0.5). No effect at inference.")
flags.DEFINE_float("pruning_begin_epoch", 0.0,
                   "Fine-tuning epoch (may be fractional) at which pruning starts.", lower_bound=0.0)
flags.DEFINE_float("pruning_end_epoch", 4.0,
                   "Epoch at which the final sparsity is reached (PolynomialDecay, power 3).",
                   lower_bound=0.0)
flags.DEFINE_integer("pruning_frequency", 100, "Steps between mask updates.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 8, "Epochs of fine-tuning while/after pruning.",
                     lower_bound=1)
flags.DEFINE_string("report_path", None,
                    "Compression report prefix: writes <prefix>.json and <prefix>.md "
                    "(e.g. reports/compression/mnist_m1).")
flags.DEFINE_enum("transform", "logits_augmentation", list(_la.TRANSFORMS),
                  "logits_augmentation: logits kernel W <- (1+eps)W (the defense's M2); "
                  "gradient_inhibition: every Dense kernel W <- W + eps*sign(W) (Liu et al. "
                  "ASP-DAC'18).")
flags.DEFINE_float("logits_epsilon", 20.0,
                   "Logits augmentation eps, W <- (1+eps)W. Authors' code recommends 20 for "
                   "MNIST and 10 for CIFAR-10; their later default was 100.", lower_bound=0.0)
flags.DEFINE_float("inhibition_epsilon", _la.GRADIENT_INHIBITION_EPSILON,
                   "Gradient inhibition eps, W <- W + eps*sign(W) (Liu et al.: 0.1).",
                   lower_bound=0.0)
flags.register_validator("dense_sparsity", lambda v: 0 <= v < 1,
                         "--dense_sparsity must be in [0, 1).")
flags.register_validator("conv_sparsity", lambda v: 0 <= v < 1,
                         "--conv_sparsity must be in [0, 1).")
flags.register_validator("initial_sparsity", lambda v: 0 <= v < 1,
                         "--initial_sparsity must be in [0, 1).")


def prune_config(fv=None):
  """The PruneConfig the pruning flags describe."""
  fv = FLAGS if fv is None else fv
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top  (imports tfmot)
  name = dataset_name(fv)
  return pruning.PruneConfig(
      base_model_path=fv.base_model_path or f"saved_models/{data.slug(name)}_m0/1",
      dataset=name, run_dir=fv.run_dir or f"runs/{data.slug(name)}_prune",
      dense_sparsity=fv.dense_sparsity, conv_sparsity=fv.conv_sparsity,
      initial_sparsity=fv.initial_sparsity, prune_logits=fv.prune_logits,
      finetune_dropout=fv.finetune_dropout,
      pruning_begin_epoch=fv.pruning_begin_epoch,
      pruning_end_epoch=fv.pruning_end_epoch,
      pruning_frequency=fv.pruning_frequency, finetune_epochs=fv.finetune_epochs,
      batch_size=fv.batch_size, optimizer=fv.optimizer,
      learning_rate=fv.learning_rate, momentum=fv.momentum, nesterov=fv.nesterov,
      lr_decay_epochs=tuple(int(e) for e in fv.lr_decay_epochs),
      lr_decay_factor=fv.lr_decay_factor, seed=fv.seed,
      train_limit=fv.train_limit, test_limit=fv.test_limit,
      validation_size=fv.validation_size, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, export_dir=fv.export_dir,
      export_version=fv.export_version, report_path=fv.report_path,
      deterministic=fv.deterministic, strategy=fv.strategy,
      num_cpu_devices=fv.num_cpu_devices, verbose=2,  # one log line per epoch
      **_adversarial_fields(fv))


def augment_config(fv=None) -> _la.AugmentConfig:
  """The AugmentConfig the augmentation flags describe."""
  fv = FLAGS if fv is None else fv
  name = dataset_name(fv)
  return _la.AugmentConfig(
      base_model_path=fv.base_model_path or f"saved_models/{data.slug(name)}_m1/1",
      transform=fv.transform, logits_epsilon=fv.logits_epsilon,
      inhibition_epsilon=fv.inhibition_epsilon, dataset=name,
      test_limit=fv.test_limit, data_dir=fv.data_dir, manual_dir=fv.manual_dir,
      export_dir=fv.export_dir, export_version=fv.export_version)


# --- experiment (kd-experiment) ---------------------------------------------
from keras_defense.evaluation import grid as _ev  # noqa: E402  pylint: disable=g-import-not-at-top
from keras_defense.evaluation import threat_models as _tm  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_string("train_flagfile", None, "Flagfile of the M0 training stage (flags/mnist_m0.flags).")
flags.DEFINE_string("prune_flagfile", None, "Flagfile of the M1 pruning stage (flags/mnist_m1.flags).")
flags.DEFINE_string("augment_flagfile", None, "Flagfile of the M2 stage (flags/mnist_m2.flags).")
flags.DEFINE_list("stages", ["train", "prune", "augment", "attack", "autoattack", "report"],
                  "Stages to run, in order; finished stages are skipped on a rerun.")
flags.DEFINE_bool("reuse_saved_models", False,
                  "Attack the shipped saved_models/<dataset>_{m0,m1,m2}/1 instead of "
                  "training, pruning and augmenting.")
flags.DEFINE_string("saved_models_dir", "saved_models", "Where --reuse_saved_models looks.")
flags.DEFINE_list("attacks", ["fgsm", "bim"], "Gradient attacks of the grid: fgsm, bim.")
flags.DEFINE_list("epsilons", ["0.05", "0.1", "0.2", "0.3"],
                  "L-inf radii in [0, 1] pixel units; fractions allowed (8/255).")
flags.DEFINE_list("targeted_modes", ["untargeted", "targeted"], "untargeted, targeted or both.")
flags.DEFINE_enum("target_selection", "random", list(_ev.TARGET_SELECTIONS),
                  "Targets: random other class, least_likely class, or next class.")
flags.DEFINE_list("threat_models", list(_tm.THREAT_MODELS),
                  "grey_box, transfer, adaptive (see BUILD.md).")
flags.DEFINE_integer("eval_size", 2000,
                     "Test images for FGSM/BIM (the reproduction's 2,000; unset for all).",
                     lower_bound=1)
flags.DEFINE_integer("bim_steps", 10, "BIM iterations (defense authors' code: 10).", lower_bound=1)
flags.DEFINE_float("rel_step_size", 0.25, "BIM step size as a fraction of epsilon.")
flags.DEFINE_list("cw_attacks", ["cw_l2", "cw_linf", "cw_l0"],
                  "Carlini-Wagner attacks of the grid (empty for none).")
flags.DEFINE_integer("cw_eval_size", 100, "Test images for the C&W attacks.", lower_bound=1)
flags.DEFINE_list("cw_targeted_modes", ["untargeted"],
                  "C&W modes: untargeted, targeted or both (targeted doubles their cost).")
# The C&W budgets default to the reproduction's (flags/mnist.flags), so that
# kd-experiment --dataset=NAME with no flagfile finishes in minutes; C&W's own
# values are in the help.
flags.DEFINE_integer("cw_linf_eval_size", 50,
                     "Test images for C&W L-inf (unset: --cw_eval_size).", lower_bound=1)
flags.DEFINE_integer("cw_l0_eval_size", 20,
                     "Test images for C&W L0, the slowest (unset: --cw_eval_size).",
                     lower_bound=1)
flags.DEFINE_integer("cw_linf_max_iterations", 100,
                     "C&W L-inf/L0 iterations per round (unset: --cw_max_iterations).",
                     lower_bound=1)
flags.DEFINE_integer("cw_binary_search_steps", 5, "C&W L2 binary-search steps (C&W: 9).",
                     lower_bound=1)
flags.DEFINE_integer("cw_max_iterations", 200, "C&W iterations per search step (C&W: 1000).",
                     lower_bound=1)
flags.DEFINE_integer("attack_batch_size", 1000, "Images per compiled attack call.", lower_bound=1)
flags.DEFINE_enum("attack_compute_dtype", "float32", ["float32", "bfloat16"],
                  "Attack arithmetic; bfloat16 is faster on CPUs with AMX/AVX-512 BF16 but "
                  "changes where softmax saturates.")
flags.DEFINE_enum("autoattack_version", "standard", list(_ev.AUTOATTACK_VERSIONS),
                  "kd-experiment's AutoAttack stage on every model (Croce & Hein 2020): "
                  "standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand, or none.")
flags.DEFINE_list("autoattack_epsilons", [],
                  "L-inf radii of the AutoAttack stage (default: the largest of --epsilons; "
                  "at small radii most images stay robust and each costs the whole ensemble).")
flags.DEFINE_integer("autoattack_size", 1000,
                     "Test images for the AutoAttack stage (RobustBench: 10000; "
                     "flags/mnist.flags uses all 10,000).", lower_bound=1)
flags.DEFINE_integer("sanity_size", 100,
                     "Test images for the sanity check at epsilon 1 (0: skip).", lower_bound=0)


def _parse_epsilon(text: str) -> float:
  text = text.strip()
  try:
    if "/" in text:
      num, den = text.split("/")
      return float(num) / float(den)
    return float(text)
  except (ValueError, ZeroDivisionError):
    raise flags.ValidationError(
        f"--epsilons: {text!r} is not a number or a fraction like 8/255.") from None


def _check_epsilons(values):
  eps = [_parse_epsilon(v) for v in values]
  if not eps:
    raise flags.ValidationError("--epsilons must list at least one epsilon.")
  if any(not 0 < e <= 1 for e in eps):
    raise flags.ValidationError(f"--epsilons must all be in (0, 1]; got {values}.")
  return True


def _check_choices(name, choices):
  def check(values):
    bad = [v for v in values if v not in choices]
    if bad:
      raise flags.ValidationError(
          f"--{name} must be from {', '.join(choices)}; got {', '.join(bad)}.")
    return True
  return check


flags.register_validator("epsilons", _check_epsilons)
flags.register_validator("stages", _check_choices("stages", ("train", "prune", "augment",
                                                             "attack", "autoattack", "report")))
flags.register_validator("attacks", _check_choices("attacks", _ev.GRADIENT_ATTACKS))
flags.register_validator("cw_attacks", _check_choices("cw_attacks", _ev.CW_ATTACKS))
flags.register_validator("threat_models", _check_choices("threat_models", _tm.THREAT_MODELS))
flags.register_validator("targeted_modes",
                         _check_choices("targeted_modes", ("untargeted", "targeted")))
flags.register_validator("cw_targeted_modes",
                         _check_choices("cw_targeted_modes", ("untargeted", "targeted")))
flags.register_validator("rel_step_size", lambda v: v > 0, "--rel_step_size must be > 0.")
for _name in ("train_flagfile", "prune_flagfile", "augment_flagfile"):
  flags.register_validator(
      _name, lambda v: v is None or __import__("os").path.isfile(v),
      f"--{_name} must name an existing flagfile.")


# A stage without a flagfile: the card's recipe (flags/mnist_m1.flags) for
# pruning's fine-tuning instead of the training defaults; a stage flagfile
# overrides these.
STAGE_DEFAULTS = {
    "train": (),
    "prune": ("--optimizer=adam", "--learning_rate=0.001", "--lr_decay_epochs=6,8",
              "--lr_decay_factor=0.2", "--finetune_epochs=10", "--pruning_frequency=50",
              "--pruning_begin_epoch=0", "--pruning_end_epoch=4"),
    "augment": (),
}
# The flags that say which data a run uses: kd-experiment's values reach every stage.
RUN_DATA_FLAGS = ("dataset", "image_size", "data_dir", "manual_dir")
# kd-experiment's default epsilon grid per input shape when --epsilons is not given:
# the MNIST grid of the paper's evaluation; the usual CIFAR-10 radii (Madry et al.).
DEFAULT_EPSILONS = {(28, 28, 1): ("0.05", "0.1", "0.2", "0.3"),
                    (32, 32, 3): ("2/255", "4/255", "8/255", "16/255")}


def _sub_flags(flagfile: str | None, stage: str = "train"):
  """A copy of FLAGS: the stage's defaults, then ``flagfile``, parsed on the flag defaults."""
  fv = copy.deepcopy(FLAGS)
  fv.unparse_flags()
  fv(["stage", *STAGE_DEFAULTS[stage]] + ([f"--flagfile={flagfile}"] if flagfile else []))
  return fv


def _origin(name: str) -> str:
  """Where kd-experiment's value of --name came from, for error messages."""
  import sys  # pylint: disable=g-import-not-at-top
  if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in sys.argv[1:]):
    return "the command line"
  if FLAGS[name].present:
    flagfiles = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--flagfile=")]
    return f"--flagfile={','.join(flagfiles)}" if flagfiles else "the command line"
  return "the default"


def _with_run_data(fv, stage: str, flagfile: str | None):
  """Gives a stage's flags the run's data flags; a stage flagfile naming others is an error."""
  for name in RUN_DATA_FLAGS:
    if fv[name].present and fv[name].value != FLAGS[name].value:
      raise UserError(
          f"the {stage} stage's flagfile {flagfile} sets --{name}={fv[name].value}, but "
          f"the run's --{name} is {FLAGS[name].value!r} (from {_origin(name)}): every stage "
          f"must use the run's data. Use a {stage} flagfile for {FLAGS[name].value!r}, "
          f"drop --{name} from {flagfile}, or pass --{name}={fv[name].value} to the run.")
    fv[name].value = FLAGS[name].value
  return fv


def _stage_flags(stage: str, flagfile: str | None):
  return _with_run_data(_sub_flags(flagfile, stage), stage, flagfile)


def _epsilons() -> tuple[float, ...]:
  """--epsilons, or the default grid for the run's input shape."""
  values = FLAGS.epsilons
  if not FLAGS["epsilons"].present:
    shape = data.info(dataset_name(), data_dir=FLAGS.data_dir,
                      manual_dir=FLAGS.manual_dir).image_shape
    values = DEFAULT_EPSILONS.get(tuple(shape), values)
  return tuple(_parse_epsilon(e) for e in values)


def _eval_config() -> _ev.EvalConfig:
  """The attack grid and AutoAttack settings of kd-experiment (and the sweep, the comparison)."""
  cw = {"cw_l2": {"binary_search_steps": FLAGS.cw_binary_search_steps,
                  "max_iterations": FLAGS.cw_max_iterations},
        "cw_linf": {"max_iterations": FLAGS.cw_linf_max_iterations or FLAGS.cw_max_iterations,
                    "eval_size": FLAGS.cw_linf_eval_size or FLAGS.cw_eval_size},
        "cw_l0": {"max_iterations": FLAGS.cw_linf_max_iterations or FLAGS.cw_max_iterations,
                  "eval_size": FLAGS.cw_l0_eval_size or FLAGS.cw_eval_size}}
  epsilons = _epsilons()
  return _ev.EvalConfig(
      attacks=tuple(FLAGS.attacks), epsilons=epsilons,
      targeted_modes=tuple(m == "targeted" for m in FLAGS.targeted_modes),
      target_selection=FLAGS.target_selection, threat_models=tuple(FLAGS.threat_models),
      eval_size=FLAGS.eval_size, bim_steps=FLAGS.bim_steps,
      rel_step_size=FLAGS.rel_step_size, cw_attacks=tuple(FLAGS.cw_attacks),
      cw_eval_size=FLAGS.cw_eval_size, cw_options=cw,
      cw_targeted_modes=tuple(m == "targeted" for m in FLAGS.cw_targeted_modes),
      batch_size=FLAGS.attack_batch_size, compute_dtype=FLAGS.attack_compute_dtype,
      seed=FLAGS.seed, autoattack_version=FLAGS.autoattack_version,
      autoattack_epsilons=(tuple(_parse_epsilon(e) for e in FLAGS.autoattack_epsilons)
                           or (max(epsilons),)),
      autoattack_size=FLAGS.autoattack_size, sanity_size=FLAGS.sanity_size)


def experiment_config(command: str | None = None):
  """The ExperimentConfig the experiment flags (and the stage flagfiles) describe.

  The run's --dataset/--image_size/--data_dir/--manual_dir reach every stage;
  a stage flagfile that sets another value is a ``UserError`` naming both.

  Raises:
    UserError: a stage flagfile names other data than the run.
  """
  from keras_defense.pipelines import experiment  # pylint: disable=g-import-not-at-top
  from keras_defense.defenses import pruning  # pylint: disable=g-import-not-at-top
  train_fv = _stage_flags("train", FLAGS.train_flagfile)
  prune_fv = _stage_flags("prune", FLAGS.prune_flagfile)
  augment_fv = _stage_flags("augment", FLAGS.augment_flagfile)
  eval_config = _eval_config()
  del pruning
  return experiment.ExperimentConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(dataset_name())}",
      dataset=dataset_name(), data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
      train=train_config(train_fv), prune=prune_config(prune_fv),
      augment=augment_config(augment_fv), eval=eval_config,
      stages=tuple(FLAGS.stages), reuse_saved_models=FLAGS.reuse_saved_models,
      saved_models_dir=FLAGS.saved_models_dir, seed=FLAGS.seed,
      deterministic=FLAGS.deterministic, strategy=FLAGS.strategy,
      num_cpu_devices=FLAGS.num_cpu_devices, command=command)


# --- evaluation (kd-evaluate) -----------------------------------------------
# kd-evaluate reuses --dataset, --data_dir, --manual_dir, --seed, --run_dir,
# --batch_size, --deterministic and --epsilons. Its --model is a model *path*
# and its --attacks the ensemble's: evaluate_flags() redefines those two in the
# kd-evaluate process only, before parsing (kd-train's --model stays an
# architecture, kd-experiment's --attacks fgsm/bim); --compute_dtype gains
# "auto", and --epsilons keeps its validator for L-inf but takes L2 radii > 1
# (MNIST's usual L2 radius is 2).
from keras_defense.evaluation import robustness as _rob  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_enum("norm", "linf", list(_rob.NORMS), "kd-evaluate threat model: L-inf or L2 ball.")
flags.DEFINE_integer("n_examples", 10000,
                     "kd-evaluate: the first n test images (RobustBench: 10,000).", lower_bound=1)
flags.DEFINE_enum("version", "standard", list(_rob.VERSIONS),
                  "kd-evaluate AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square), "
                  "plus, rand, or custom (--attacks).")
flags.DEFINE_string("signature", "serving_default",
                    "kd-evaluate: the SavedModel signature to call.")
flags.DEFINE_string("output_key", None,
                    "kd-evaluate: the signature output holding logits or probabilities "
                    "(needed when it has several, e.g. logits for saved_models/*).")


def evaluate_flags(fv=None) -> None:
  """Gives --model, --attacks and --compute_dtype kd-evaluate's meaning.

  Called by kd-evaluate before its flags are parsed (tests pass a copy of
  FLAGS); the other binaries keep the definitions above.
  """
  fv = FLAGS if fv is None else fv
  flags.DEFINE_string("model", None, "kd-evaluate: the model to evaluate, a SavedModel "
                      "directory or a .keras/.h5 file.", flag_values=fv, allow_override=True)
  flags.DEFINE_list("attacks", None, "kd-evaluate --version=custom: the ensemble's attacks, "
                    "in order (e.g. apgd-ce,square).", flag_values=fv, allow_override=True)
  flags.DEFINE_enum("compute_dtype", "float32", ["auto", "float32", "bfloat16"],
                    "kd-evaluate attack arithmetic; auto times both once and picks the "
                    "faster (bfloat16 needs a Keras model file). Default float32: bfloat16 "
                    "APGD left 5.8 points more of an adversarially trained model robust "
                    "(benchmarks/README.md).", flag_values=fv, allow_override=True)
  flags.DEFINE_list("epsilons", fv["epsilons"].default, "kd-evaluate: radii of the --norm "
                    "ball in pixel units of [0, 1] images, fractions allowed (8/255); L-inf "
                    "in (0, 1], L2 > 0.", flag_values=fv, allow_override=True)
  flags.register_multi_flags_validator(["epsilons", "norm"], _check_evaluate_epsilons,
                                       flag_values=fv)


def _check_evaluate_epsilons(values: dict) -> bool:
  if values["norm"] == "linf":
    return _check_epsilons(values["epsilons"])
  eps = [_parse_epsilon(v) for v in values["epsilons"]]
  if not eps or any(not e > 0 for e in eps):
    raise flags.ValidationError(f"--epsilons must list L2 radii > 0; got {values['epsilons']}.")
  return True


def evaluate_config(command: str | None = None, fv=None) -> _rob.RobustnessConfig:
  """The RobustnessConfig the kd-evaluate flags describe (after evaluate_flags())."""
  fv = FLAGS if fv is None else fv
  label = "_".join(p for p in str(fv.model or "model").replace("\\", "/").split("/")[-2:] if p)
  return _rob.RobustnessConfig(
      model=fv.model, run_dir=fv.run_dir or f"runs/evaluate_{label}_{fv.norm}",
      dataset=dataset_name(fv), norm=fv.norm,
      epsilons=tuple(_parse_epsilon(e) for e in fv.epsilons), n_examples=fv.n_examples,
      version=fv.version, attacks=tuple(fv.attacks) if fv.attacks else None,
      signature=fv.signature, output_key=fv.output_key, seed=fv.seed,
      batch_size=fv.batch_size, compute_dtype=fv.compute_dtype, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, command=command)


# --- sweep (kd-sweep) ---------------------------------------------------------
# kd-sweep reuses kd-experiment's flags (stage flagfiles, --epsilons with one
# value: the attack ε, the FGSM/BIM grid, --autoattack_*, --stages, --seed,
# --deterministic, data); the --cw_* flags are not used (C&W is not ε-bounded).
flags.DEFINE_list("sparsities", ["0:0", "0.9:0.95"],
                  "kd-sweep: Dense:Conv sparsity pairs (each pair one pruned model; 0:0 is "
                  "M0 itself), e.g. 0:0,0.5:0.5,0.9:0.95.")
flags.DEFINE_list("logits_epsilons", ["0", "20"],
                  "kd-sweep: logits-augmentation eps values (0: no augmentation).")
flags.DEFINE_list("methods", ["standard"],
                  "kd-sweep: training methods: standard, plus pgd, fgsm_rs, trades "
                  "(adversarial training) where available.")
flags.DEFINE_list("base_models", [],
                  "kd-sweep: method:SavedModel pairs used as that method's M0 instead of "
                  "training it (e.g. standard:saved_models/mnist_m0/1).")
flags.DEFINE_integer("shard_index", 0, "kd-sweep: this shard, in [0, --num_shards).",
                     lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "kd-sweep: shards the grid's points are split into.",
                     lower_bound=1)
flags.DEFINE_float("lock_timeout", 600.0,
                   "kd-sweep: seconds without a heartbeat after which a parent's build lock "
                   "counts as stale (a holder on this host whose pid is dead: at once).")


def _check_sparsities(values):
  for v in values:
    parts = v.split(":")
    try:
      ok = len(parts) == 2 and all(0 <= float(p) < 1 for p in parts)
    except ValueError:
      ok = False
    if not ok:
      raise flags.ValidationError(
          f"--sparsities must be dense:conv pairs, each in [0, 1) (e.g. 0.9:0.95); got {v!r}.")
  return True


def _check_floats(name):
  def check(values):
    for v in values:
      try:
        float(v)
      except ValueError:
        raise flags.ValidationError(f"--{name} must be numbers; got {v!r}.") from None
    return True
  return check


flags.register_validator("sparsities", _check_sparsities)
flags.register_validator("logits_epsilons", _check_floats("logits_epsilons"))
flags.register_validator(
    "base_models", lambda v: all(":" in x and x.split(":", 1)[1] for x in v),
    "--base_models must be method:SavedModel pairs, e.g. standard:saved_models/mnist_m0/1.")
flags.register_multi_flags_validator(
    ["shard_index", "num_shards"], lambda d: d["shard_index"] < d["num_shards"],
    "--shard_index must be < --num_shards.")


def sweep_config(command: str | None = None):
  """The SweepConfig the kd-sweep flags describe (kd-experiment's stage configs)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import sweep  # pylint: disable=g-import-not-at-top
  exp = experiment_config(command)
  return sweep.SweepConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(dataset_name())}_sweep",
      train=exp.train, prune=exp.prune, augment=exp.augment,
      eval=dataclasses.replace(exp.eval, cw_attacks=()),
      sparsities=tuple(tuple(float(p) for p in v.split(":")) for v in FLAGS.sparsities),
      logits_epsilons=tuple(float(e) for e in FLAGS.logits_epsilons),
      methods=tuple(FLAGS.methods),
      base_models=dict(v.split(":", 1) for v in FLAGS.base_models),
      dataset=exp.dataset, data_dir=exp.data_dir, manual_dir=exp.manual_dir,
      seed=FLAGS.seed, deterministic=FLAGS.deterministic, stages=tuple(FLAGS.stages),
      shard_index=FLAGS.shard_index, num_shards=FLAGS.num_shards,
      lock_timeout=FLAGS.lock_timeout, command=command)


# --- defenses comparison (kd-experiment --defense=...) -------------------------
# kd-experiment runs the defenses comparison (defense_comparison.py) instead of
# the M0/M1/M2 reproduction when --defense is given; it reuses the attack grid
# and --autoattack_* flags, the data flags, --seed, --deterministic, --run_dir;
# --stages=report renders the report from the rows finished so far.
flags.DEFINE_multi_string(
    "defense", [],
    "kd-experiment: one row of the defenses comparison, NAME|STEP[+STEP...]; repeat per "
    "row, the first is the reference (M0). STEP: train:FLAGFILE, prune:FLAGFILE, "
    "augment:FLAGFILE (a kd-train/kd-prune/kd-augment flagfile: its --export_dir/1 is "
    "reused if it exists, else built), dropout:RATE@SAVEDMODEL (Defensive Dropout), "
    "saved:SAVEDMODEL. E.g. 'M1-AT|prune:flags/mnist_m1_at_fgsm_rs.flags'.")
flags.DEFINE_string("report_dir", None,
                    "kd-experiment --defense: where defenses.md goes (its JSON, CSV, plots "
                    "and TensorBoard under defenses/ beside it); default --run_dir.")
flags.DEFINE_bool("build_missing", True,
                  "kd-experiment --defense: build a row's missing model from its flagfile "
                  "(false: a missing model is an error).")


def _defense_step(text: str, row: str):
  """One STEP of a --defense row -> defense_comparison.Step."""
  import os  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import defense_comparison as dc  # pylint: disable=g-import-not-at-top
  from keras_defense.defenses import dropout  # pylint: disable=g-import-not-at-top
  kind, sep, arg = text.strip().partition(":")
  where = f"--defense={row!r}"
  if not sep or not arg:
    raise UserError(f"{where}: each step must be KIND:ARGUMENT (kinds: "
                    f"{', '.join(dc.KINDS)}); got {text!r}.")
  if kind in ("train", "prune", "augment"):
    if not os.path.isfile(arg):
      raise UserError(f"{where}: the {kind} step's flagfile {arg!r} does not exist.")
    fv = _stage_flags(kind, arg)
    if not fv.export_dir:
      raise UserError(f"{where}: flagfile {arg} must set --export_dir (the row's model is "
                      f"<export_dir>/1).")
    config = {"train": train_config, "prune": prune_config, "augment": augment_config}[kind](fv)
    return dc.Step(kind, config=config, source=f"kd-{kind} --flagfile={arg}")
  if kind == "dropout":
    rate, at, path = arg.partition("@")
    try:
      rate_value = float(rate)
    except ValueError:
      rate_value = None
    if not at or not path or rate_value is None:
      raise UserError(f"{where}: a dropout step is dropout:RATE@SAVEDMODEL, e.g. "
                      f"dropout:0.3@saved_models/mnist_m0/1; got {text!r}.")
    return dc.Step("dropout", config=dropout.DefensiveDropoutConfig(rate=rate_value,
                                                                     seed=FLAGS["seed"].value),
                   path=path, source=f"Defensive Dropout p={rate_value:g} on {path}")
  if kind == "saved":
    return dc.Step("saved", path=arg, source=f"SavedModel {arg}")
  raise UserError(f"{where}: step kind must be one of {', '.join(dc.KINDS)}; got {kind!r}.")


def comparison_config(command: str | None = None):
  """The ComparisonConfig of kd-experiment --defense=... (rows from the stage flagfiles)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from keras_defense.pipelines import defense_comparison as dc  # pylint: disable=g-import-not-at-top
  rows = []
  for spec in FLAGS.defense:
    name, sep, steps = spec.partition("|")
    if not sep or not name.strip() or not steps.strip():
      raise UserError(f"--defense must be NAME|STEP[+STEP...]; got {spec!r}.")
    rows.append(dc.Row(name.strip(), tuple(_defense_step(s, name.strip())
                                           for s in steps.split("+"))))
  exp_eval = _eval_config()
  return dc.ComparisonConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(dataset_name())}_defenses",
      report_dir=FLAGS.report_dir, rows=tuple(rows),
      eval=dataclasses.replace(exp_eval, cw_attacks=()),
      dataset=dataset_name(), data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
      seed=FLAGS.seed, deterministic=FLAGS.deterministic, build=FLAGS.build_missing,
      report_only=list(FLAGS.stages) == ["report"], command=command)
