"""kd-sweep's flags: the grid of sparsities, logits eps and methods, shards; SweepConfig."""

from __future__ import annotations

from absl import flags

from keras_defense import data
from keras_defense.flags import common
from keras_defense.flags import experiment as experiment_flags
from keras_defense.flags import train as train_flags

FLAGS = flags.FLAGS

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
flags.DEFINE_list("quantization", ["none"],
                  "kd-sweep: the quantization dimension: none (the float SavedModel), ptq_int8 "
                  "(full-integer post-training quantization), qat_int8 (tfmot quantization-aware "
                  "fine-tuning for --quantize_epochs, then int8), e.g. none,ptq_int8,qat_int8. A "
                  "quantized point is its float point converted to a .tflite (kd-quantize's "
                  "library, stage quantize) and attacked by kd-evaluate's black-box ensemble on "
                  "the LiteRT interpreter: transfer from the float point, BPDA through the QAT "
                  "twin (qat_int8), Square.")
common.define_nonnegative("quantize_epochs", 1,
                          "kd-sweep: qat_int8's fine-tuning epochs under fake quantization (Adam "
                          "1e-4, --train_flagfile's train_limit).")
flags.DEFINE_integer("sweep_square_queries", 5000,
                     "kd-sweep: Square's queries per image in a quantized point's black-box "
                     "ensemble (AutoAttack: 5000).", lower_bound=1)
flags.DEFINE_list("base_models", [],
                  "kd-sweep: method:SavedModel pairs used as that method's M0 instead of "
                  "training it (e.g. standard:saved_models/mnist_m0/1).")
common.define_nonnegative("shard_index", 0,
                          "kd-sweep, kd-evaluate: this shard, in [0, --num_shards).")
common.define_count("num_shards", 1, "kd-sweep: shards the grid's points are split into; "
                    "kd-evaluate: shards the images are split into (then --merge).")
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
flags.register_validator("quantization", common.check_choices(
    "quantization", ("none", "ptq_int8", "qat_int8")))  # sweep_grid.QUANTIZATIONS
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
  from keras_defense.evaluation import sweep_grid  # pylint: disable=g-import-not-at-top
  exp = experiment_flags.experiment_config(command)
  # The adversarial methods' attack: the train flagfile's adversarial-training
  # flags (each point sets its own method; the one here only completes the spec).
  train_fv = experiment_flags.stage_flags("train", FLAGS.train_flagfile)
  attack = train_flags.adversarial_spec(train_fv, method=train_fv.adversarial or "pgd")
  return sweep_grid.SweepConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(common.dataset_name())}_sweep",
      train=exp.train, prune=exp.prune, augment=exp.augment,
      eval=dataclasses.replace(exp.eval, cw_attacks=()),
      sparsities=tuple(tuple(float(p) for p in v.split(":")) for v in FLAGS.sparsities),
      logits_epsilons=tuple(float(e) for e in FLAGS.logits_epsilons),
      methods=tuple(FLAGS.methods), adversarial=attack,
      quantization=tuple(FLAGS.quantization), quantize_epochs=FLAGS.quantize_epochs,
      square_queries=FLAGS.sweep_square_queries,
      base_models=dict(v.split(":", 1) for v in FLAGS.base_models),
      dataset=exp.dataset, data_dir=exp.data_dir, manual_dir=exp.manual_dir,
      seed=FLAGS.seed, deterministic=FLAGS.deterministic,
      # Not given: every sweep stage (quantize too; the flag's default is kd-experiment's).
      stages=tuple(FLAGS.stages) if FLAGS["stages"].present else sweep_grid.STAGES,
      shard_index=FLAGS.shard_index, num_shards=FLAGS.num_shards,
      lock_timeout=FLAGS.lock_timeout, command=command)
