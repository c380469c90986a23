"""A classifier a user brings, as a callable images -> logits.

``kd-evaluate`` attacks models it did not make: a SavedModel exported by any
program (one signature of it, one output of that signature) or a Keras
``.keras``/``.h5`` file. ``load_classifier`` wraps either as a ``Classifier``,
a plain callable float32 NHWC images in [0, 1] -> float32 logits that the
attacks differentiate like any Keras model.

* SavedModel: scanned first (``scan.check_saved_model``: a graph that reads
  or writes files, prints or calls out is refused unless its ops are allowed),
  then loaded with ``tf.saved_model.load`` (a graph: no Python from the
  file runs, no keras-defense or Keras import is needed in the program that
  saved it). The signature is chosen by name, its output by key; a signature
  with one output needs no key. If ``serving_default`` is asked for (the
  default) and the SavedModel has none, its ``serve`` signature (what Keras
  3's ``model.export()`` writes) or else its only signature is used, and
  ``describe()`` names it.
* ``.tflite``: run on LiteRT (``tflite.TFLiteModel``, int8 I/O handled) and
  called through ``tf.numpy_function`` (``util.numpy_model``): kind
  "tflite", no gradients, so kd-evaluate attacks it black-box.
* ``.keras``/``.h5``: ``export.load_model`` (built-in layers only,
  ``compile=False``, ``safe_mode``); a Keras 3 file is loaded by Keras 3 and
  called as an opaque function (``kind`` "keras3").

Pixels: the attacks feed [0, 1] images; ``use_pixels`` sets the model's own
convention (0-255, per-channel mean/std, ``pixels.PixelConvention``), applied
inside ``scores`` so that gradients go through it.

The input spec is checked against the dataset before any work
(``check_input``), and ``detect_output`` tells logits from probabilities on a
probe batch of real images: a model whose rows are non-negative and sum to 1
is attacked through ``log(p)`` (the logits up to a per-row constant, which
changes neither the argmax nor the cross-entropy, margin or DLR losses'
ranking of classes).

Example:
  >>> clf = load_classifier("saved_models/mnist_m0/1", output_key="logits")
  >>> clf.check_input((28, 28, 1), dataset="mnist")
  >>> clf.use_output(detect_output(clf, x[:256], num_classes=10))
  >>> logits = clf(x[:8])
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from keras_defense.models import export
from keras_defense.models import keras_files
from keras_defense.models import pixels as pixels_lib
from keras_defense.models import tflite
from keras_defense.util import numpy_model
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

LOGITS = "logits"
PROBABILITIES = "probabilities (attacked as log)"
OUTPUT_KINDS = (LOGITS, PROBABILITIES)
# Rows summing to 1 within this (float32 softmax of 10-1000 classes sums to
# 1 within ~1e-6) and no entry below -PROBABILITY_TOLERANCE count as probabilities.
PROBABILITY_TOLERANCE = 1e-3
_TINY = float(np.finfo(np.float32).tiny)


def _spec_text(dtype: Any, shape: Sequence[Any]) -> str:
  dims = ", ".join("?" if d is None else str(int(d)) for d in shape)
  return f"{tf.as_dtype(dtype).name} [{dims}]"


class Classifier:
  """A loaded model as a callable: float32 images (N, H, W, C) -> float32 logits (N, K).

  Attributes:
    path: the model path as given.
    kind: "saved_model", "keras" (tf_keras), "keras3" or "tflite" (a LiteRT
      interpreter: no gradients).
    signature: the SavedModel signature used (None for Keras files).
    output_key: the output used (None: the only one).
    input_name: the name of the image input.
    input_dtype: the dtype the model takes (a ``tf.DType``).
    input_shape: the shape it takes, None for unknown dimensions.
    output: ``LOGITS`` or ``PROBABILITIES`` (set by ``use_output``).
    pixels: the model's pixel convention (set by ``use_pixels``).
    keras_model: the tf_keras model when the output is logits of a tf_keras
      file and the pixels are [0, 1] (attacks can then clone it for
      bfloat16), else None.
  """

  def __init__(self, scores: Callable[[tf.Tensor], tf.Tensor], *, path: str, kind: str,
               signature: str | None, output_key: str | None, input_name: str,
               input_dtype: Any, input_shape: Sequence[Any],
               keras_model: keras.Model | None = None, holder: Any = None):
    self._scores = scores
    self._holder = holder  # keeps what was loaded (and its variables) alive
    self._keras_model = keras_model
    self.path = path
    self.kind = kind
    self.signature = signature
    self.output_key = output_key
    self.input_name = input_name
    self.input_dtype = tf.as_dtype(input_dtype)
    self.input_shape = tuple(None if d is None else int(d) for d in input_shape)
    self.output = LOGITS
    self.pixels = pixels_lib.PixelConvention()

  @property
  def loaded(self) -> Any:
    """What was loaded (the Keras model or the SavedModel object): it holds the variables."""
    return self._holder

  @property
  def keras_model(self) -> keras.Model | None:
    if self.output != LOGITS or not self.pixels.is_identity:
      return None
    return self._keras_model

  def describe(self) -> str:
    """E.g. "model 'm/1' (SavedModel, signature 'serving_default', output 'logits')"."""
    text = f"SavedModel, signature {self.signature!r}" if self.kind == "saved_model" else \
        {"keras3": "Keras 3 file", "tflite": "TFLite on LiteRT"}.get(self.kind, "Keras file")
    text += f", output {self.output_key!r}" if self.output_key else ""
    return f"model {self.path!r} ({text})"

  def scores(self, x: Any) -> tf.Tensor:
    """The model's own output (logits or probabilities) as float32 (N, K).

    Args:
      x: float32 (N, H, W, C) images in [0, 1]; converted to the model's
        pixel convention here (differentiably).
    """
    x = self.pixels.to_model(tf.convert_to_tensor(x, tf.float32))
    return tf.cast(self._scores(x), tf.float32)

  def __call__(self, x: Any) -> tf.Tensor:
    """Logits, float32 (N, K): the output itself, or log of probabilities."""
    out = self.scores(x)
    if self.output == PROBABILITIES:
      return tf.math.log(tf.maximum(out, _TINY))
    return out

  def use_output(self, output: str) -> "Classifier":
    """Sets how the output is read: ``LOGITS`` or ``PROBABILITIES``."""
    if output not in OUTPUT_KINDS:
      raise ValueError(f"`output` must be one of {OUTPUT_KINDS}; got {output!r}.")
    self.output = output
    return self

  def use_pixels(self, convention: pixels_lib.PixelConvention) -> "Classifier":
    """Sets the model's pixel convention (validated against its channel count)."""
    channels = self.input_shape[-1] if self.input_shape else None
    self.pixels = convention.validate(channels=channels)
    return self

  def check_input(self, image_shape: Sequence[int], *, dataset: str) -> None:
    """Raises UserError unless the model takes float32 (batch, H, W, C) images.

    Args:
      image_shape: the dataset's (H, W, C).
      dataset: its name, for the message.

    Raises:
      UserError: wrong dtype, rank or H, W, C (unknown dimensions are accepted).
    """
    want = (None, *(int(d) for d in image_shape))
    shape_ok = len(self.input_shape) == 4 and all(
        got is None or got == w for got, w in zip(self.input_shape[1:], want[1:]))
    if self.input_dtype == tf.float32 and shape_ok:
      return
    raise UserError(
        f"{self.describe()} takes input {self.input_name!r} as "
        f"{_spec_text(self.input_dtype, self.input_shape)}; kd-evaluate feeds {dataset} "
        f"test images as {_spec_text(tf.float32, want)} in [0, 1]. Fix: evaluate a "
        f"signature or model that takes float32 images of the dataset's shape "
        f"(--signature), pick the matching --dataset, or resize the images to the "
        f"model's shape with --image_size=HxWxC.")


