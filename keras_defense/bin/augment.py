"""Applies logits augmentation (M1 -> M2) or gradient inhibition and exports the result.

  kd-augment --flagfile=flags/mnist_m2.flags
"""

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense.defenses import logits_augmentation


def main(argv):
  del argv
  result = logits_augmentation.augment(kd_flags.augment_config())
  logging.info("%s", result.summary())
  print(result.summary())
  print(f"agreement={result.agreement:.4f} base_accuracy={result.base_accuracy:.4f} "
        f"accuracy={result.accuracy:.4f} n={result.test_examples} "
        f"saved_model={result.saved_model_path}")


def run_main():
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
