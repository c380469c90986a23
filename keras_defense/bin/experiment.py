"""Reproduces the M0/M1/M2 table: train -> prune -> augment -> attack -> report.

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
  """A progress bar over the attack grid's groups."""

  def __init__(self):
    self.bar = None

  def __call__(self, done, total, desc):
    if self.bar is None:
      self.bar = tqdm.tqdm(total=total, unit="group", desc="attack grid",
                           dynamic_ncols=True, file=sys.stderr)
    self.bar.n = done
    self.bar.set_postfix_str(desc)
    self.bar.refresh()
    if done == total:
      self.bar.close()


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
