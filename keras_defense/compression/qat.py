"""Quantization-aware training (QAT) with tfmot, optionally on adversarial batches.

``quantize_for_training`` inserts tfmot's fake-quantization (int8 weights per
channel, int8 activations; Jacob et al., CVPR 2018,
https://www.tensorflow.org/model_optimization/guide/quantization/training) so
fine-tuning learns weights that survive rounding; ``conversion.convert(...,
"qat_int8")`` then writes the int8 flatbuffer. What the model already is
decides the scheme (tfmot's collaborative optimization,
https://www.tensorflow.org/model_optimization/guide/combine/collaborative_optimization):

* ``"none"``: ``quantize_model`` (Default8BitQuantizeScheme);
* ``"sparsity"`` (a pruned model): ``Default8BitPrunePreserveQuantizeScheme``,
  so fine-tuning keeps the zeros (PQAT);
* ``"clusters"`` (a clustered, stripped model): ``Default8BitClusterPreserveQuantizeScheme``
  (CQAT), with the zeros kept too when the model is also sparse.

``preserve_for(model)`` picks it from the weights. ``calibrate_ranges`` sets
the ranges from representative images before fine-tuning, as TFLite's
post-training calibration does (tfmot starts every range at [-6, 6] and moves
it by an EMA of decay 0.999 per training step: after the ~100 steps of a short
fine-tuning it is still ~[-5.5, 5.5], 29x coarser than the calibrated [0, 0.38]
of M1-AT's first convolution); ``set_weight_ranges`` sets the weights' ranges
(``conversion.convert`` calls it again), a pruned filter's included. ``fine_tune`` trains with
Keras ``fit``, or, with ``adversarial`` (a ``training.AdversarialSpec``: PGD,
FGSM-RS or TRADES, the attacks of adversarial training), on adversarial
examples crafted on the fake-quantized model itself (robust QAT: adversarial
fine-tuning under the rounding the device applies; the attack differentiates
through the fake-quant ops with their straight-through gradient).

Example:
  >>> q = quantize_for_training(m1, preserve=preserve_for(m1))
  >>> calibrate_ranges(q, x[:500])
  >>> fine_tune(q, train_ds, epochs=2, adversarial=fine_tuning_attack("trades"))
  >>> content = conversion.convert(q, "qat_int8", representative=x[:500])
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from keras_defense import training
from keras_defense.training import attack
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

PRESERVE = ("none", "sparsity", "clusters")
# A model counts as pruned when at least this fraction of its Conv2D/Dense
# kernel weights is exactly zero (a trained dense model has ~none; M1 has 90-95%).
PRUNED_SPARSITY = 0.5
_KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)


def _tfmot():
  import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top  (heavy)
  return tfmot


def kernel_sparsity(model: keras.Model) -> float:
  """Fraction of exactly-zero weights over the Conv2D and Dense kernels of ``model``."""
  kernels = [layer.kernel.numpy() for layer in model.layers if isinstance(layer, _KERNEL_LAYERS)]
  total = sum(k.size for k in kernels)
  return float(sum(int(np.sum(k == 0)) for k in kernels) / total) if total else 0.0


def preserve_for(model: keras.Model, *, clustered: bool = False) -> str:
  """"clusters" for a clustered model, "sparsity" for a pruned one, else "none"."""
  if clustered:
    return "clusters"
  return "sparsity" if kernel_sparsity(model) >= PRUNED_SPARSITY else "none"


def quantize_for_training(model: keras.Model, *, preserve: str = "none") -> keras.Model:
  """``model`` with tfmot fake quantization, ready to fine-tune.

  Args:
    model: a plain tf_keras functional/Sequential model (no pruning or
      clustering wrappers: strip them first).
    preserve: one of ``PRESERVE``: "none", "sparsity" (prune-preserving QAT),
      "clusters" (cluster-preserving QAT, which also keeps zeros).

  Returns:
    A new model of tfmot QuantizeWrappers, float32 images -> logits.

  Raises:
    UserError: unknown ``preserve``.
  """
  if preserve not in PRESERVE:
    raise UserError(f"`preserve` must be one of {', '.join(PRESERVE)}; got {preserve!r}.")
  tfmot = _tfmot()
  qk = tfmot.quantization.keras
  if preserve == "none":
    return qk.quantize_model(model)
  annotated = qk.quantize_annotate_model(model)
  if preserve == "sparsity":
    scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
  else:
    scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
        preserve_sparsity=kernel_sparsity(model) >= PRUNED_SPARSITY)
  return qk.quantize_apply(annotated, scheme)


def calibrate_ranges(model: keras.Model, images: np.ndarray, *, batch_size: int = 128) -> int:
  """Sets every quantization range of a QAT model from ``images``, as TFLite's PTQ calibrates.

  One inference pass over ``images`` in batches (layers in inference mode: no
  dropout) in which each tfmot quantizer sets its range the way training
  would, without training's EMA:

  * activations (``MovingAverageQuantizer``): the running min/max of the
    input over all batches, with zero inside (and symmetric where the
    quantizer is) by tfmot's own rule, i.e. TFLite's MinMax calibration;
  * the model's input (``AllValuesQuantizer``): its running min/max, as in training;
  * weights: ``set_weight_ranges`` (the current weights' min/max, as each
    training step sets them); these first, so the activations are calibrated
    through the rounded weights.

  Each range sees its input fake-quantized by the ranges already calibrated
  upstream. Weights are untouched. Without this, tfmot starts activation
  ranges at [-6, 6] and moves them by an EMA of decay 0.999 per training step:
  after a short fine-tuning they are still ~[-5.5, 5.5]. Fine-tuning moves
  the calibrated ranges on by that EMA.

  Args:
    model: a model from ``quantize_for_training``.
    images: float32 [N, H, W, C], N >= 1, the model's input (e.g. the
      representative images of the conversion).
    batch_size: images per pass, >= 1.

  Returns:
    The number of quantizers calibrated (0: not a QAT model).

  Raises:
    UserError: no images or a bad ``batch_size``.
  """
  if len(images) < 1:
    raise UserError("`images` to calibrate the QAT ranges on must not be empty.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
  from tensorflow_model_optimization.python.core.quantization.keras import quant_ops  # pylint: disable=g-import-not-at-top
  from tensorflow_model_optimization.python.core.quantization.keras import quantizers  # pylint: disable=g-import-not-at-top
  seen = set()

  def moving_average(quantizer, inputs, training, weights, **kwargs):  # pylint: disable=unused-argument
    lo, hi = weights["min_var"], weights["max_var"]
    before = (tf.identity(lo), tf.identity(hi))
    options = dict(per_channel=quantizer.per_axis, num_bits=quantizer.num_bits,
                   narrow_range=quantizer.narrow_range, symmetric=quantizer.symmetric)
    # An EMA of decay 0 is this batch's range, by tfmot's rules (0 inside, symmetric).
    quant_ops.MovingAvgQuantize(inputs, lo, hi, ema_decay=0.0, is_training=True, **options)
    if id(lo) in seen:  # widen to the running min/max
      lo.assign(tf.minimum(lo, before[0]))
      hi.assign(tf.maximum(hi, before[1]))
    seen.add(id(lo))
    return quant_ops.MovingAvgQuantize(inputs, lo, hi, is_training=False, **options)

  # tfmot hard-codes the EMA decay in the quantizers' __call__: the calibration pass swaps
  # it on the two classes for its duration (a model called from another thread meanwhile
  # would calibrate too).
  originals = {cls: cls.__dict__["__call__"]
               for cls in (quantizers.MovingAverageQuantizer, quantizers.AllValuesQuantizer)}

  def all_values(quantizer, inputs, training, weights, **kwargs):  # pylint: disable=unused-argument
    seen.add(id(weights["min_var"]))
    return originals[quantizers.AllValuesQuantizer](quantizer, inputs, True, weights, **kwargs)

  # Weights first, so the activations are calibrated through the weights as they will be
  # rounded.
  weight_ranges = set_weight_ranges(model)
  try:
    quantizers.MovingAverageQuantizer.__call__ = moving_average
    quantizers.AllValuesQuantizer.__call__ = all_values
    for start in range(0, len(images), batch_size):
      model(tf.constant(images[start:start + batch_size]), training=False)
  finally:
    for cls, call in originals.items():
      cls.__call__ = call
  return weight_ranges + len(seen)


def set_weight_ranges(model: keras.Model) -> int:
  """Sets each weight quantizer's range of a QAT model from its current weights.

  Each weight quantizer (LastValue and the schemes' per-channel,
  prune-preserving and cluster-preserving variants of it) takes the range a
  training step gives it, the weights' min/max (per channel where the scheme
  is). A channel whose weights are all zero, a filter pruning removed, then
  has the range [0, 0], and the converter's int32 bias of that channel,
  quantized with scale input_scale x weight_scale (~1e-11), overflows: M1-AT's
  QAT .tflite had conv1's biases off by up to 0.17 and agreed with the float
  model on 98.8% of the test images (PTQ: 99.95%), where its Keras twin, whose
  biases stay float, agreed on 99.96%. Such a channel gets its layer's widest
  range instead (zeros stay exactly zero). ``conversion.convert`` calls it on
  every QAT model it converts: a training step sets the ranges before its own
  update, so after fine-tuning they lag one step behind the weights.

  Args:
    model: a model from ``quantize_for_training``.

  Returns:
    The number of weight quantizers set.
  """
  count = 0
  for layer in model.layers:
    for weight, quantizer, quantizer_vars in getattr(layer, "_weight_vars", ()):
      quantizer(weight, True, weights=quantizer_vars)
      lo, hi = quantizer_vars["min_var"], quantizer_vars["max_var"]
      width = tf.maximum(tf.abs(lo), tf.abs(hi))
      widest = tf.reduce_max(width)
      fallback = tf.where(widest > 0, widest, 1.0)
      empty = width <= 1e-6 * widest
      lo.assign(tf.where(empty, -fallback, lo))
      hi.assign(tf.where(empty, fallback, hi))
      count += 1
  return count


# kd-quantize's robust fine-tuning attack when --adv_steps is not given: PGD-10 (the
# shared default of 40 is for training from scratch; fine-tuning an already robust model
# with 10 steps of 2.5 eps / 10 is Madry's rule at a quarter of the cost).
FINE_TUNE_STEPS = 10


def fine_tuning_attack(method: str, *, epsilon: float = 0.3, steps: int | None = None,
                       step_size: float | None = None, trades_beta: float = 6.0
                       ) -> training.AdversarialSpec:
  """The ``AdversarialSpec`` of robust fine-tuning: PGD/TRADES 10 steps unless given."""
  if steps is None and method != "fgsm_rs":
    steps = FINE_TUNE_STEPS
  return training.AdversarialSpec(method, epsilon=epsilon, steps=steps, step_size=step_size,
                                  trades_beta=trades_beta, robust_val_size=0)


def fine_tune(model: keras.Model, train: Iterable, *, epochs: int,
              learning_rate: float = 1e-4,
              adversarial: training.AdversarialSpec | None = None, seed: int = 0,
              verbose: int = 2) -> list[float]:
  """Fine-tunes ``model`` (QAT or clustered) with Adam on cross-entropy of logits.

  With ``adversarial``, each batch is first attacked with adversarial
  training's own inner maximisation (``training.attack.craft``: PGD from a
  random start, FGSM-RS, or TRADES' KL ascent) on ``model`` in inference mode
  (through the fake-quant ops' straight-through gradient for a QAT model),
  then the step minimises CE on the adversarial batch (pgd, fgsm_rs) or
  TRADES' CE(clean) + β·KL(clean || adversarial), in one compiled step.

  Args:
    model: images -> logits, trained in place.
    train: batches of (float32 [B, H, W, C] in [0, 1], int labels [B]), e.g.
      ``data.load_split(name, "train", shuffle=True)``; iterated once per epoch.
    epochs: >= 0 (0 returns at once).
    learning_rate: Adam's, > 0 (small: the model is already trained).
    adversarial: None, or the attack of robust fine-tuning
      (``training.AdversarialSpec``; ``fine_tuning_attack`` has kd-quantize's defaults).
    seed: seeds the attack's random starts (one stateless seed per batch).
    verbose: Keras fit verbosity; the adversarial loop logs one line per epoch if > 0.

  Returns:
    The mean training loss of each epoch.

  Raises:
    UserError: bad ``epochs``, ``learning_rate`` or ``adversarial``.
  """
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
    raise UserError(f"`epochs` must be an integer >= 0; got {epochs!r}.")
  if not learning_rate > 0:
    raise UserError(f"`learning_rate` must be > 0; got {learning_rate!r}.")
  if adversarial is not None:
    check_attack(adversarial)
  if epochs == 0:
    return []
  optimizer = keras.optimizers.Adam(learning_rate)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if adversarial is None:
    model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"])
    history = model.fit(train, epochs=epochs, verbose=verbose)
    return [float(v) for v in history.history["loss"]]

  steps, step_size = adversarial.attack_steps()
  method, beta = adversarial.method, float(adversarial.trades_beta)

  def logits(x, training_mode):
    return tf.cast(model(x, training=training_mode), tf.float32)

  @tf.function
  def step(x, y, batch_seed):
    y = tf.cast(y, tf.int64)
    x_adv = attack.craft(lambda xa: logits(xa, False), x, y, method=method,
                         epsilon=float(adversarial.epsilon), step_size=step_size, steps=steps,
                         seed=batch_seed)
    with tf.GradientTape() as tape:
      per_example, _ = attack.step_loss(lambda xa: logits(xa, True), x, x_adv, y,
                                        method=method, trades_beta=beta)
      loss = tf.reduce_mean(per_example)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  losses = []
  batch = 0
  for epoch in range(epochs):
    total, count = 0.0, 0
    for x, y in train:
      total += float(step(x, y, tf.constant([seed, batch], tf.int64)))
      count += 1
      batch += 1
    losses.append(total / max(count, 1))
    if verbose:
      print(f"robust fine-tuning epoch {epoch + 1}/{epochs}: {method} loss {losses[-1]:.4f}")
  return losses


def check_attack(spec) -> None:
  """Raises UserError unless ``spec`` is a valid ``training.AdversarialSpec``."""
  if not isinstance(spec, training.AdversarialSpec):
    raise UserError(f"`adversarial` must be None or a training.AdversarialSpec; got {spec!r}.")
  spec.validate()  # ConfigError (a UserError) naming the flag
