"""kd-experiment --defense's flags: the rows of the defenses comparison; ComparisonConfig."""

from __future__ import annotations

from absl import flags

from keras_defense import data
from keras_defense.flags import common
from keras_defense.flags import experiment as experiment_flags
from keras_defense.flags import prune as prune_flags
from keras_defense.flags import train as train_flags
from keras_defense.util.errors import UserError

FLAGS = flags.FLAGS

# --- defenses comparison (kd-experiment --defense=...) -------------------------
# kd-experiment runs the defenses comparison (defense_comparison.py) instead of
# the M0/M1/M2 reproduction when --defense is given; it reuses the attack grid
# and --autoattack_* flags, the data flags, --seed, --deterministic, --run_dir;
# --stages=report renders the report from the rows finished so far; kd-evaluate's
# --certify names the bound methods of the certified column (computed from the
# saved models at report time, so --stages=report adds it to finished rows).
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
    fv = experiment_flags.stage_flags(kind, arg)
    if not fv.export_dir:
      raise UserError(f"{where}: flagfile {arg} must set --export_dir (the row's model is "
                      f"<export_dir>/1).")
    config = {"train": train_flags.train_config, "prune": prune_flags.prune_config,
              "augment": prune_flags.augment_config}[kind](fv)
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
  exp_eval = experiment_flags.eval_config()
  return dc.ComparisonConfig(
      run_dir=FLAGS.run_dir or f"runs/{data.slug(common.dataset_name())}_defenses",
      report_dir=FLAGS.report_dir, rows=tuple(rows),
      eval=dataclasses.replace(exp_eval, cw_attacks=()),
      dataset=common.dataset_name(), data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
      seed=FLAGS.seed, deterministic=FLAGS.deterministic, build=FLAGS.build_missing,
      report_only=list(FLAGS.stages) == ["report"], command=command,
      certify=tuple(FLAGS.certify or ()))
