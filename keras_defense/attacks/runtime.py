"""How attacks run a model: logits function, bfloat16 clone, per-model cache, batches.

Compiled attack steps are built once per (model, options) and kept in a small
cache keyed on ``id(model)`` and guarded by a weak reference, so a model that
is garbage-collected drops its compiled steps, and attacking the same model
twice does not retrace. The cached steps reach the model only through the weak
reference, so the cache never keeps a model alive.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any, Callable, Hashable, Iterator, Sequence

from absl import logging
import numpy as np

from keras_defense.attacks import validation
from keras_defense.util import numpy_model
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf

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

  A model that runs on NumPy outside TensorFlow (``util.numpy_model``, e.g.
  a ``.tflite`` interpreter) is called through ``tf.numpy_function``:
  forward only, a gradient through it raises ``NoGradientError``.

  Raises:
    TypeError: ``model`` is not callable, or ``compute_dtype="bfloat16"`` with
      a callable that is not a Keras model.
  """
  if not callable(model):
    raise TypeError(f"`model` must be a Keras model or a callable mapping "
                    f"images to logits; got {type(model).__name__}.")
  validation.check_choice("compute_dtype", compute_dtype, validation.COMPUTE_DTYPES)
  is_keras = isinstance(model, keras.Model)
  on_numpy = numpy_model.is_numpy_model(model)  # e.g. a LiteRT interpreter: no gradients
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
    if on_numpy:
      return numpy_model.call(m, x)
    out = m(x, training=False) if is_keras else m(x)
    return tf.cast(out, tf.float32)

  return logits


def ce_input_gradient(logits_fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor,
                      labels: tf.Tensor | None = None) -> tf.Tensor:
  """Input gradient of the batch's summed softmax cross-entropy.

  The forward + backward pass every gradient attack step makes at least: what
  the dtype timing, the memory estimate and the benchmarks' ceiling measure.

  Args:
    logits_fn: images -> logits (N, K).
    x: float32 (N, H, W, C) images.
    labels: int (N,) class ids; None: each image's predicted class.

  Returns:
    The gradient, float32 (N, H, W, C).
  """
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = logits_fn(x)
    if labels is None:
      labels = tf.argmax(logits, -1)
    loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))
  return tape.gradient(loss, x)


# "auto" picks bfloat16 only if its input-gradient step took under this
# fraction of float32's: a near tie is not worth bfloat16's coarser logits.
_BF16_WINS_BELOW = 0.9


def _gradient_step_seconds(model: Any, image_shape: tuple[int, ...],
                           batch: int, repeats: int = 3) -> dict:
  """Best-of-``repeats`` seconds of one compiled CE input-gradient step per dtype."""
  x = tf.random.stateless_uniform([batch, *image_shape], [0, 0])
  seconds = {}
  for dtype in validation.COMPUTE_DTYPES:
    logits_fn = logits_function(model, dtype)
    grad = tf.function(lambda xb, fn=logits_fn: ce_input_gradient(fn, xb))
    grad(x).numpy()   # trace and warm up outside the timing
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      grad(x).numpy()
      best = min(best, time.perf_counter() - start)
    seconds[dtype] = best
  return seconds


def resolve_compute_dtype(model: Any, compute_dtype: str,
                          image_shape: tuple[int, ...],
                          batch_size: int = 512) -> str:
  """Turns ``"auto"`` into the faster of float32/bfloat16 for this model here.

  The first call for a Keras model times one compiled input-gradient step
  (``min(batch_size, 512)`` images, best of 3) in both dtypes and caches the
  timings with the model's compiled steps (once per process, model, image
  shape and timing batch); bfloat16 is chosen if
  it took under ``_BF16_WINS_BELOW`` of float32's time. On a CPU without
  native bfloat16 it is several times slower (issue 13: BIM 6.8x), on one
  with AVX-512-BF16/AMX faster. Non-Keras callables resolve to float32 (there
  is no bfloat16 clone of them). A forced ``"bfloat16"`` is kept, with an
  absl warning if it measured slower than float32.

  Args:
    model: Keras model or callable, images -> logits.
    compute_dtype: "auto", "float32" or "bfloat16".
    image_shape: (H, W, C) of the images to be attacked.
    batch_size: the attack's batch size: the speed ratio of the two dtypes
      depends on it (M0 on an AVX-512-BF16 CPU: bfloat16 slower at 128
      images, 1.7-3x faster at 1,000).

  Returns:
    "float32" or "bfloat16".

  Raises:
    ValueError: an unknown ``compute_dtype``.
  """
  validation.check_choice("compute_dtype", compute_dtype,
                          validation.COMPUTE_DTYPES_AUTO)
  if compute_dtype == "float32" or not isinstance(model, keras.Model):
    # A forced bfloat16 on a non-Keras callable is left for logits_function
    # to reject with its TypeError.
    return "float32" if compute_dtype == "auto" else compute_dtype
  shape = tuple(int(d) for d in image_shape)
  batch = max(1, min(int(batch_size), 512))
  seconds = cached(model, ("dtype_timings", shape, batch),
                   lambda: _gradient_step_seconds(model, shape, batch))
  bf16_faster = seconds["bfloat16"] < _BF16_WINS_BELOW * seconds["float32"]
  if compute_dtype == "auto":
    return "bfloat16" if bf16_faster else "float32"
  if seconds["bfloat16"] > seconds["float32"]:
    logging.warning(
        "compute_dtype='bfloat16' is slower than float32 for this model on "
        "this machine (input-gradient step %.2f ms vs %.2f ms): this CPU has "
        "no native bfloat16; compute_dtype='auto' would pick float32.",
        1e3 * seconds["bfloat16"], 1e3 * seconds["float32"])
  return "bfloat16"


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


def target_groups(targets: Sequence[int], batch_size: int,
                  n_live: Callable[[], int]) -> Iterator[tuple[list[int], int]]:
  """Consecutive groups of ``targets`` (APGD-T's, FAB-T's) to run as rows of one batch.

  With fewer images left than ``batch_size`` (``n_live()``, asked as each group
  starts), the next targets share one batch of up to ``batch_size`` rows: the
  same runs at a larger batch's throughput. Yields ``(group, images_per_call)``.
  """
  done = 0
  while done < len(targets):
    group = list(targets[done:done + max(1, batch_size // max(n_live(), 1))])
    done += len(group)
    yield group, max(1, batch_size // len(group))


def target_rows(images: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``(rows, image_ids)``: ``images`` once per target of a group, target-major,
  and each row's position in ``images`` (rows of one image stop together)."""
  return np.tile(images, group_size), np.tile(np.arange(images.size), group_size)
