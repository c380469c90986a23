"""A user's own Keras model as a tf_keras model to train or prune, and back to their format.

``load_user_model`` takes what users have: a Keras 3 ``.keras`` file (rebuilt
in tf_keras by ``keras_bridge.to_tf_keras``, logits checked), a tf_keras
``.keras`` or ``.h5`` file, or a SavedModel holding a tf_keras model
(``export.load_model``: built-in classes only, checked before anything is
deserialized). ``save_user_format`` writes a trained or pruned tf_keras model
back as a ``.keras`` file of the Keras major version the user gave
(``keras_bridge.to_keras3`` for Keras 3, logits checked again).

A ``.keras`` file's Keras is read from the zip's ``metadata.json``
(``keras_version`` 3.x or 2.x); ``keras_major_version`` is a small private
detection (``models/keras_files.py`` is growing the project-wide one).

Example:
  >>> user = load_user_model("m.keras")   # UserModel(model=<tf_keras>, keras_major=3, ...)
  >>> save_user_format(user.model, "hardened.keras", keras_major=user.keras_major)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

from keras_defense.models import export
from keras_defense.models import keras_bridge
from keras_defense.util import io_utils
from keras_defense.util.compat import keras


@dataclasses.dataclass(frozen=True)
class UserModel:
  """A user's model, loaded as tf_keras.

  Attributes:
    model: the tf_keras model (logits out, as the user built it).
    path: where it came from.
    kind: "keras3" (.keras of Keras 3), "tf_keras" (.keras/.h5 of Keras 2) or
      "saved_model" (a SavedModel directory holding a tf_keras model).
    keras_major: 3 or 2, the Keras the user's file was written with.
  """
  model: keras.Model
  path: str
  kind: str
  keras_major: int

  def identity(self) -> dict:
    """JSON-able: where the model came from (run-dir identity, provenance)."""
    return {"init_model": self.path, "init_model_kind": self.kind}


def keras_major_version(path: str | os.PathLike) -> int | None:
  """The Keras major version that wrote a ``.keras`` zip (its metadata.json); None if not one.

  Raises:
    ModelLoadError: a zip whose metadata.json is unreadable or names no version.
  """
  p = pathlib.Path(path)
  if not p.is_file() or not zipfile.is_zipfile(p):
    return None
  try:
    with zipfile.ZipFile(p) as z:
      if "metadata.json" not in z.namelist():
        return None
      version = str(json.loads(z.read("metadata.json")).get("keras_version", ""))
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise export.ModelLoadError(f"{str(p)!r}: unreadable .keras metadata ({e}).") from e
  if not version[:1].isdigit():
    raise export.ModelLoadError(f"{str(p)!r}: metadata.json names no keras_version "
                                f"(got {version!r}); re-save the model with model.save().")
  return int(version.split(".")[0])


def _keras3_config(p: pathlib.Path) -> dict:
  with zipfile.ZipFile(p) as z:
    return json.loads(z.read("config.json"))


def load_keras3(path: str | os.PathLike):
  """A Keras 3 ``.keras`` file as a Keras 3 model, its classes checked before loading.

  Raises:
    BridgeError: a subclassed model, or layers without a tf_keras twin (all listed).
    ModelLoadError: a corrupt file.
  """
  p = pathlib.Path(path)
  try:
    config = _keras3_config(p)
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise export.ModelLoadError(f"{str(p)!r}: no readable config.json ({e}).") from e
  if config.get("class_name") not in ("Functional", "Sequential") or not str(
      config.get("module", "keras.")).startswith("keras."):
    raise keras_bridge.BridgeError(
        f"{str(p)!r} holds a subclassed model ({config.get('class_name')}, module "
        f"{config.get('module')}): it has no layer graph to rebuild in tf_keras; build it "
        f"with the functional API or Sequential.")
  bad = keras_bridge.unsupported_layers(config["config"]["layers"], keras.layers)
  if bad:
    raise keras_bridge.BridgeError(
        f"{str(p)!r}: {len(bad)} layer(s) have no built-in tf_keras twin: {'; '.join(bad)}. "
        f"Only built-in Keras layers are bridged.")
  try:
    return keras_bridge.keras3().saving.load_model(str(p), safe_mode=True, compile=False)
  except Exception as e:  # corrupt weights, bad h5 inside the zip ...
    raise export.ModelLoadError(f"could not load the Keras 3 model at {str(p)!r}: "
                                f"{type(e).__name__}: {e}") from e


def load_user_model(path: str | os.PathLike) -> UserModel:
  """The model at ``path`` (Keras 3/tf_keras ``.keras``, ``.h5``, SavedModel) as tf_keras.

  Raises:
    ModelLoadError: missing, corrupt, or not a Keras model.
    BridgeError: a Keras 3 model that cannot be rebuilt in tf_keras, or whose
      rebuilt logits differ (``keras_bridge.to_tf_keras``).
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise export.ModelLoadError(
        f"model path {str(p)!r} does not exist; expected a .keras or .h5 file or a "
        f"SavedModel directory.")
  major = keras_major_version(p)
  if major is not None and major >= 3:
    model = keras_bridge.to_tf_keras(load_keras3(p))
    return UserModel(model, str(p), "keras3", major)
  model = export.load_model(p)
  return UserModel(model, str(p), "saved_model" if p.is_dir() else "tf_keras", 2)


def save_user_format(model: keras.Model, path: str | os.PathLike, *, keras_major: int) -> str:
  """Writes ``model`` (tf_keras) as a ``.keras`` file of Keras ``keras_major``, atomically.

  Args:
    model: a functional tf_keras model of built-in layers (no tfmot wrappers).
    path: the file, ending in ``.keras``.
    keras_major: 3: rebuilt in Keras 3 (``keras_bridge.to_keras3``, logits
      checked); 2: tf_keras's own ``.keras``.

  Returns:
    The path written.

  Raises:
    ValueError: ``path`` does not end in ``.keras``.
    BridgeError: the Keras 3 rebuild fails or computes otherwise.
  """
  p = pathlib.Path(path)
  if p.suffix != ".keras":
    raise ValueError(f"`path` must end in .keras; got {str(p)!r}.")
  out = keras_bridge.to_keras3(model) if int(keras_major) >= 3 else model
  with io_utils.atomic_path(p) as tmp:
    out.save(tmp)
  return str(p)
