"""The checks that several config dataclasses' ``validate()`` share.

Each config checks its fields one line at a time with ``need(cond, msg)``, the
function ``checker`` makes for the config's error type; the checks of fields
that several configs have (a model and a run directory, a list of radii) are
written once here, with the messages that name them.

Example:
  >>> need = checker(UserError)
  >>> need(config.n >= 1, f"`n` must be >= 1; got {config.n!r}.")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from keras_defense.util.errors import UserError


def checker(error: type[Exception] = UserError) -> Callable[[Any, str], None]:
  """``need(cond, msg)``, which raises ``error(msg)`` unless ``cond`` holds."""
  def need(cond: Any, msg: str) -> None:
    if not cond:
      raise error(msg)
  return need


def run_checker(model: Any, run_dir: Any) -> Callable[[Any, str], None]:
  """``checker(UserError)`` for a run's config, after checking its model and run directory.

  Raises:
    UserError: ``model`` or ``run_dir`` empty, naming it.
  """
  need = checker(UserError)
  need(bool(model), "`model` must name a SavedModel directory or a .keras/.h5 file.")
  need(bool(run_dir), "`run_dir` must name a directory for the results.")
  return need


def check_epsilons(norm: str, epsilons: Sequence[Any]) -> None:
  """Radii in ``norm``: at least one, each finite and > 0, none twice, L-inf ones <= 1.

  Raises:
    UserError: a bad list, naming ``epsilons`` and the value at fault.
  """
  need = checker(UserError)
  need(len(epsilons) > 0, "`epsilons` must list at least one epsilon; got none.")
  for e in epsilons:
    need(isinstance(e, (int, float)) and np.isfinite(e) and e > 0,
         f"`epsilons` must all be finite and > 0; got {e!r}.")
  need(len(set(epsilons)) == len(epsilons),
       f"`epsilons` must not repeat; got {list(epsilons)}.")
  need(norm != "linf" or max(epsilons) <= 1,
       f"L-inf `epsilons` must be <= 1 (the whole [0, 1] range); got {list(epsilons)}.")
