"""Training that starts from a user's model (``TrainConfig.init_model``) instead of a C&W net.

``load_initial`` loads the user's file (``models.user_model``: Keras 3
``.keras`` through the bridge, tf_keras ``.keras``/``.h5``, SavedModel) and
checks it against the data before anything trains: input shape = the
dataset's image shape, one logit per class, logits out (no final softmax).
``fresh_copy`` gives ``train`` its own copy under the distribution scope (the
loaded model is rebuilt, weights copied, so a mirrored strategy mirrors its
variables). ``user_format_path`` is where the hardened model goes back in the
user's format: ``TrainConfig.export_keras`` or, by default, beside the
SavedModel as ``<export_dir>/<version>.keras`` (TF Serving reads only the
numbered directories, and the SavedModel's size stays the SavedModel's).

Everything else is training as for the C&W networks: every training method,
the PGD-accuracy guard, ``BackupAndRestore`` (a rerun after ``kill -9``
reloads the file, then restores the last epoch's checkpoint into it),
TensorBoard, the SavedModel export.
"""

from __future__ import annotations

import pathlib

from keras_defense.models import user_model
from keras_defense.training.config import ConfigError
from keras_defense.util.compat import keras


def load_initial(path: str, image_shape, num_classes: int) -> user_model.UserModel:
  """The user's model at ``path``, checked against the data it is to be trained on.

  Args:
    path: a Keras 3 or tf_keras ``.keras``, an ``.h5`` or a SavedModel directory.
    image_shape: the dataset's (H, W, C).
    num_classes: the dataset's number of classes.

  Raises:
    ConfigError: nothing at ``path``; the model's input or output does not fit
      the data, or it ends in a softmax (training takes logits).
    ModelLoadError, BridgeError: the model cannot be loaded or bridged.
  """
  if not pathlib.Path(path).exists():
    raise ConfigError(
        f"`init_model` {path!r} does not exist; expected a .keras or .h5 file or a SavedModel "
        f"directory. Make it first (a flagfile's header names the run that makes the "
        f"models it starts from) or pass another path.")
  user = user_model.load_user_model(path)
  model = user.model
  if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
    raise ConfigError(f"`init_model` {path!r} has {len(model.inputs)} inputs and "
                      f"{len(model.outputs)} outputs; a classifier with one of each is needed.")
  shape = tuple(int(d) for d in model.input_shape[1:] if d is not None)
  if shape != tuple(int(d) for d in image_shape):
    raise ConfigError(
        f"`init_model` {path!r} takes images of shape {list(model.input_shape[1:])}, but the "
        f"dataset's images are {list(image_shape)}; pick the dataset (or --image_size) the "
        f"model was built for.")
  if int(model.output_shape[-1]) != int(num_classes):
    raise ConfigError(f"`init_model` {path!r} outputs {model.output_shape[-1]} values, but "
                      f"the dataset has {num_classes} classes.")
  last = model.layers[-1]
  if (isinstance(last, keras.layers.Softmax)
      or getattr(last, "activation", None) is keras.activations.softmax):
    raise ConfigError(
        f"`init_model` {path!r} ends in a softmax (layer {last.name!r}); training and the "
        f"attacks need logits: save the model without its final softmax activation.")
  return user


def fresh_copy(model: keras.Model) -> keras.Model:
  """A copy of ``model`` with its weights, made in the current (distribution) scope."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  return copy


def user_format_path(export_keras: str | None, saved_model_path: str | None) -> str | None:
  """Where the user's-format ``.keras`` goes: ``export_keras``, else ``<SavedModel>.keras``."""
  if export_keras:
    return export_keras
  if saved_model_path:
    return f"{pathlib.Path(saved_model_path)}.keras"
  return None


def write_user_format(model: keras.Model, user: user_model.UserModel,
                      export_keras: str | None, saved_model_path: str | None) -> str | None:
  """Writes ``model`` as a ``.keras`` of ``user``'s Keras major version; returns its path.

  Nothing is written (None) without ``export_keras`` or a SavedModel export.
  """
  path = user_format_path(export_keras, saved_model_path)
  if path is None:
    return None
  return user_model.save_user_format(model, path, keras_major=user.keras_major)
