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


def model_provenance(stage: str, dataset_info, *, base_model: str | None = None) -> dict:
  """What an exported model records about itself: stage, dataset and its sources.

  Args:
    stage: "train", "prune", "augment", ...
    dataset_info: ``data.DatasetInfo`` of the data it was made or measured on.
    base_model: the SavedModel it was derived from, if any.
  """
  return {"stage": stage, "dataset": dataset_info.name,
          "dataset_version": dataset_info.version,
          "dataset_sources": dict(dataset_info.sources),
          "dataset_content_check": dataset_info.content_check,
          "image_shape": list(dataset_info.image_shape),
          "class_names": list(dataset_info.class_names),
          "base_model": base_model, "versions": versions()}


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def command_line(argv: list[str], *, cwd: str | os.PathLike | None = None,
                 root: str | os.PathLike = REPO_ROOT) -> str:
  """``argv`` as a shell line a reader can rerun from the repository.

  The program is named by its base name (``kd-experiment``, not the venv's
  absolute path; a module run as a script, ``…/keras_defense/bin/evaluate.py``,
  becomes ``python -m keras_defense.bin.evaluate``), and every ``--flag=value``
  whose value is a path under ``root`` (absolute, or relative to ``cwd``) is
  rewritten relative to ``root``.
  """
  import shlex  # pylint: disable=g-import-not-at-top
  cwd = pathlib.Path(cwd or os.getcwd())
  root = pathlib.Path(root).resolve()
  first = pathlib.Path(argv[0]) if argv else pathlib.Path("kd")
  words = [f"python -m keras_defense.bin.{first.stem}" if first.suffix == ".py" else first.name]
  for arg in argv[1:]:
    if arg.startswith("--") and "=" in arg:
      flag, value = arg.split("=", 1)
      if value and ("/" in value or value.startswith(".")):
        p = (cwd / value).resolve()
        if p == root or root in p.parents:
          value = os.path.relpath(p, root)
      words.append(shlex.quote(f"{flag}={value}"))
    else:
      words.append(shlex.quote(arg))
  return " ".join(words)


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
  root = pathlib.Path(__file__).resolve().parents[2]
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
