"""Keras model files: which Keras wrote them, what their configs hold, Keras 3 loading.

Two Keras live side by side here: the project's own models are tf_keras
(Keras 2, for tfmot), while TensorFlow >= 2.16 users save with Keras 3
(``model.save("m.keras")``). A file is told apart by what it says about
itself, never by trying loaders in turn:

* ``.keras`` (a zip): ``metadata.json``'s ``keras_version`` (Keras 3 writes
  3.x, tf_keras its own 2.x).
* ``.h5``: the ``keras_version`` attribute of the HDF5 root.

Before anything is rebuilt, the saved config is read as data
(``check_config``): every layer and object record must name a built-in Keras
class, and no layer may be a ``Lambda`` (its Python code, marshalled or
lambda source, would run on load). The scan knows the data records each
Keras writes into configs (Keras 3's ``__keras_tensor__`` node arguments,
``__tensor__``/``__numpy__`` constants, tf_keras's ``__tuple__`` ...) and does
not take them for classes.

A Keras 3 file is then loaded by Keras 3 itself (``keras.saving.load_model``
with ``safe_mode=True``, ``compile=False``) and used as an opaque function:
it runs on the TensorFlow backend, so ``tf.GradientTape`` and ``tf.function``
work through it, and it never shares a model with tf_keras layers.

Example:
  >>> info = inspect("m.keras")
  >>> info.describe()
  "Keras 3 .keras file, saved with Keras 3.15.1"
  >>> model = load_keras3(pathlib.Path("m.keras"), info)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile
from typing import Any, Iterator

from keras_defense.util.compat import keras as tf_keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

KERAS3 = "keras3"
TF_KERAS = "tf_keras"

# Records Keras writes into a config as *data*: tensors, arrays, tuples and
# shapes, never a class it imports. Keras 3 (keras/src/saving/serialization_lib.py)
# and tf_keras (its saving_lib and SavedModel keras_metadata) between them.
_DATA_RECORDS = frozenset({
    "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__slice__",
    "__ellipsis__", "__typespec__", "__tuple__", "TypeSpec", "TensorShape"})
# Configs may name these besides layers: models and dtype policies.
_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model", "Policy", "DTypePolicy",
                            "FloatDTypePolicy"})
# The namespaces a built-in class of a config lives in (either Keras).
_NAMESPACES = ("layers", "initializers", "regularizers", "constraints", "metrics",
                        "losses", "optimizers")


class UnsafeModelError(UserError):
  """A saved model whose loading could run Python code from the file."""


@dataclasses.dataclass(frozen=True)
class KerasFile:
  """What a Keras model file says about itself.

  Attributes:
    keras: ``KERAS3`` or ``TF_KERAS``.
    container: "keras" (zip archive) or "h5".
    keras_version: the version that saved it ("" if the file does not say).
  """
  keras: str
  container: str
  keras_version: str

  def describe(self) -> str:
    """E.g. "Keras 3 .keras file, saved with Keras 3.15.1"."""
    who = "Keras 3" if self.keras == KERAS3 else "tf_keras (Keras 2)"
    saved = f", saved with Keras {self.keras_version}" if self.keras_version else \
        ", Keras version not recorded"
    return f"{who} .{self.container} file{saved}"


def _major(version: str) -> int | None:
  try:
    return int(str(version).split(".")[0])
  except ValueError:
    return None


def inspect(path: str | os.PathLike) -> KerasFile:
  """Tells a Keras 3 file from a tf_keras one by its own metadata.

  Args:
    path: a ``.keras`` archive or an ``.h5`` file.

  Returns:
    A ``KerasFile``. A file that records no version is taken for tf_keras
    (Keras 2 wrote ``.h5`` files before it recorded one; Keras 3 always does).

  Raises:
    UserError: neither a zip archive with ``metadata.json`` nor an HDF5 file.
  """
  p = pathlib.Path(path)
  if zipfile.is_zipfile(p):
    try:
      with zipfile.ZipFile(p) as z:
        meta = json.loads(z.read("metadata.json"))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
      raise UserError(f"model {str(p)!r} is a zip archive without a readable "
                      f"metadata.json, so not a .keras model file ({e}).") from e
    version = str(meta.get("keras_version", "")) if isinstance(meta, dict) else ""
    return KerasFile(KERAS3 if (_major(version) or 0) >= 3 else TF_KERAS, "keras", version)
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(p, "r") as f:
      version = f.attrs.get("keras_version", "")
  except OSError as e:
    raise UserError(f"model {str(p)!r} is neither a .keras archive nor an HDF5 (.h5) "
                    f"file, nor a SavedModel directory ({e}).") from e
  version = version.decode() if isinstance(version, bytes) else str(version)
  return KerasFile(KERAS3 if (_major(version) or 0) >= 3 else TF_KERAS, "h5", version)


def read_configs(path: str | os.PathLike) -> list:
  """The Keras configs stored at ``path``, read as JSON data (nothing deserialized).

  A SavedModel's ``keras_metadata.pb`` (one config per node), a ``.keras``
  archive's ``config.json`` or an ``.h5`` file's ``model_config``.
  """
  p = pathlib.Path(path)
  if p.is_dir():
    meta = p / "keras_metadata.pb"
    if not meta.is_file():
      return []
    from tf_keras.protobuf import saved_metadata_pb2  # pylint: disable=g-import-not-at-top
    proto = saved_metadata_pb2.SavedMetadata()
    proto.ParseFromString(meta.read_bytes())
    return [json.loads(node.metadata) for node in proto.nodes if node.metadata]
  if zipfile.is_zipfile(p):
    with zipfile.ZipFile(p) as z:
      return [json.loads(z.read("config.json"))] if "config.json" in z.namelist() else []
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(p, "r") as f:
    config = f.attrs.get("model_config")
    if config is None:
      return []
    return [json.loads(config.decode() if isinstance(config, bytes) else config)]


def _records(obj: Any, layer: str | None = None) -> Iterator[tuple[dict, str | None]]:
  """(record, name of the layer it belongs to) for every class record in a config."""
  if isinstance(obj, dict):
    name = obj.get("class_name")
    if isinstance(name, str):
      if name in _DATA_RECORDS:
        return  # data: tensors, arrays, shapes; nothing in it is a class
      inner = obj.get("config")
      own = inner.get("name") if isinstance(inner, dict) else None
      layer = own if isinstance(own, str) and own else (obj.get("name") or layer)
      yield obj, layer
    for v in obj.values():
      yield from _records(v, layer)
  elif isinstance(obj, list):
    for v in obj:
      yield from _records(v, layer)


def _builtin(record: dict, keras: str) -> bool:
  name = record["class_name"]
  if name in _MODEL_CLASSES:
    return True
  if keras == KERAS3 and "module" in record:
    # A .keras archive names the module of every object: built-ins live
    # under keras.* (functions also under "builtins"); a registered custom
    # object's registered_name is "package>name".
    module = str(record.get("module") or "")
    registered = str(record.get("registered_name") or "")
    in_keras = module == "keras" or module.startswith("keras.") or (
        name == "function" and module == "builtins")
    return in_keras and ">" not in registered
  # .h5 configs (either Keras) and tf_keras archives name the class only.
  if keras == KERAS3:
    import keras as namespace  # pylint: disable=g-import-not-at-top  (Keras 3)
  else:
    namespace = tf_keras
  return any(isinstance(getattr(getattr(namespace, ns), name, None), type)
             for ns in _NAMESPACES)


def check_config(configs: list, *, keras: str, where: str) -> None:
  """Raises unless every class in ``configs`` is a built-in Keras class and none a Lambda.

  Args:
    configs: saved configs as JSON data (``read_configs``).
    keras: ``KERAS3`` or ``TF_KERAS``: whose configs they are.
    where: the model as the message names it, with its format, e.g. "model at
      'm.keras' (Keras 3 .keras file, saved with Keras 3.15.1)".

  Raises:
    UnsafeModelError: naming the first offending layer.
  """
  for config in configs:
    for record, layer in _records(config):
      name = record["class_name"]
      if name == "Lambda" or name == "__lambda__":
        raise UnsafeModelError(
            f"{where}: layer {layer!r} is a Lambda: its Python code would run on load; "
            f"refusing. Fix: replace the Lambda with built-in layers (e.g. Rescaling, "
            f"Normalization, Activation) and save the model again, or export it as a "
            f"SavedModel (model.export()).")
      if not _builtin(record, keras):
        shown = record.get("registered_name") or name
        raise UnsafeModelError(
            f"{where}: layer {layer!r} is a {shown!r}, which is not a built-in Keras "
            f"class; refusing to load it, since rebuilding it could run Python code from "
            f"the file. Fix: save a model of built-in layers only, or export it as a "
            f"SavedModel (model.export()), which holds a graph, not Python.")


def load_keras3(path: pathlib.Path, info: KerasFile) -> Any:
  """Loads a Keras 3 file with Keras 3 (``safe_mode=True``, ``compile=False``).

  Returns:
    A Keras 3 ``keras.Model`` (not a tf_keras one): call it as
    ``model(x, training=False)`` on float32 tensors; gradients flow through it.

  Raises:
    UnsafeModelError: Keras 3's safe mode refused a Lambda (or another object
      whose loading would run Python code).
    UserError: the file could not be loaded (corrupt, unknown class ...).
  """
  import keras  # pylint: disable=g-import-not-at-top  (Keras 3, not the project's tf_keras)
  where = f"model at {str(path)!r} ({info.describe()})"
  try:
    model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
  except Exception as e:  # pylint: disable=broad-except  (Keras raises many types)
    text = f"{type(e).__name__}: {e}"
    if "safe_mode" in text or "Lambda" in text:
      raise UnsafeModelError(f"{where}: Keras 3's safe mode refused it ({text.splitlines()[0]}); "
                             f"refusing.") from e
    raise UserError(f"could not load the {where} (corrupt, or a class Keras 3 does not "
                    f"know): {text}") from e
  if not isinstance(model, keras.Model):
    raise UserError(f"{where} holds no Keras model (got {type(model).__name__}).")
  return model


def is_keras3_model(model: Any) -> bool:
  """True for a Keras 3 model (as ``load_keras3`` returns), False for tf_keras ones."""
  if isinstance(model, tf_keras.Model):
    return False
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(model, keras.Model)


@dataclasses.dataclass(frozen=True)
class ModelIO:
  """The input and outputs of a Keras 3 model, as the Classifier adapter needs them."""
  input_name: str
  input_dtype: tf.DType
  input_shape: tuple
  output_names: tuple[str, ...]


def keras3_io(model: Any) -> ModelIO:
  """The single input's name, dtype and shape and the output names of a Keras 3 model.

  Raises:
    UserError: the model does not take exactly one input.
  """
  inputs = list(model.inputs or [])
  if len(inputs) != 1:
    raise UserError(f"the Keras 3 model takes {len(inputs)} inputs; kd-evaluate feeds one "
                    f"image tensor.")
  inp = inputs[0]
  names = getattr(model, "output_names", None) or [
      getattr(t, "name", f"output_{i}") for i, t in enumerate(model.outputs or [])]
  return ModelIO(input_name=str(inp.name), input_dtype=tf.as_dtype(inp.dtype),
                 input_shape=tuple(inp.shape), output_names=tuple(str(n) for n in names))


def select_output(out: Any, index: int, key: str) -> Any:
  """Output ``index`` (named ``key``) of a Keras 3 model's call: a tensor, list or dict."""
  if isinstance(out, dict):
    return out[key] if key in out else list(out.values())[index]
  if isinstance(out, (list, tuple)):
    return out[index]
  return out
