"""absl binaries: flags in, one library call, output out."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app

from keras_defense.errors import UserError


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)``, printing a ``UserError`` as one line and exiting 2."""
  def wrapped(argv):
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(wrapped)
