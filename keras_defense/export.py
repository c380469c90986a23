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

Example:
  >>> path = export_saved_model(model, "saved_models/mnist_m0", version=1)
  >>> served = tf.saved_model.load(path).signatures["serving_default"]
  >>> served(images=tf.zeros([1, 28, 28, 1]))["classes"]
"""

from __future__ import annotations

import os
import pathlib

from keras_defense import io_utils
from keras_defense.compat import keras
from keras_defense.compat import tf
from keras_defense.errors import UserError

SERVING_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serving_uint8"
OUTPUT_KEYS = ("logits", "probabilities", "classes")


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
                       version: int | None = None) -> str:
  """Exports ``model`` to ``<base>/<version>/`` atomically.

  Args:
    model: a tf_keras model mapping float32 images to logits (no tfmot
      wrappers: strip pruning first).
    base: the model's folder, e.g. ``saved_models/mnist_m0``.
    version: positive int; default the next free version. An existing version
      is replaced only once the new export is complete.

  Returns:
    The path of the exported version.

  Raises:
    UserError: ``version`` < 1.
  """
  if version is None:
    version = next_version(base)
  if int(version) < 1:
    raise UserError(f"`version` must be a positive integer; got {version!r}.")
  path = pathlib.Path(base) / str(int(version))
  with io_utils.atomic_path(path, directory=True) as tmp:
    model.save(tmp, save_format="tf", include_optimizer=False,
               signatures=serving_signatures(model))
  return str(path)


def load_model(path: str | os.PathLike) -> keras.Model:
  """Loads a Keras model exported by ``export_saved_model`` (or a .keras/.h5 file).

  Loading runs no Python from the file: SavedModels hold graphs, and only the
  built-in Keras layers are accepted (no custom objects, ``safe_mode`` on).

  Raises:
    ModelLoadError: missing path, not a model, or corrupt files.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise ModelLoadError(f"model path {str(p)!r} does not exist; expected a "
                         f"SavedModel directory such as saved_models/mnist_m0/1.")
  if p.is_dir() and not (p / "saved_model.pb").is_file():
    raise ModelLoadError(f"model path {str(p)!r} is not a SavedModel (no "
                         f"saved_model.pb in it).")
  try:
    kwargs = {} if p.is_dir() else {"safe_mode": True}
    model = keras.models.load_model(str(p), compile=False, **kwargs)
  except Exception as e:  # corrupt protobufs, missing variables, bad h5 ...
    raise ModelLoadError(f"could not load the model at {str(p)!r} (corrupt or "
                         f"not a Keras model): {type(e).__name__}: {e}") from e
  if not isinstance(model, keras.Model):
    raise ModelLoadError(f"{str(p)!r} holds no Keras model.")
  return model
