"""Reproduces the M0/M1/M2 table: train -> prune -> augment -> attack -> autoattack -> report.

  kd-experiment --flagfile=flags/mnist.flags

With --defense rows it compares defenses instead (defense_comparison.py):

  kd-experiment --flagfile=flags/mnist_defenses.flags   # -> reports/mnist/defenses.md

With --deployment_parent rows it builds the deployment table instead (deployment.py):

  kd-experiment --flagfile=flags/mnist_deployment.flags  # -> reports/mnist/deployment.md

A rerun with the same --run_dir skips finished stages and resumes an
interrupted one. Results: <run_dir>/report.md, results.json, results.csv,
plots/, and TensorBoard under <run_dir>.
"""

import sys

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense.pipelines import experiment
from keras_defense import flags as kd_flags
from keras_defense.util import progress
from keras_defense.util import provenance


def _compare(command: str) -> None:
  from keras_defense.pipelines import defense_comparison  # pylint: disable=g-import-not-at-top
  result = defense_comparison.run(kd_flags.comparison_config(command),
                                  progress=progress.ProgressBar())
  for row in result.rows:
    for w in row["warnings"]:
      print(f"WARNING: {w}")
  if result.missing:
    print(f"not finished: {', '.join(result.missing)}")
  print(f"report: {result.artifacts.get('defenses.md', '')}")


def _deploy(command: str) -> None:
  from keras_defense.pipelines import deployment  # pylint: disable=g-import-not-at-top
  result = deployment.run(kd_flags.deployment_config(command), progress=progress.ProgressBar())
  print(f"report: {result['artifacts']['deployment.md']}")


def main(argv):
  del argv
  command = provenance.command_line(sys.argv)
  if kd_flags.FLAGS.deployment_parent:
    _deploy(command)
    return
  if kd_flags.FLAGS.defense:
    _compare(command)
    return
  records = experiment.run(kd_flags.experiment_config(command), progress=progress.ProgressBar())
  report = records.get("report")
  if report:
    for w in report["warnings"]:
      print(f"WARNING (gradient masking): {w}")
    print(f"report: {report['artifacts'].get('report.md', '')}")
  logging.info("stages: %s", {k: round(v.get("stage_seconds", 0)) for k, v in records.items()})


def run_main():
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
