"""The start of a run bound to its settings: the defense comparison's and the sweep's.

Both resume in a run directory made by an earlier call only if it was made with
the same settings (``config.identity()``), kept in the directory's binding file
(``comparison.json``, ``sweep.json``; ``io_utils.bind_settings``).
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

from keras_defense import training


def start(config: Any, bind: Callable[[pathlib.Path, dict], None]) -> None:
  """Validates ``config``, binds its run directory and sets up determinism.

  Args:
    config: a config with ``validate()``, ``identity()``, ``run_dir``, ``seed``
      and ``deterministic``.
    bind: ``bind(run_dir, identity)`` writes the binding file, or refuses a
      directory made with other settings.

  Raises:
    UserError: a bad config, or a run directory of other settings.
  """
  config.validate()
  run_dir = pathlib.Path(config.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  bind(run_dir, config.identity())
  training.setup_determinism(config.seed, config.deterministic)
