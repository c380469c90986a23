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
from typing import Any, Sequence

from keras_defense.models import keras_files
from keras_defense.models import scan
from keras_defense.models import tflite
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
    model: a tf_keras model mapping float32 images to logits (strip pruning
      first; a tfmot QAT model exports as its fake-quant graph, loadable by
      ``classifier.load_classifier``, not by ``load_model``).
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


def _check_builtin_classes(p: pathlib.Path, where: str, kind: str) -> None:
  """Raises ModelLoadError if the saved config names a non-built-in class or a Lambda."""
  try:
    configs = keras_files.read_configs(p)
  except Exception as e:  # pylint: disable=broad-except  (corrupt: load reports it)
    del e
    return
  try:
    keras_files.check_config(configs, keras=kind, where=where)
  except keras_files.UnsafeModelError as e:
    raise ModelLoadError(str(e)) from None


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


def _inspect(p: pathlib.Path) -> keras_files.KerasFile | None:
  try:
    return keras_files.inspect(p)
  except UserError:
    return None  # not a Keras file: tf_keras's loader names what is wrong


def load_model(path: str | os.PathLike, *, allow_ops: Sequence[str] = ()) -> Any:
  """Loads a Keras model exported by ``export_saved_model`` (or a .keras/.h5 file).

  Loading runs no Python from the file: SavedModels hold graphs, and only the
  built-in Keras layers are accepted (no custom objects, no Lambda layers,
  ``safe_mode`` on). The model's saved config is checked *before* Keras
  deserializes it, because tf_keras applies ``safe_mode`` to .keras files
  only: a Lambda layer in an .h5 file or a SavedModel's keras_metadata.pb
  would otherwise be rebuilt from its marshalled Python bytecode (arbitrary
  code execution).

  Which Keras made a file is read from the file (``keras_files.inspect``): a
  ``.keras``/``.h5`` saved by Keras 3 (``model.save("m.keras")`` with
  TensorFlow >= 2.16) is loaded by Keras 3 and returned as a **Keras 3
  model** (a ``keras.Model`` of the ``keras`` package, not tf_keras): the
  attacks take it as a callable images -> logits (gradients flow through
  it), but it cannot be pruned, cloned or mixed with tf_keras layers.
  SavedModels and tf_keras files give a tf_keras model. A SavedModel's graph
  is scanned first (``scan.check_saved_model``): one that reads or writes
  files, prints or calls out is refused unless those ops are allowed.

  A ``.tflite`` file gives a ``tflite.TFLiteModel``: the flatbuffer on the
  LiteRT interpreter (float32 NumPy images in [0, 1] -> logits, int8 I/O
  handled, no gradients; Square and kd-evaluate's black-box ensemble run on it).

  Args:
    path: a SavedModel directory, a .keras/.h5 or a .tflite file.
    allow_ops: ops a SavedModel may hold although they touch the outside world
      (``scan.DENYLIST``), each named explicitly; ignored for Keras files.

  Raises:
    ModelLoadError: missing path, not a model, corrupt files, or a Lambda or
      non-built-in class (the message names the format, the Keras version
      that saved it and the layer).
    scan.UnsafeModelError: a SavedModel holding ops not in ``allow_ops``.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise ModelLoadError(f"model path {str(p)!r} does not exist; expected a "
                         f"SavedModel directory such as saved_models/mnist_m0/1.")
  if p.is_dir() and not (p / "saved_model.pb").is_file():
    raise ModelLoadError(f"model path {str(p)!r} is not a SavedModel (no "
                         f"saved_model.pb in it).")
  if p.suffix == ".tflite" and p.is_file():
    return tflite.TFLiteModel(p)  # LiteRT, NumPy in/out, no gradients
  if p.is_dir():
    check_saved_model(p, allow_ops=allow_ops, fix=scan.FIX_LIBRARY)
  info = None if p.is_dir() else _inspect(p)
  where = f"model at {str(p)!r} " + ("(tf_keras SavedModel)" if info is None
                                     else f"({info.describe()})")
  _check_builtin_classes(p, where, keras_files.TF_KERAS if info is None else info.keras)
  if info is not None and info.keras == keras_files.KERAS3:
    try:
      return keras_files.load_keras3(p, info)
    except UserError as e:
      raise ModelLoadError(str(e)) from e.__cause__
  try:
    kwargs = {} if p.is_dir() else {"safe_mode": True}
    model = keras.models.load_model(str(p), compile=False, **kwargs)
  except Exception as e:  # corrupt protobufs, missing variables, bad h5 ...
    raise ModelLoadError(f"could not load the model at {str(p)!r} (corrupt or "
                         f"not a Keras model): {type(e).__name__}: {e}") from e
  if not isinstance(model, keras.Model):
    raise ModelLoadError(f"{str(p)!r} holds no Keras model.")
  return model
