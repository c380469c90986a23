"""How attacks run a model: logits function, bfloat16 clone, per-model cache, batches.

Compiled attack steps are built once per (model, options) and kept in a small
cache keyed on ``id(model)`` and guarded by a weak reference, so a model that
is garbage-collected drops its compiled steps, and attacking the same model
twice does not retrace. The cached steps reach the model only through the weak
reference, so the cache never keeps a model alive.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Hashable

import numpy as np

from keras_defense.attacks import validation
from keras_defense.compat import keras
from keras_defense.compat import tf

_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def model_cache(model: Any) -> dict:
  """Returns the dict of compiled objects cached for ``model``.

  Callables that cannot be weakly referenced get a fresh (uncached) dict.
  """
  key = id(model)
  entry = _CACHE.get(key)
  if entry is not None and entry[0]() is model:
    return entry[1]
  try:
    ref = weakref.ref(model, lambda _, key=key: _CACHE.pop(key, None))
  except TypeError:
    return {}
  cache: dict = {}
  _CACHE[key] = (ref, cache)
  return cache


def cached(model: Any, key: Hashable, build: Callable[[], Any]) -> Any:
  """Returns ``model_cache(model)[key]``, building it on first use."""
  cache = model_cache(model)
  if key not in cache:
    cache[key] = build()
  return cache[key]


def on_subset(mask: tf.Tensor, tensors: dict, fn: Callable[[dict], dict]) -> dict:
  """Applies ``fn`` to the images where ``mask`` holds; scatters the result back.

  ``tensors`` maps names to per-image tensors (leading axis N); ``fn`` gets the
  same dict restricted to the masked images and returns the entries it
  changed. Images outside ``mask`` are left untouched and cost nothing; with
  no image in ``mask`` nothing runs. This is how attacks drop finished images
  from a batch (compaction) inside a compiled loop.
  """
  def apply():
    idx = tf.where(mask)
    out = fn({k: tf.gather_nd(v, idx) for k, v in tensors.items()})
    return {k: tf.tensor_scatter_nd_update(v, idx, out[k]) if k in out else v
            for k, v in tensors.items()}

  def apply_all():   # every image: no gather or scatter
    out = fn(dict(tensors))
    return {k: out.get(k, v) for k, v in tensors.items()}

  # Never call the model on an empty batch (oneDNN convolutions reject it).
  return tf.cond(tf.reduce_any(mask), lambda: tf.cond(
      tf.reduce_all(mask), apply_all, apply), lambda: dict(tensors))


def _bfloat16_clone(model: keras.Model) -> keras.Model:
  """Clones ``model`` under the ``mixed_bfloat16`` policy (variables stay fp32).

  The global policy is set only while cloning and restored afterwards.
  """
  def clone_layer(layer):
    # A layer's config stores its float32 policy explicitly, so the global
    # policy alone does not reach cloned layers: override it per layer.
    config = layer.get_config()
    config["dtype"] = "mixed_bfloat16"
    return layer.__class__.from_config(config)

  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    clone = keras.models.clone_model(model, clone_function=clone_layer)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  return clone


def logits_function(model: Any, compute_dtype: str) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns ``f(x) -> float32 logits`` that holds the model weakly.

  For ``compute_dtype="bfloat16"`` a Keras model is cloned once under the
  ``mixed_bfloat16`` policy and cached; its weights are re-copied from the
  model on every call of this function (cheap), so a model trained further
  between attacks is attacked with its current weights.

  Raises:
    TypeError: ``model`` is not callable, or ``compute_dtype="bfloat16"`` with
      a callable that is not a Keras model.
  """
  if not callable(model):
    raise TypeError(f"`model` must be a Keras model or a callable mapping "
                    f"images to logits; got {type(model).__name__}.")
  validation.check_choice("compute_dtype", compute_dtype, validation.COMPUTE_DTYPES)
  is_keras = isinstance(model, keras.Model)
  target = model
  if compute_dtype == "bfloat16":
    if not is_keras:
      raise TypeError("`compute_dtype='bfloat16'` needs a Keras model (it is "
                      "cloned under the mixed_bfloat16 policy); got "
                      f"{type(model).__name__}. Use compute_dtype='float32'.")
    target = cached(model, ("bfloat16_clone",), lambda: _bfloat16_clone(model))
    target.set_weights(model.get_weights())
  try:
    ref = weakref.ref(target)
  except TypeError:
    ref = lambda: target  # pylint: disable=unnecessary-lambda-assignment

  def logits(x: tf.Tensor) -> tf.Tensor:
    m = ref()
    out = m(x, training=False) if is_keras else m(x)
    return tf.cast(out, tf.float32)

  return logits


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Validated attack inputs as numpy, plus how to give results back."""
  x: np.ndarray          # float32 (N, H, W, C)
  y: np.ndarray          # int64 (N,)
  num_classes: int
  input_dtype: Any
  as_numpy: bool

  def restore(self, x_adv: np.ndarray) -> Any:
    """Returns ``x_adv`` with the caller's dtype, as numpy or a tensor."""
    out = x_adv.astype(self.input_dtype, copy=False)
    return out if self.as_numpy else tf.convert_to_tensor(out)


def prepare(x: Any, y: Any, clip_min: float, clip_max: float,
            logits_fn: Callable[[tf.Tensor], tf.Tensor],
            y_name: str = "y") -> Inputs:
  """Validates ``x``/``y`` and finds the number of classes from one image."""
  as_numpy = not isinstance(x, (tf.Tensor, tf.Variable))
  arr = validation.check_images(x, clip_min, clip_max)
  num_classes = int(logits_fn(tf.constant(arr[:1], tf.float32)).shape[-1])
  labels = validation.check_labels(y, arr.shape[0], num_classes, name=y_name)
  return Inputs(arr.astype(np.float32, copy=False), labels, num_classes,
                arr.dtype, as_numpy)


def in_batches(fn: Callable[..., tf.Tensor], batch_size: int,
               *arrays: np.ndarray) -> np.ndarray:
  """Applies compiled ``fn`` to aligned slices of ``arrays``; concatenates."""
  n = arrays[0].shape[0]
  outs = []
  for start in range(0, n, batch_size):
    args = [tf.constant(a[start:start + batch_size]) for a in arrays]
    outs.append(fn(*args).numpy())
  return np.concatenate(outs, axis=0)