def detect_output(clf: Classifier, x_probe: np.ndarray, *, num_classes: int) -> str:
  """Tells logits from probabilities on a batch of real images.

  Args:
    clf: the classifier (its raw output is read).
    x_probe: float32 (N, H, W, C) in [0, 1], real test images (N >= 1).
    num_classes: the dataset's class count; the output must have that many.

  Returns:
    ``PROBABILITIES`` if every row is non-negative and sums to 1 within
    ``PROBABILITY_TOLERANCE``, else ``LOGITS``.

  Raises:
    UserError: the output is not float (N, num_classes) or not finite.
  """
  out = clf.scores(x_probe).numpy()
  if out.ndim != 2 or out.shape != (x_probe.shape[0], num_classes):
    width = ""
    if out.ndim == 2 and out.shape[0] == x_probe.shape[0]:
      width = (f": the model outputs {out.shape[1]} class scores, the dataset has "
               f"{num_classes} classes; they must be equal (evaluate the model on its own "
               f"label set, or pass the output of one score per class as --output_key)")
    raise UserError(
        f"{clf.describe()} returned shape {tuple(out.shape)} for "
        f"{x_probe.shape[0]} images; kd-evaluate needs one score per class, "
        f"({x_probe.shape[0]}, {num_classes}){width}.")
  if not np.all(np.isfinite(out)):
    raise UserError(f"{clf.describe()} returned NaN or inf on "
                    f"clean test images.")
  sums = out.sum(axis=1)
  if out.min() >= -PROBABILITY_TOLERANCE and np.all(np.abs(sums - 1) <= PROBABILITY_TOLERANCE):
    return PROBABILITIES
  return LOGITS


