"""A TFLite (LiteRT) flatbuffer as a model: float32 images in [0, 1] -> float32 logits.

What ships to a phone is a ``.tflite`` flatbuffer run by LiteRT, TensorFlow's
maintained TFLite runtime (``ai-edge-litert``). ``TFLiteModel`` runs one on
LiteRT's ``Interpreter`` so it can be measured like any other model:

* input float32 NHWC in [0, 1]; an int8/uint8 input tensor is fed
  ``round(x / scale) + zero_point`` (saturated), its own quantization;
* output float32 logits; an int8/uint8 output is dequantized,
  ``(q - zero_point) * scale``;
* batched: the input is resized to each batch (``resize_tensor_input``) when
  its batch dimension is dynamic, else fed one image at a time;
* ``num_threads`` threads (default 1, the deployment measurement's setting).

A model is a program (issue 29): a flatbuffer may name custom operators,
whose kernels the loading program must supply, or Flex (select-TF) operators,
which run TensorFlow kernels inside the interpreter. Both are refused before
an interpreter is built, naming them: ``UnsupportedOpsError``. The op codes are
read from the flatbuffer with LiteRT's own schema (no interpreter, nothing
executed).

It has **no gradients**: quantized kernels round, so white-box attacks must run
on a float or QAT twin (transfer, BPDA) or query the interpreter (Square).

This module imports neither TensorFlow nor Keras; only ``ai_edge_litert`` and
NumPy (the interpreter itself is imported when a model is opened).

Example:
  >>> model = TFLiteModel("m.tflite")
  >>> logits = model(x_test[:100])          # float32 (100, 10)
  >>> model.ops                               # ('CONV_2D', 'FULLY_CONNECTED', ...)
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from keras_defense.util.errors import UserError

SIGNATURE = "serving_default"
LOGITS_KEY = "logits"
_FLEX_PREFIX = "Flex"


class UnsupportedOpsError(UserError):
  """The flatbuffer needs custom or Flex (select-TF) operators."""


def operator_names(content: bytes) -> tuple[str, ...]:
  """The operator codes a TFLite flatbuffer uses, in its order; custom ones by custom code.

  Args:
    content: the flatbuffer's bytes.

  Returns:
    Builtin operators by their schema name (``CONV_2D``), custom ones (Flex
    included) by their custom code (``FlexFFT``), each once.

  Raises:
    UserError: ``content`` is not a TFLite flatbuffer.
  """
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  if len(content) < 8 or content[4:8] != b"TFL3":
    raise UserError(f"not a TFLite flatbuffer (file identifier {content[4:8]!r}, "
                    f"expected b'TFL3').")
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  model = schema.Model.GetRootAs(content, 0)
  out = []
  for i in range(model.OperatorCodesLength()):
    code = model.OperatorCodes(i)
    # Builtin codes >= 127 live in BuiltinCode; older files in DeprecatedBuiltinCode.
    builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
    if builtin == schema.BuiltinOperator.CUSTOM:
      custom = code.CustomCode()
      out.append(custom.decode() if custom else "CUSTOM")
    else:
      out.append(names.get(builtin, f"BUILTIN_{builtin}"))
  return tuple(dict.fromkeys(out))


def check_builtin_ops(content: bytes, *, where: str = "model") -> tuple[str, ...]:
  """Raises UnsupportedOpsError unless every operator is a LiteRT builtin; returns them.

  Raises:
    UnsupportedOpsError: names the Flex and the other custom operators found.
  """
  ops = operator_names(content)
  builtin_names = _builtin_names()
  flex = [o for o in ops if o.startswith(_FLEX_PREFIX) and o not in builtin_names]
  custom = [o for o in ops if o not in builtin_names and o not in flex]
  if flex or custom:
    parts = []
    if flex:
      parts.append(f"Flex (select-TF) ops {', '.join(flex)}, which run TensorFlow kernels "
                   f"inside the interpreter")
    if custom:
      parts.append(f"custom ops {', '.join(custom)}, whose kernels the loading program "
                   f"must supply")
    raise UnsupportedOpsError(
        f"{where} uses {' and '.join(parts)}; refusing it: a deployed model must run on "
        f"LiteRT's builtin operators alone. Fix: convert with "
        f"target_spec.supported_ops=[TFLITE_BUILTINS] (or TFLITE_BUILTINS_INT8).")
  return ops


def _builtin_names() -> set[str]:
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  return {k for k in vars(schema.BuiltinOperator) if not k.startswith("_") and k != "CUSTOM"}


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
  """Float -> integer with a tensor's (scale, zero point), rounded and saturated."""
  info = np.iinfo(dtype)
  q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
  return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
  """Integer -> float32 with a tensor's (scale, zero point)."""
  return ((q.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


class TFLiteModel:
  """A ``.tflite`` classifier as a callable: float32 (N, H, W, C) in [0, 1] -> float32 logits (N, K).

  ``runs_on_numpy`` tells the attacks (``util.numpy_model``) to call it
  through ``tf.numpy_function``: score-based attacks (Square) run on it,
  gradient attacks are refused. ``queries`` counts the images it has scored.

  Args:
    model: path of a ``.tflite`` file, or its bytes.
    num_threads: interpreter threads (>= 1); 1 is the deployment setting.
    output_key: the signature output holding logits (``logits``; a model with
      one output needs none).

  Raises:
    UserError: missing file, not a flatbuffer, bad ``num_threads``, no such output.
    UnsupportedOpsError: custom or Flex operators.
  """

  runs_on_numpy = True

  def __init__(self, model: str | os.PathLike | bytes, *, num_threads: int = 1,
               output_key: str = LOGITS_KEY):
    self.queries = 0
    if isinstance(model, (bytes, bytearray)):
      content, self.path = bytes(model), None
    else:
      p = pathlib.Path(model)
      if not p.is_file():
        raise UserError(f"TFLite model {str(p)!r} does not exist or is not a file; "
                        f"expected a .tflite flatbuffer such as the one kd-quantize writes.")
      content, self.path = p.read_bytes(), str(p)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
      raise UserError(f"`num_threads` must be an integer >= 1; got {num_threads!r}.")
    where = repr(self.path) if self.path else "the TFLite model"
    try:
      self.ops = check_builtin_ops(content, where=where)
    except UnsupportedOpsError:
      raise
    except UserError as e:
      raise UserError(f"{where} is {e}") from e
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    self.size_bytes = len(content)
    self._interpreter = Interpreter(model_content=content, num_threads=num_threads)
    self.num_threads = num_threads
    details_in = self._interpreter.get_input_details()
    if len(details_in) != 1:
      raise UserError(f"{where} has {len(details_in)} inputs; expected one image tensor.")
    self._input = details_in[0]
    self._output = self._pick_output(output_key, where)
    shape = [int(d) for d in self._input["shape_signature"]]
    self.input_shape = tuple(shape[1:])
    self._dynamic_batch = shape[0] == -1
    self._batch = None

  def _pick_output(self, output_key: str, where: str) -> dict:
    outputs = self._interpreter.get_output_details()
    signatures = self._interpreter.get_signature_list()
    if len(outputs) == 1:
      return outputs[0]
    for name, sig in signatures.items():
      if output_key in sig["outputs"]:
        index = self._interpreter.get_signature_runner(name).get_output_details()[output_key]
        return next(o for o in outputs if o["index"] == index["index"])
    keys = sorted({k for s in signatures.values() for k in s["outputs"]})
    raise UserError(f"{where} has no output {output_key!r}; its outputs are {keys}. "
                    f"Pass `output_key` naming the logits.")

  @property
  def input_dtype(self) -> np.dtype:
    return np.dtype(self._input["dtype"])

  @property
  def output_dtype(self) -> np.dtype:
    return np.dtype(self._output["dtype"])

  @property
  def num_classes(self) -> int:
    return int(self._output["shape_signature"][-1])

  def _resize(self, n: int) -> None:
    if self._batch != n:
      self._interpreter.resize_tensor_input(self._input["index"], [n, *self.input_shape])
      self._interpreter.allocate_tensors()
      self._batch = n

  def _feed(self, x: np.ndarray) -> np.ndarray:
    dtype = self.input_dtype
    if dtype.kind in "iu":
      scale, zero_point = self._input["quantization"]
      x = quantize(x, scale, zero_point, dtype)
    self._interpreter.set_tensor(self._input["index"], x)
    self._interpreter.invoke()
    y = self._interpreter.get_tensor(self._output["index"])
    if self.output_dtype.kind in "iu":
      scale, zero_point = self._output["quantization"]
      y = dequantize(y, scale, zero_point)
    return np.asarray(y, np.float32)

  def __call__(self, x: np.ndarray | Sequence, *, batch_size: int = 256) -> np.ndarray:
    """Logits of ``x``.

    Args:
      x: float32 (N, H, W, C) in [0, 1] (anything ``np.asarray`` takes, e.g. a
        tf.Tensor); H, W, C must match the model's input.
      batch_size: images per interpreter call (>= 1).

    Returns:
      float32 (N, K) logits (dequantized for an integer output).

    Raises:
      UserError: wrong shape, or ``batch_size`` < 1.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
      raise UserError(f"images must have shape (N, {', '.join(map(str, self.input_shape))}); "
                      f"got {tuple(x.shape)}.")
    if batch_size < 1:
      raise UserError(f"`batch_size` must be >= 1; got {batch_size!r}.")
    if not self._dynamic_batch:
      batch_size = 1  # a static batch dimension (1): one image per call
    out = []
    self.queries += len(x)
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      self._resize(len(chunk))
      out.append(self._feed(chunk))
    if not out:
      return np.zeros((0, self.num_classes), np.float32)
    return np.concatenate(out)

  def predict_classes(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """int64 (N,) argmax of the logits."""
    return np.argmax(self(x, batch_size=batch_size), axis=-1).astype(np.int64)


def load_tflite(path: str | os.PathLike, *, num_threads: int = 1) -> TFLiteModel:
  """``TFLiteModel(path, num_threads=num_threads)``; see the class."""
  return TFLiteModel(path, num_threads=num_threads)
