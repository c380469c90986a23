"""Command-line arguments the benchmark scripts share (not a benchmark).

``model_parser``: the model and image count every attack benchmark on a saved
MNIST model starts with; ``trainer_parser``/``parse_trainer_args``: the
``--out`` .keras file and the seed of the scripts that train a reference model.
"""

from __future__ import annotations

import argparse
import sys

from keras_defense.util.compat import keras


def model_parser(doc: str, *, num_images: int) -> argparse.ArgumentParser:
  """A parser described by ``doc``'s first line with --model_path and --num_images."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--model_path", default="saved_models/mnist_m0/1")
  p.add_argument("--num_images", type=int, default=num_images)
  return p


def trainer_parser(doc: str) -> argparse.ArgumentParser:
  """A parser described by ``doc``'s first line with the required --out."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--out", required=True, help="where to save the .keras model")
  return p


def parse_trainer_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """Parses ``argv`` (default: the command line), checks --out, seeds everything.

  The parser must define --out and --seed; exits (``p.error``) unless --out
  ends in .keras.
  """
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if not args.out.endswith(".keras"):
    p.error(f"--out must end in .keras; got {args.out!r}")
  keras.utils.set_random_seed(args.seed)
  return args