def _pick_output(path: str, where: str, keys: Sequence[str], output_key: str | None) -> str:
  keys = list(keys)
  if output_key is not None:
    if output_key not in keys:
      raise UserError(f"model {path!r}: {where} has no output {output_key!r}; its outputs "
                      f"are {', '.join(repr(k) for k in keys)}. Fix: pass one of them as "
                      f"--output_key.")
    return output_key
  if len(keys) == 1:
    return keys[0]
  raise UserError(f"model {path!r}: {where} has {len(keys)} outputs "
                  f"({', '.join(repr(k) for k in keys)}); pass the one holding logits or "
                  f"probabilities as --output_key.")


def _load_saved_model(path: str, signature: str, output_key: str | None,
                      allow_ops: Sequence[str]) -> Classifier:
  # Before tf.saved_model.load: loading alone runs the model's initializers.
  export.check_saved_model(path, allow_ops=allow_ops)
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # corrupt protobuf, missing variables ...
    raise export.ModelLoadError(f"could not load the SavedModel at {path!r} (corrupt?): "
                                f"{type(e).__name__}: {e}") from e
  signatures = dict(loaded.signatures)
  if signature == export.SERVING_SIGNATURE and signature not in signatures and (
      "serve" in signatures or len(signatures) == 1):
    # Keras 3's model.export() names its endpoint "serve".
    signature = "serve" if "serve" in signatures else next(iter(signatures))
  if signature not in signatures:
    have = ", ".join(repr(s) for s in sorted(signatures)) or "none"
    raise UserError(f"model {path!r} has no signature {signature!r}; its signatures: "
                    f"{have}. Fix: pass one as --signature.")
  fn = signatures[signature]
  args, kwargs = fn.structured_input_signature
  specs = dict(kwargs)
  if args or len(specs) != 1:
    names = ", ".join(repr(k) for k in specs) or f"{len(args)} positional"
    raise UserError(f"model {path!r}: signature {signature!r} takes {len(args) + len(specs)} "
                    f"inputs ({names}); kd-evaluate feeds one image tensor.")
  (input_name, spec), = specs.items()
  outputs = fn.structured_outputs
  key = _pick_output(path, f"signature {signature!r}", sorted(outputs), output_key)
  if not outputs[key].dtype.is_floating:
    raise UserError(f"model {path!r}: output {key!r} of signature {signature!r} is "
                    f"{outputs[key].dtype.name}; kd-evaluate needs float class scores "
                    f"(logits or probabilities). Fix: pass another --output_key.")

  def scores(x):
    return fn(**{input_name: x})[key]

  return Classifier(scores, path=path, kind="saved_model", signature=signature,
                    output_key=output_key if len(outputs) > 1 or output_key else None,
                    input_name=input_name, input_dtype=spec.dtype,
                    input_shape=spec.shape.as_list() if spec.shape.rank is not None else (),
                    holder=loaded)


