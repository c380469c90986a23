"""What a deployed artifact costs and how closely it follows its float parent.

Bytes raw and gzip-compressed (pruning's zeros show only compressed), top-1
agreement, and LiteRT latency per image (median over repeated single-image
calls, the deployment setting: 1 thread, batch 1).

The gzip measure is the pruning report's (``util.gzip_size.gzipped_bytes``: a
tar with fixed metadata, members sorted, gzip level 9), so a .tflite and a
SavedModel's ``variables/`` compare on one scale.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from keras_defense.util.gzip_size import gzipped_bytes  # noqa: F401  (re-exported)


def file_bytes(path: str | os.PathLike) -> int:
  """Bytes of a file, or of every file under a directory."""
  p = pathlib.Path(path)
  if p.is_file():
    return p.stat().st_size
  return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def saved_model_variables(path: str | os.PathLike) -> pathlib.Path:
  """The ``variables/`` directory of a SavedModel: its weights, the float size to beat."""
  return pathlib.Path(path) / "variables"


def agreement(a_logits: np.ndarray, b_logits: np.ndarray) -> float:
  """Fraction of rows whose argmax is the same in both (top-1 agreement)."""
  a, b = np.argmax(a_logits, axis=-1), np.argmax(b_logits, axis=-1)
  return float(np.mean(a == b)) if len(a) else float("nan")


def latency_seconds(model, image: np.ndarray, *, repeats: int = 200, warmup: int = 10) -> float:
  """Median seconds of ``model(image[None])`` over ``repeats`` calls (batch 1).

  Args:
    model: a ``models.tflite.TFLiteModel`` (or any callable on a batch).
    image: float32 (H, W, C) in [0, 1].
    repeats: timed calls, >= 1.
    warmup: untimed calls first (allocation, caches).
  """
  x = np.asarray(image, np.float32)[None]
  for _ in range(warmup):
    model(x)
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    model(x)
    times.append(time.perf_counter() - t)
  return float(np.median(times))
