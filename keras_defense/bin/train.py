"""Trains a C&W classifier (M0/C0) and exports it as a SavedModel.

  kd-train --flagfile=flags/mnist_m0.flags
"""

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense import defenses


def main(argv):
  del argv
  result = defenses.train(kd_flags.train_config())
  logging.info("test accuracy %.4f after %d epochs in %.0f s; SavedModel: %s",
               result.test_accuracy, result.epochs_run, result.wall_seconds,
               result.saved_model_path)
  print(f"test_accuracy={result.test_accuracy:.4f} wall_seconds={result.wall_seconds:.0f} "
        f"saved_model={result.saved_model_path}")


def run_main():
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
