"""absl binaries: flags in, one library call, output out."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app

from keras_defense.util.errors import UserError


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)``, printing a ``UserError`` as one line and exiting 2."""
  def wrapped(argv):
    try:
      main(argv)
    except UserError as e:
      # One line, even for messages that put their "Fix:" on a line of its own.
      message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
  app.run(wrapped)
