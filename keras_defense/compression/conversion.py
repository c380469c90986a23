"""Conversion of a float model to a TFLite flatbuffer: post-training quantization.

Three PTQ methods over ``tf.lite.TFLiteConverter``
(https://www.tensorflow.org/lite/performance/post_training_quantization):

* ``ptq_dynamic``: int8 weights, float activations (no data needed);
* ``ptq_float16``: float16 weights;
* ``ptq_int8``: full-integer int8 weights and activations, the activation
  ranges calibrated on a representative dataset (images of the *training*
  split, never the test images a report measures on); input and output stay
  float32 unless ``int8_io``, which makes them int8 (the model's caller then
  quantizes and dequantizes with the tensors' scale and zero point, as
  ``models.tflite.TFLiteModel`` does).

``none`` converts without quantization (float32), the baseline the others are
measured against. A QAT model (``qat``) converts with ``ptq_int8``'s settings:
its fake-quant ranges are already learned, the representative data then only
covers the input.

One signature only: our SavedModels carry two serving signatures
(``serving_default`` float, ``serving_uint8``), and converting both stores the
weights twice (issue 27: 1.59 MB instead of 335 KB for M1-AT). A SavedModel is
converted with ``signature_keys=["serving_default"]``; a Keras model through
the same ``serving_default`` function ``models.export`` serves, so every
flatbuffer has the same interface: ``images`` -> ``logits``,
``probabilities``, ``classes``.

Example:
  >>> content = convert("saved_models/mnist_m1_at_pgd/1", "ptq_int8",
  ...                   representative=x_train[:500])
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Iterator

import numpy as np

from keras_defense.compression import qat
from keras_defense.models import export
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

PTQ_METHODS = ("ptq_dynamic", "ptq_int8", "ptq_float16")
# What `convert` accepts: the PTQ methods, no quantization, and a QAT model's int8.
CONVERSIONS = ("none", *PTQ_METHODS, "qat_int8")
NEEDS_REPRESENTATIVE = ("ptq_int8", "qat_int8")


def representative_dataset(images: np.ndarray) -> callable:
  """The converter's representative dataset: one image per step.

  Args:
    images: float32 (N, H, W, C) in [0, 1], N >= 1.

  Returns:
    A generator function yielding ``[image[None]]``.
  """
  images = np.asarray(images, np.float32)

  def gen() -> Iterator[list[np.ndarray]]:
    for i in range(len(images)):
      yield [images[i:i + 1]]
  return gen


def representative_digest(images: np.ndarray | None) -> str | None:
  """SHA-256 of the representative images' float32 bytes and shape (None without data)."""
  if images is None:
    return None
  images = np.ascontiguousarray(np.asarray(images, np.float32))
  h = hashlib.sha256(repr(images.shape).encode())
  h.update(images.tobytes())
  return h.hexdigest()


def _converter(model: str | os.PathLike | keras.Model):
  if isinstance(model, keras.Model):
    fn = export.serving_signatures(model)[export.SERVING_SIGNATURE]
    return tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
  p = pathlib.Path(model)
  if not (p / "saved_model.pb").is_file():
    raise UserError(f"`model` {str(p)!r} is not a SavedModel directory (no saved_model.pb); "
                    f"expected e.g. saved_models/mnist_m1/1 or a tf_keras model.")
  return tf.lite.TFLiteConverter.from_saved_model(
      str(p), signature_keys=[export.SERVING_SIGNATURE])


def convert(model: str | os.PathLike | keras.Model, method: str, *,
            representative: np.ndarray | None = None, int8_io: bool = False) -> bytes:
  """Converts ``model`` to a TFLite flatbuffer with ``method``.

  Args:
    model: a SavedModel directory (its ``serving_default`` signature is
      converted) or a tf_keras model mapping float32 images to logits (a QAT
      model from ``qat.quantize_for_training`` included, whose weight ranges
      ``qat.set_weight_ranges`` sets first; strip pruning and clustering
      wrappers first).
    method: one of ``CONVERSIONS``: "none", "ptq_dynamic", "ptq_int8",
      "ptq_float16", "qat_int8".
    representative: float32 (N, H, W, C) in [0, 1] training images; required by
      "ptq_int8" and "qat_int8", ignored otherwise.
    int8_io: int8 input and output tensors (only with "ptq_int8"/"qat_int8").

  Returns:
    The flatbuffer's bytes; builtin operators only.

  Raises:
    UserError: unknown ``method``, missing or empty ``representative``,
      ``int8_io`` with a method that keeps float tensors, not a SavedModel.
  """
  if method not in CONVERSIONS:
    raise UserError(f"`method` must be one of {', '.join(CONVERSIONS)}; got {method!r}.")
  needs_data = method in NEEDS_REPRESENTATIVE
  if needs_data and (representative is None or len(representative) == 0):
    raise UserError(f"`method` {method!r} needs representative training images "
                    f"(`representative`, e.g. --representative_size=500); got none.")
  if int8_io and not needs_data:
    raise UserError(f"`int8_io` needs a full-integer method (ptq_int8 or qat_int8); "
                    f"got method {method!r}, whose tensors stay float.")
  if method == "qat_int8" and isinstance(model, keras.Model):
    # The weight ranges from the final weights, and none [0, 0] (a pruned filter's int32
    # bias would overflow); a no-op for a model without fake quantization.
    qat.set_weight_ranges(model)
  converter = _converter(model)
  if method != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if method == "ptq_float16":
    converter.target_spec.supported_types = [tf.float16]
  if needs_data:
    converter.representative_dataset = representative_dataset(representative)
    # Full integer: a kernel without an int8 version fails the conversion
    # instead of silently staying float.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
      converter.inference_input_type = tf.int8
      converter.inference_output_type = tf.int8
  else:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()
