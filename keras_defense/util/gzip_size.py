"""A file's or directory's gzip'd size, reproducibly: the one compression measure.

Pruning's zeros only show once compressed, so the pruning report (SavedModels)
and the deployment measurements (.tflite files, a SavedModel's ``variables/``)
both count bytes this way, on one scale.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import tarfile


def gzipped_bytes(path: str | os.PathLike) -> int:
  """Bytes of a gzip'd (level 9) tar of a file or directory, built in memory.

  Members are added in sorted order with fixed metadata (mtime 0, gzip mtime
  0), so the number depends only on the files' names and contents.

  Args:
    path: a file, or a directory whose files (recursively) are counted.

  Returns:
    The length in bytes of the compressed tar.
  """
  path = pathlib.Path(path)
  raw = io.BytesIO()
  with tarfile.open(fileobj=raw, mode="w") as tar:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
      info = tarfile.TarInfo(str(f.relative_to(path.parent if path.is_file() else path)))
      content = f.read_bytes()
      info.size = len(content)
      info.mtime = 0
      tar.addfile(info, io.BytesIO(content))
  return len(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))
