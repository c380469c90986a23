"""SavedModel export in TF Serving layout, and safe loading.

Layout: ``<base>/<version>/`` (e.g. ``saved_models/mnist_m0/1/``), a Keras-2
SavedModel whose signatures serve with plain TensorFlow (no keras_defense, no
tfmot, no custom objects, no Lambda layers):

* ``serving_default``: ``images`` float32 ``[batch, H, W, C]`` in [0, 1] ->
  ``logits`` float32 ``[batch, K]``, ``probabilities`` (softmax of logits) and
  ``classes`` int64 (argmax).
* ``serving_uint8``: ``images`` uint8 ``[batch, H, W, C]`` in [0, 255], same
  outputs (the image is divided by 255 first).

H, W, C are fixed in the signatures, so a wrongly shaped or typed request is
refused at the boundary.

What made the model (its dataset with that dataset's source-file digests, the
stage, the base model) is kept beside the graph in
``assets.extra/keras_defense.json`` (TF Serving's folder for extra files; no
loader reads it), see ``read_provenance``.

Example:
  >>> path = export_saved_model(model, "saved_models/mnist_m0", version=1)
  >>> served = tf.saved_model.load(path).signatures["serving_default"]
  >>> served(images=tf.zeros([1, 28, 28, 1]))["classes"]
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from keras_defense.models import scan
from keras_defense.util import io_utils
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

SERVING_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serving_uint8"
OUTPUT_KEYS = ("logits", "probabilities", "classes")
PROVENANCE_FILE = pathlib.Path("assets.extra") / "keras_defense.json"


class ModelLoadError(UserError):
  """A model path is missing, corrupt, or holds the wrong kind of model."""


def _outputs(logits):
  logits = tf.cast(logits, tf.float32)
  return {
      "logits": logits,
      "probabilities": tf.nn.softmax(logits, axis=-1),
      "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
  }


def serving_signatures(model: keras.Model) -> dict:
  """Returns the two concrete serving functions for ``model``."""
  shape = [None] + [int(d) for d in model.input_shape[1:]]

  # A loaded signature does not check shapes by itself (a rank-3 request
  # aborted the whole process inside the MKL convolution): the EnsureShape op
  # refuses a wrong shape at the boundary with an InvalidArgumentError.
  @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
  def serve_float(images):
    images = tf.ensure_shape(images, shape)
    return _outputs(model(images, training=False))

  @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")])
  def serve_uint8(images):
    images = tf.ensure_shape(images, shape)
    return _outputs(model(tf.cast(images, tf.float32) / 255.0, training=False))

  return {SERVING_SIGNATURE: serve_float.get_concrete_function(),
          UINT8_SIGNATURE: serve_uint8.get_concrete_function()}


def next_version(base: str | os.PathLike) -> int:
  """The next free integer version under ``base`` (1 if none)."""
  base = pathlib.Path(base)
  versions = [int(p.name) for p in base.glob("*") if p.is_dir() and p.name.isdigit()]
  return max(versions, default=0) + 1


def export_saved_model(model: keras.Model, base: str | os.PathLike, *,
                       version: int | None = None, provenance: dict | None = None) -> str:
  """Exports ``model`` to ``<base>/<version>/`` atomically.

  Args:
    model: a tf_keras model mapping float32 images to logits (no tfmot
      wrappers: strip pruning first).
    base: the model's folder, e.g. ``saved_models/mnist_m0``.
    version: positive int; default the next free version. An existing version
      is replaced only once the new export is complete.
    provenance: JSON-able facts written to ``assets.extra/keras_defense.json``
      (``{"dataset": ..., "stage": ...}``; see ``provenance.model_provenance``).

  Returns:
    The path of the exported version.

  Raises:
    UserError: ``version`` < 1, or ``base`` lies under an existing file.
  """
  if version is None:
    version = next_version(base)
  if int(version) < 1:
    raise UserError(f"`version` must be a positive integer; got {version!r}.")
  path = pathlib.Path(base) / str(int(version))
  blocker = io_utils.file_in_the_way(path.parent)
  if blocker is not None:
    raise UserError(f"`export_dir` {str(base)!r} cannot hold a SavedModel: "
                    f"{str(blocker)!r} exists and is not a directory.")
  with io_utils.atomic_path(path, directory=True) as tmp:
    model.save(tmp, save_format="tf", include_optimizer=False,
               signatures=serving_signatures(model))
    if provenance is not None:
      io_utils.write_json(pathlib.Path(tmp) / PROVENANCE_FILE, provenance)
  return str(path)


def read_provenance(path: str | os.PathLike) -> dict | None:
  """The provenance exported with the SavedModel at ``path`` (None if it has none)."""
  p = pathlib.Path(path) / PROVENANCE_FILE
  if not p.is_file():
    return None
  try:
    return io_utils.read_json(p)
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{str(p)!r} is not valid JSON ({e}).") from e


def check_model_dataset(path: str | os.PathLike, dataset: str, *, what: str) -> dict:
  """Raises unless the SavedModel at ``path`` records that it was made on ``dataset``.

  Args:
    path: a SavedModel version directory.
    dataset: the dataset of the run that wants to use it.
    what: how the message names the model ("--reuse_saved_models", "base model").

  Returns:
    The model's provenance.

  Raises:
    ModelLoadError: no provenance, or another dataset.
  """
  record = read_provenance(path)
  if record is None or "dataset" not in record:
    raise ModelLoadError(
        f"{what}: {str(path)!r} records no dataset (no {PROVENANCE_FILE} in it), so it "
        f"cannot be checked against this run's dataset {dataset!r}; re-export it with "
        f"keras-defense or run the stage that makes it.")
  if record["dataset"] != dataset:
    raise ModelLoadError(
        f"{what}: {str(path)!r} was made on dataset {record['dataset']!r}, but this run's "
        f"dataset is {dataset!r}; use models of {dataset!r} or pass "
        f"--dataset={record['dataset']}.")
  return record


# Configs may name these besides layers: models, dtype policies, and the
# tensor specs/shapes/tuples a SavedModel's keras_metadata stores as data.
_MODEL_CLASSES = ("Functional", "Sequential", "Model", "Policy", "DTypePolicy",
                  "TypeSpec", "TensorShape", "__tuple__", "__ellipsis__")


def _class_names(obj):
  """Every ``class_name`` in a Keras config (nested dicts and lists)."""
  if isinstance(obj, dict):
    if isinstance(obj.get("class_name"), str):
      yield obj["class_name"]
    for v in obj.values():
      yield from _class_names(v)
  elif isinstance(obj, list):
    for v in obj:
      yield from _class_names(v)


def _saved_configs(p: pathlib.Path) -> list:
  """The Keras configs stored at ``p`` (read as data, nothing deserialized)."""
  import json  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  if p.is_dir():
    meta = p / "keras_metadata.pb"
    if not meta.is_file():
      return []
    from tf_keras.protobuf import saved_metadata_pb2  # pylint: disable=g-import-not-at-top
    proto = saved_metadata_pb2.SavedMetadata()
    proto.ParseFromString(meta.read_bytes())
    return [json.loads(node.metadata) for node in proto.nodes if node.metadata]
  if zipfile.is_zipfile(p):  # .keras
    with zipfile.ZipFile(p) as z:
      return [json.loads(z.read("config.json"))] if "config.json" in z.namelist() else []
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(p, "r") as f:
    config = f.attrs.get("model_config")
    if config is None:
      return []
    return [json.loads(config.decode() if isinstance(config, bytes) else config)]


def _check_builtin_classes(p: pathlib.Path) -> None:
  """Raises ModelLoadError if the saved config names a non-built-in class."""
  try:
    configs = _saved_configs(p)
  except Exception as e:  # pylint: disable=broad-except  (corrupt: load reports it)
    del e
    return
  namespaces = (keras.layers, keras.initializers, keras.regularizers,
                keras.constraints, keras.metrics, keras.losses, keras.optimizers)
  for name in {n for c in configs for n in _class_names(c)}:
    builtin = name in _MODEL_CLASSES or any(
        isinstance(getattr(ns, name, None), type) for ns in namespaces)
    if name == "Lambda" or not builtin:
      raise ModelLoadError(
          f"model at {str(p)!r} contains a {name!r} layer or object, which is not a "
          f"built-in Keras class; refusing to load it, since rebuilding it could run "
          f"Python code from the file. Export models with built-in layers only.")


def check_saved_model(path: str | os.PathLike, *, allow_ops: Sequence[str] = (),
                      fix: str = scan.FIX_FLAG) -> None:
  """``scan.check_saved_model``, an unreadable saved_model.pb a ``ModelLoadError``.

  Raises:
    ModelLoadError: saved_model.pb missing or corrupt.
    scan.UnsafeModelError: ops not in ``allow_ops`` (see ``scan``).
  """
  try:
    scan.check_saved_model(path, allow_ops=allow_ops, fix=fix)
  except scan.UnreadableModelError as e:
    raise ModelLoadError(str(e)) from e


def load_model(path: str | os.PathLike, *, allow_ops: Sequence[str] = ()) -> keras.Model:
  """Loads a Keras model exported by ``export_saved_model`` (or a .keras/.h5 file).

  Loading runs no Python from the file: SavedModels hold graphs, and only the
  built-in Keras layers are accepted (no custom objects, ``safe_mode`` on).
  The model's saved config is checked *before* Keras deserializes it, because
  tf_keras applies ``safe_mode`` to .keras files only: a Lambda layer in an
  .h5 file or a SavedModel's keras_metadata.pb would otherwise be rebuilt from
  its marshalled Python bytecode (arbitrary code execution). A SavedModel's
  graph is scanned first (``scan.check_saved_model``): one that reads or
  writes files, prints or calls out is refused unless those ops are allowed.

  Args:
    path: a SavedModel directory or a .keras/.h5 file.
    allow_ops: ops a SavedModel may hold although they touch the outside world
      (``scan.DENYLIST``), each named explicitly; ignored for Keras files.

  Raises:
    ModelLoadError: missing path, not a model, or corrupt files.
    scan.UnsafeModelError: a SavedModel holding ops not in ``allow_ops``.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise ModelLoadError(f"model path {str(p)!r} does not exist; expected a "
                         f"SavedModel directory such as saved_models/mnist_m0/1.")
  if p.is_dir() and not (p / "saved_model.pb").is_file():
    raise ModelLoadError(f"model path {str(p)!r} is not a SavedModel (no "
                         f"saved_model.pb in it).")
  if p.is_dir():
    check_saved_model(p, allow_ops=allow_ops, fix=scan.FIX_LIBRARY)
  _check_builtin_classes(p)
  try:
    kwargs = {} if p.is_dir() else {"safe_mode": True}
    model = keras.models.load_model(str(p), compile=False, **kwargs)
  except Exception as e:  # corrupt protobufs, missing variables, bad h5 ...
    raise ModelLoadError(f"could not load the model at {str(p)!r} (corrupt or "
                         f"not a Keras model): {type(e).__name__}: {e}") from e
  if not isinstance(model, keras.Model):
    raise ModelLoadError(f"{str(p)!r} holds no Keras model.")
  return model
