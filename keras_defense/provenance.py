"""What made a result: the versions of everything that can change the numbers.

Every report records these next to its config and seed (``results.json``,
``report.md``, ``train_result.json``). Versions are read from the installed
package metadata, so asking costs no import (tfmot is heavy).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import subprocess

# Distribution name -> key in the reports.
_PACKAGES = {"tensorflow": "tensorflow", "tf_keras": "tf_keras",
             "tensorflow-model-optimization": "tfmot",
             "tensorflow-datasets": "tensorflow_datasets", "numpy": "numpy",
             "keras-defense": "keras_defense"}


def versions() -> dict[str, str]:
  """Python, TensorFlow, tf_keras, tfmot, tfds, NumPy, keras-defense, machine."""
  out = {"python": platform.python_version()}
  for dist, key in _PACKAGES.items():
    try:
      out[key] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[key] = "not installed"
  out["keras_defense_commit"] = _git_commit()
  out["machine"] = platform.machine()
  out["cpu_count"] = str(os.cpu_count())
  return out


def _git_commit() -> str:
  """The source checkout's commit (+ "-dirty" with local changes), if it is one."""
  root = pathlib.Path(__file__).resolve().parents[1]
  if not (root / ".git").exists():
    return "unknown"
  try:
    def git(*args):
      return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "keras_defense")
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
