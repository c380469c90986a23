"""The defenses comparison's finished rows: where they are, whether they still hold.

A finished row is ``<run_dir>/rows/<key>.json``, written last and atomically
by ``defense_comparison.run``. It records the SHA-256 of the SavedModel its
attacks ran on (``model_sha256``; rows written before that field: their
AutoAttack run's). ``changed`` says when the model on disk is another one since;
``set_aside`` then moves the row's results (its row file, the grid cells that
scored its model, its AutoAttack runs) to ``<run_dir>/stale/<key>-<sha>/`` so
that the row is evaluated again instead of describing a model that is gone.

Example:
  >>> kept = io_utils.read_json(row_path(run_dir, "m1_ibp"))
  >>> if (why := changed(kept)):
  ...   set_aside(run_dir, "m1_ibp", kept)
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Iterable

from keras_defense.evaluation import grid
from keras_defense.models import classifier as clf_lib
from keras_defense.util import io_utils


def row_path(run_dir: str | os.PathLike, key: str) -> pathlib.Path:
  return pathlib.Path(run_dir) / "rows" / f"{key}.json"


def load_rows(run_dir: str | os.PathLike, rows: Iterable[Any]) -> tuple[list[dict], list[str]]:
  """The finished rows of ``rows`` (objects with ``key`` and ``name``), in order, and the
  names still missing."""
  found, missing = [], []
  for row in rows:
    path = row_path(run_dir, row.key)
    if path.is_file():
      found.append(io_utils.read_json(path))
    else:
      missing.append(row.name)
  return found, missing


def attacked_sha256(kept: dict) -> str | None:
  """The SHA-256 of the model a finished row's attacks ran on (None: not recorded)."""
  return kept.get("model_sha256") or (kept.get("autoattack") or {}).get("model_sha256")


def changed(kept: dict) -> str | None:
  """Why a finished row no longer describes its model (None: it does, or cannot tell)."""
  attacked = attacked_sha256(kept)
  path = kept.get("saved_model")
  if not attacked or not path or not (pathlib.Path(path) / "saved_model.pb").is_file():
    return None
  now = clf_lib.fingerprint(path)
  if now == attacked:
    return None
  return (f"its model {path!r} changed since the row was evaluated (SHA-256 "
          f"{attacked[:12]}... then, {now[:12]}... now)")


def set_aside(run_dir: str | os.PathLike, key: str, kept: dict) -> pathlib.Path:
  """Moves a changed row's results to ``<run_dir>/stale/<key>-<old sha>/``; returns it.

  The grid cells that scored the row's model and its AutoAttack runs move
  first, the row file last: a run killed in between finds the row file and
  moves the rest next time.
  """
  run_dir = pathlib.Path(run_dir)
  dest = run_dir / "stale" / f"{key}-{attacked_sha256(kept)[:12]}"
  moves = [(f, dest / "attack" / "cells" / f.name)
           for f in grid.cell_files(run_dir / "attack" / "cells", key)]
  moves += [(run_dir / "autoattack" / name, dest / "autoattack" / name)
            for name in (key, f"{key}_rand")]
  moves.append((row_path(run_dir, key), row_path(dest, key)))
  for src, dst in moves:
    if src.exists():
      dst.parent.mkdir(parents=True, exist_ok=True)
      if dst.is_dir():  # set aside before from the same old model: keep the newer copy
        shutil.rmtree(dst)
      elif dst.exists():
        dst.unlink()
      src.rename(dst)
  return dest
