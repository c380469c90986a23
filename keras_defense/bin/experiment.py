"""Reproduces the M0/M1/M2 table: train -> prune -> augment -> attack -> autoattack -> report.

  kd-experiment --flagfile=flags/mnist.flags

A rerun with the same --run_dir skips finished stages and resumes an
interrupted one. Results: <run_dir>/report.md, results.json, results.csv,
plots/, and TensorBoard under <run_dir>.
"""

import sys

from absl import logging
import tqdm

from keras_defense import bin as kd_bin
from keras_defense import experiment
from keras_defense import flags as kd_flags
from keras_defense import provenance


class _Progress:
  """One progress bar per run of steps: the attack grid's groups, each AutoAttack run."""

  def __init__(self):
    self.bar = None

  def __call__(self, done, total, desc):
    stage, _, text = desc.partition(": ")
    if (self.bar is None or self.bar.total != total or done < self.bar.n
        or self.bar.desc != stage):
      if self.bar is not None:
        self.bar.close()
      self.bar = tqdm.tqdm(total=total, unit="step", desc=stage, dynamic_ncols=True,
                           file=sys.stderr)
    self.bar.n = done
    self.bar.set_postfix_str(text)
    self.bar.refresh()


def main(argv):
  del argv
  command = provenance.command_line(sys.argv)
  records = experiment.run(kd_flags.experiment_config(command), progress=_Progress())
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