def _load_keras3_model(path: str, model: Any, output_key: str | None) -> Classifier:
  """A Keras 3 model as an opaque callable (never mixed with tf_keras layers)."""
  try:
    io = keras_files.keras3_io(model)
  except UserError as e:
    raise UserError(f"model {path!r}: {e}") from None
  names = list(io.output_names)
  key = _pick_output(path, "the Keras 3 model", names, output_key)
  index = names.index(key)

  def scores(x):
    return keras_files.select_output(model(x, training=False), index, key)

  return Classifier(scores, path=path, kind="keras3", signature=None,
                    output_key=key if len(names) > 1 else None, input_name=io.input_name,
                    input_dtype=io.input_dtype, input_shape=io.input_shape, holder=model)


def _load_keras_file(path: str, output_key: str | None) -> Classifier:
  model = export.load_model(path)
  if keras_files.is_keras3_model(model):
    return _load_keras3_model(path, model, output_key)
  if len(model.inputs) != 1:
    raise UserError(f"model {path!r} takes {len(model.inputs)} inputs; kd-evaluate feeds "
                    f"one image tensor.")
  names = list(model.output_names)
  key = _pick_output(path, "the Keras model", names, output_key)
  index = names.index(key)
  inp = model.inputs[0]
  multi = len(names) > 1

  def scores(x):
    out = model(x, training=False)
    return out[index] if multi else out

  return Classifier(scores, path=path, kind="keras", signature=None,
                    output_key=key if multi else None, input_name=inp.name,
                    input_dtype=inp.dtype, input_shape=inp.shape.as_list(),
                    keras_model=None if multi else model, holder=model)


def _load_tflite(path: str) -> Classifier:
  """A .tflite flatbuffer on LiteRT: forward only (``util.numpy_model``)."""
  model = tflite.TFLiteModel(path)

  def scores(x):
    return numpy_model.call(model, x)

  return Classifier(scores, path=path, kind="tflite", signature=None, output_key=None,
                    input_name="images", input_dtype=tf.float32,
                    input_shape=(None, *model.input_shape), holder=model)


def load_classifier(path: str | os.PathLike, *, signature: str = "serving_default",
                    output_key: str | None = None,
                    allow_ops: Sequence[str] = ()) -> Classifier:
  """Loads a SavedModel directory, a ``.keras``/``.h5`` or ``.tflite`` file as a Classifier.

  Args:
    path: a SavedModel directory (with ``saved_model.pb``) or a Keras file.
    signature: the SavedModel signature to call (ignored for Keras files).
    output_key: the output holding logits or probabilities; needed when the
      signature (or Keras model) has more than one.
    allow_ops: ops a SavedModel may hold although they touch the outside world
      (``scan.DENYLIST``), each named explicitly; ignored for Keras files.

  Returns:
    A ``Classifier`` reading the output as logits (see ``detect_output``).

  Raises:
    UserError: missing or corrupt model, unknown signature or output key,
      several outputs and no key, several inputs, or a non-float output
      (``export.ModelLoadError`` for the first two); ``scan.UnsafeModelError``
      for a SavedModel holding ops not allowed, before it is loaded.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise export.ModelLoadError(f"model path {str(p)!r} does not exist; expected a "
                                f"SavedModel directory or a .keras/.h5 file.")
  if p.is_dir():
    if not (p / "saved_model.pb").is_file():
      raise export.ModelLoadError(f"model path {str(p)!r} is not a SavedModel (no "
                                  f"saved_model.pb in it).")
    return _load_saved_model(str(path), signature, output_key, allow_ops)
  if p.suffix == ".tflite":
    return _load_tflite(str(path))
  return _load_keras_file(str(path), output_key)


def fingerprint(path: str | os.PathLike) -> str:
  """SHA-256 over a model file, or over every file of a SavedModel (names and bytes)."""
  p = pathlib.Path(path)
  h = hashlib.sha256()
  files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
  for q in files:
    if p.is_dir():
      h.update(str(q.relative_to(p)).encode() + b"\0")
    with open(q, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()
