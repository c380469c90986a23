"""kd-experiment's flags: the stage flagfiles, the attack grid, AutoAttack; ExperimentConfig."""

from __future__ import annotations

import copy

from absl import flags

from keras_defense import data
from keras_defense.evaluation import grid as _ev
from keras_defense.evaluation import threat_models as _tm
from keras_defense.flags import common
from keras_defense.flags import prune as prune_flags
from keras_defense.flags import train as train_flags
from keras_defense.util.errors import UserError

FLAGS = flags.FLAGS

# --- experiment (kd-experiment) ---------------------------------------------

flags.DEFINE_string("train_flagfile", None, "Flagfile of the M0 training stage (flags/mnist_m0.flags).")
flags.DEFINE_string("prune_flagfile", None, "Flagfile of the M1 pruning stage (flags/mnist_m1.flags).")
flags.DEFINE_string("augment_flagfile", None, "Flagfile of the M2 stage (flags/mnist_m2.flags).")
flags.DEFINE_list("stages", ["train", "prune", "augment", "attack", "autoattack", "report"],
                  "Stages to run, in order; finished stages are skipped on a rerun. kd-sweep "
                  "also has quantize (after augment: the .tflite of each quantized point, "
                  "--quantization), and runs all its stages when --stages is not given.")
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
common.define_count("eval_size", 2000,
                    "Test images for FGSM/BIM (the reproduction's 2,000; unset for all).")
common.define_count("bim_steps", 10, "BIM iterations (defense authors' code: 10).")
flags.DEFINE_float("rel_step_size", 0.25, "BIM step size as a fraction of epsilon.")
flags.DEFINE_list("cw_attacks", ["cw_l2", "cw_linf", "cw_l0"],
                  "Carlini-Wagner attacks of the grid (empty for none).")
common.define_count("cw_eval_size", 100, "Test images for the C&W attacks.")
flags.DEFINE_list("cw_targeted_modes", ["untargeted"],
                  "C&W modes: untargeted, targeted or both (targeted doubles their cost).")
# The C&W budgets default to the reproduction's (flags/mnist.flags), so that
# kd-experiment --dataset=NAME with no flagfile finishes in minutes; C&W's own
# values are in the help.
common.define_count("cw_linf_eval_size", 50,
                    "Test images for C&W L-inf (unset: --cw_eval_size).")
common.define_count("cw_l0_eval_size", 20,
                    "Test images for C&W L0, the slowest (unset: --cw_eval_size).")
common.define_count("cw_linf_max_iterations", 100,
                    "C&W L-inf/L0 iterations per round (unset: --cw_max_iterations).")
common.define_count("cw_binary_search_steps", 5, "C&W L2 binary-search steps (C&W: 9).")
common.define_count("cw_max_iterations", 200, "C&W iterations per search step (C&W: 1000).")
common.define_count("attack_batch_size", 1000, "Images per compiled attack call.")
flags.DEFINE_enum("attack_compute_dtype", "float32", ["float32", "bfloat16"],
                  "Attack arithmetic; bfloat16 is faster on CPUs with AMX/AVX-512 BF16 but "
                  "changes where softmax saturates.")
flags.DEFINE_enum("autoattack_version", "standard", list(_ev.AUTOATTACK_VERSIONS),
                  "kd-experiment's AutoAttack stage on every model (Croce & Hein 2020): "
                  "standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand, or none.")
flags.DEFINE_list("autoattack_epsilons", [],
                  "L-inf radii of the AutoAttack stage (default: the largest of --epsilons; "
                  "at small radii most images stay robust and each costs the whole ensemble).")
common.define_count("autoattack_size", 1000,
                    "Test images for the AutoAttack stage (RobustBench: 10000; "
                    "flags/mnist.flags uses all 10,000).")
common.define_nonnegative("sanity_size", 100,
                          "Test images for the sanity check at epsilon 1 (0: skip).")


flags.register_validator("epsilons", common.check_epsilons)
flags.register_validator("stages", common.check_choices("stages", ("train", "prune", "augment",
                                                             "quantize", "attack", "autoattack",
                                                             "report")))
flags.register_validator("attacks", common.check_choices("attacks", _ev.GRADIENT_ATTACKS))
flags.register_validator("cw_attacks", common.check_choices("cw_attacks", _ev.CW_ATTACKS))
flags.register_validator("threat_models", common.check_choices("threat_models", _tm.THREAT_MODELS))
flags.register_validator("targeted_modes",
                         common.check_choices("targeted_modes", ("untargeted", "targeted")))
flags.register_validator("cw_targeted_modes",
                         common.check_choices("cw_targeted_modes", ("untargeted", "targeted")))
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


def stage_flags(stage: str, flagfile: str | None):
  return _with_run_data(_sub_flags(flagfile, stage), stage, flagfile)


def _epsilons() -> tuple[float, ...]:
  """--epsilons, or the default grid for the run's input shape."""
  values = FLAGS.epsilons
  if not FLAGS["epsilons"].present:
    shape = data.info(common.dataset_name(), data_dir=FLAGS.data_dir,
                      manual_dir=FLAGS.manual_dir).image_shape
    values = DEFAULT_EPSILONS.get(tuple(shape), values)
  return tuple(common.parse_epsilon(e) for e in values)


def eval_config() -> _ev.EvalConfig:
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
      autoattack_epsilons=(tuple(common.parse_epsilon(e) for e in FLAGS.autoattack_epsilons)
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
  train_fv = stage_flags("train", FLAGS.train_flagfile)
  prune_fv = stage_flags("prune", FLAGS.prune_flagfile)
  augment_fv = stage_flags("augment", FLAGS.augment_flagfile)
  evaluation = eval_config()
  del pruning
  return experiment.ExperimentConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(common.dataset_name())}",
      dataset=common.dataset_name(), data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
      train=train_flags.train_config(train_fv), prune=prune_flags.prune_config(prune_fv),
      augment=prune_flags.augment_config(augment_fv), eval=evaluation,
      stages=tuple(FLAGS.stages), reuse_saved_models=FLAGS.reuse_saved_models,
      saved_models_dir=FLAGS.saved_models_dir, seed=FLAGS.seed,
      deterministic=FLAGS.deterministic, strategy=FLAGS.strategy,
      num_cpu_devices=FLAGS.num_cpu_devices, command=command)
