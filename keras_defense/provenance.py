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


def command_line(argv: list[str], cwd: str | os.PathLike | None = None) -> str:
  """``argv`` as a shell line a reader can rerun from the repository.

  The program is named by its base name (``kd-experiment``, not the venv's
  absolute path) and absolute paths under ``cwd`` become relative to it.
  """
  import shlex  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(cwd or os.getcwd()).resolve()

  def rel(arg: str) -> str:
    prefix, eq, value = arg.partition("=")
    text = value if eq else arg
    p = pathlib.Path(text)
    if p.is_absolute():
      try:
        text = str(p.resolve().relative_to(root))
      except ValueError:
        return arg
      return f"{prefix}={text}" if eq else text
    return arg

  words = [pathlib.Path(argv[0]).name] + [rel(a) for a in argv[1:]] if argv else []
  return " ".join(shlex.quote(w) for w in words)


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
