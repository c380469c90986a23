"""Certified accuracy of a model: how many images no perturbation in the ε-ball can break.

  kd-certify --model=saved_models/mnist_m0/1 --dataset=mnist --norm=linf \
      --epsilons=0.1,0.3 --method=crown_ibp --n_examples=1000 --run_dir=runs/certify_m0

  kd-certify --model=saved_models/mnist_m0/1 --output_key=logits --method=smoothing \
      --norm=l2 --epsilons=0.5,1,1.5 --sigma=0.5 --n=10000 --n_examples=100

A rerun with the same --run_dir skips the finished ε (smoothing: the finished
chunks of images). Results: <run_dir>/results.json, report.md and tensorboard/.
Your own test set: --data=arrays.npz (x NHWC, y labels; optionally --image_size,
and --input_range/--mean/--std for the model's pixels, as kd-evaluate).
"""

import sys

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense.pipelines import certification
from keras_defense.util import progress as progress_lib
from keras_defense.util import provenance


def main(argv):
  del argv
  config = kd_flags.certify_config(provenance.command_line(sys.argv))
  results = certification.run(config, progress=progress_lib.ProgressBar())
  print(f"clean accuracy {100 * results['clean_acc']:.2f}% on {results['n_examples']} images")
  for entry in results["certified"]:
    print(f"ε={entry['epsilon']:g} ({config.method}, {config.norm}): certified "
          f"{100 * entry['certified_acc']:.2f}% ({entry['certified']} images)")
  print(f"report: {config.run_dir}/report.md")


def run_main():
  kd_flags.certify_flags()
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
