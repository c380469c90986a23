"""Progress reporting: ``progress(done, total, description)`` callbacks and their bars.

Library code (the experiment's stages, the sweep, ``robustness.run``) reports
through a plain callable; the binaries pass a ``ProgressBar``, which draws one
tqdm bar per run of steps (the attack grid, each AutoAttack run, ...) and
starts a new bar whenever the label, the total or the count restarts.
"""

from __future__ import annotations

import sys
from typing import Callable

import tqdm

Progress = Callable[[int, int, str], None]


def labelled(progress: Progress | None, label: str) -> Progress | None:
  """``progress`` with descriptions prefixed ``"<label>: "`` (None stays None)."""
  if progress is None:
    return None
  return lambda done, total, desc: progress(done, total, f"{label}: {desc}")


class ProgressBar:
  """A ``Progress`` drawn as tqdm bars on stderr; "<label>: <text>" names the bar."""

  def __init__(self):
    self.bar = None

  def __call__(self, done: int, total: int, desc: str) -> None:
    stage, _, text = desc.partition(": ")
    if (self.bar is None or self.bar.total != total or done < self.bar.n
        or self.bar.desc != stage):
      if self.bar is not None:
        self.bar.close()
      self.bar = tqdm.tqdm(total=total, unit="step", desc=stage, dynamic_ncols=True,
                           file=sys.stderr)
    self.bar.n = done
    self.bar.set_postfix_str(text)
    self.bar.refresh()
