"""Quantizes (and optionally clusters) a trained classifier into a measured .tflite.

  kd-quantize --base_model_path=saved_models/mnist_m1_at_pgd/1 --dataset=mnist \
      --method=ptq_int8 --export_path=/tmp/m.tflite
"""

from absl import logging

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense import compression


def main(argv):
  del argv
  result = compression.quantize(kd_flags.quantize_config())
  logging.info("%s", result.summary())
  print(result.summary())
  print(f"provenance={result.provenance_path}")


def run_main():
  kd_flags.quantize_flags()
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
