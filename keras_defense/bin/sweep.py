"""Robustness vs compression: a grid of training method x sparsity x logits eps.

  kd-sweep --flagfile=flags/mnist_sweep.flags
  kd-sweep --flagfile=flags/mnist_sweep.flags --shard_index=1 --num_shards=4
  kd-sweep --flagfile=flags/mnist_sweep.flags --stages=report   # merge what exists

A rerun with the same --run_dir skips finished points and parents. Results:
<run_dir>/sweep.csv, report.md, plots/, points/<key>.json, tensorboard/
(HParams dashboard: one session per point). See docs/DISTRIBUTED.md.
"""

import sys

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense.util import provenance
from keras_defense.util import progress
from keras_defense.pipelines import sweep


def main(argv):
  del argv
  config = kd_flags.sweep_config(provenance.command_line(sys.argv))
  result = sweep.run(config, progress=progress.ProgressBar())
  total = len(config.points())
  print(f"points: {total - len(result.missing)} of {total} finished "
        f"({len(result.computed)} computed now)")
  if result.missing:
    print("missing: " + ", ".join(result.missing))
  if "report.md" in result.artifacts:
    print(f"report: {result.artifacts['report.md']}")
  logging.info("shard %d/%d done", config.shard_index, config.num_shards)


def run_main():
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
