"""kd-evaluate on the replicas of a ``tf.distribute`` strategy: each batch split across them.

``kd-evaluate --strategy=mirrored`` (all local GPUs; without GPUs
``--num_cpu_devices`` logical CPUs) runs every attack of the AutoAttack
protocol unchanged and splits each of its model calls across the strategy's
replica devices: ``Replicated(model, strategy)`` is a callable, images ->
logits, that cuts the batch into one contiguous piece per device
(``strategy.extended.worker_devices``, sizes differing by at most one),
calls the model on each piece on its device (``tf.device``) and concatenates
the logits in order. Inside the attacks' compiled steps TensorFlow's executor
runs the pieces concurrently, and each gradient op runs on the device of its
forward op, so the attacks' input gradients are the one-device gradients (up
to floating-point summation order) and the per-image outcomes are those of a
one-device run with the same global ``--batch_size``.

Why not ``strategy.run``: MirroredStrategy runs each replica's function in its
own thread, and ``tf.GradientTape`` records only its own thread, so the
attacks' tapes (APGD, FAB, Square's margins) would not see the replicas'
forward passes. Splitting the call keeps the one model function every attack
differentiates.

The model's variables stay where they were loaded; a GPU replica reads a
copy per call. A ``.tflite`` model runs on the LiteRT interpreter, not on
TensorFlow devices, and is refused, as is the bfloat16 clone (it needs the
Keras model itself).

Example:
  >>> strategy = distribution.make_strategy("mirrored", num_cpu_devices=2)
  >>> logits = Replicated(model, strategy)(x)   # == model(x), half on each device
"""

from __future__ import annotations

from typing import Any

from keras_defense.attacks import runtime
from keras_defense.util import numpy_model
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError


class Replicated:
  """``model`` called on each batch split across the replica devices of ``strategy``.

  Attributes:
    model: the wrapped Keras model or callable (images -> logits).
    devices: the replica device names, in order.
  """

  def __init__(self, model: Any, strategy: tf.distribute.Strategy):
    if numpy_model.is_numpy_model(model):
      raise UserError("--strategy splits a model's batches across TensorFlow devices; a "
                      ".tflite model runs on the LiteRT interpreter. Fix: evaluate it with "
                      "--strategy=default (shard the images across processes with "
                      "--shard_index/--num_shards instead).")
    self.model = model
    self.devices = tuple(strategy.extended.worker_devices)
    self._logits = runtime.logits_function(model, "float32")

  @property
  def num_replicas(self) -> int:
    return len(self.devices)

  def __call__(self, x: Any) -> tf.Tensor:
    x = tf.convert_to_tensor(x, tf.float32)
    r = self.num_replicas
    if r == 1:
      return self._on(0, x)
    n = tf.shape(x)[0]
    # A batch smaller than the replica count runs on the first device: a
    # zero-image piece would reach the model (oneDNN's convolution fails on it).
    return tf.cond(n >= r, lambda: self._split(x, n), lambda: self._on(0, x))

  def _on(self, i: int, x: tf.Tensor) -> tf.Tensor:
    with tf.device(self.devices[i]):
      return self._logits(x)

  def _split(self, x: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    r = self.num_replicas
    sizes = n // r + tf.cast(tf.range(r) < n % r, tf.int32)
    pieces = tf.split(x, sizes, axis=0, num=r)
    return tf.concat([self._on(i, piece) for i, piece in enumerate(pieces)], axis=0)
