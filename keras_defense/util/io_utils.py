"""Crash-safe file output: write to a temporary path, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator


def file_in_the_way(path: str | os.PathLike) -> pathlib.Path | None:
  """The nearest existing ancestor of ``path`` (or itself) if it is not a directory.

  None when ``path`` can be created or reused as a directory.
  """
  p = pathlib.Path(path)
  for parent in (p, *p.parents):
    if parent.exists():
      return None if parent.is_dir() else parent
  return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of ``path``; renames it onto ``path`` on success.

  A crash or exception leaves ``path`` as it was (old content or absent) and
  removes the temporary. For directories an existing ``path`` is replaced.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp",
                                      dir=path.parent))
  target = tmp if directory else tmp / path.name
  if directory:
    tmp.rmdir()  # the writer creates it
  try:
    yield str(target)
    if directory:
      if path.exists():
        old = path.with_name(f".{path.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(target, path)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(target, path)
    else:
      os.replace(target, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def relative_to(path: str | os.PathLike, root: str | os.PathLike) -> str:
  """``path`` relative to ``root`` when it lies inside it (else as given)."""
  try:
    return str(pathlib.Path(path).relative_to(root))
  except ValueError:
    return str(path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def bind_settings(path: str | os.PathLike, identity: dict, *, what: str) -> None:
  """Writes ``identity`` to ``path`` (JSON), or refuses a run made with other settings.

  Args:
    path: the binding file in the run directory (e.g. ``<run_dir>/sweep.json``).
    identity: the settings that decide the run's numbers (JSON-able).
    what: the run, for the message ("a sweep", "a defenses comparison").

  Raises:
    UserError: ``path`` holds other settings; the message lists each that differs.
  """
  from keras_defense.util.errors import UserError  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    write_json(path, identity)
    return
  old = read_json(path)
  if old == identity:
    return

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  a, b = flat(old), flat(identity)
  diff = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                   for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
  raise UserError(f"`run_dir` {str(path.parent)!r} holds {what} made with other settings "
                  f"({diff}); its results cannot be mixed with these. Fix: use a new "
                  f"`run_dir`, or the settings it was made with.")
