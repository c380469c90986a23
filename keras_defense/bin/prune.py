"""Prunes a trained classifier (M0 -> M1) with tfmot and writes the compression report.

  kd-prune --flagfile=flags/mnist_m1.flags
"""

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense.defenses import pruning


def main(argv):
  del argv
  result = pruning.prune(kd_flags.prune_config())
  logging.info("%s", result.summary())
  print(result.report.to_markdown())
  print(f"test_accuracy={result.test_accuracy:.4f} base_accuracy={result.base_accuracy:.4f} "
        f"compression={result.report.compression_ratio:.2f}x "
        f"wall_seconds={result.wall_seconds:.0f} saved_model={result.saved_model_path} "
        f"report={','.join(result.report_paths) or None}")


def run_main():
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
