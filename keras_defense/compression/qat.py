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

``preserve_for(model)`` picks it from the weights. ``fine_tune`` trains with
Keras ``fit``, or, with ``adversarial="pgd"``, on PGD examples crafted on the
fake-quantized model itself (robust QAT: adversarial fine-tuning under the
rounding the device applies; the attack differentiates through the fake-quant
ops with their straight-through gradient).

Example:
  >>> q = quantize_for_training(m1, preserve=preserve_for(m1))
  >>> fine_tune(q, train_ds, epochs=2)
  >>> content = conversion.convert(q, "qat_int8", representative=x[:500])
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from keras_defense import attacks
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

PRESERVE = ("none", "sparsity", "clusters")
ADVERSARIAL_METHODS = ("pgd",)
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


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
  """The attack of robust fine-tuning (L-inf PGD; Madry et al. 2018)."""
  epsilon: float = 0.3
  steps: int = 10
  step_size: float | None = None  # default 2.5 * epsilon / steps (Madry et al.)
  seed: int = 0

  def validate(self) -> None:
    if not self.epsilon > 0:
      raise UserError(f"`adv_epsilon` must be > 0; got {self.epsilon!r}.")
    if self.steps < 1:
      raise UserError(f"`adv_steps` must be >= 1; got {self.steps!r}.")
    if self.step_size is not None and not self.step_size > 0:
      raise UserError(f"`adv_step_size` must be > 0; got {self.step_size!r}.")

  @property
  def resolved_step_size(self) -> float:
    return self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps


def fine_tune(model: keras.Model, train: Iterable, *, epochs: int,
              learning_rate: float = 1e-4, adversarial: str | None = None,
              adversarial_settings: AdversarialSettings | None = None,
              verbose: int = 2) -> list[float]:
  """Fine-tunes ``model`` (QAT or clustered) with Adam on cross-entropy of logits.

  Args:
    model: images -> logits, trained in place.
    train: batches of (float32 [B, H, W, C] in [0, 1], int labels [B]), e.g.
      ``data.load_split(name, "train", shuffle=True)``; iterated once per epoch.
    epochs: >= 0 (0 returns at once).
    learning_rate: Adam's, > 0 (small: the model is already trained).
    adversarial: None, or "pgd" to train on PGD examples of each batch.
    adversarial_settings: the attack's settings (default ``AdversarialSettings()``).
    verbose: Keras fit verbosity; the adversarial loop logs one line per epoch if > 0.

  Returns:
    The mean training loss of each epoch.

  Raises:
    UserError: bad ``epochs``, ``learning_rate``, ``adversarial`` or settings.
  """
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
    raise UserError(f"`epochs` must be an integer >= 0; got {epochs!r}.")
  if not learning_rate > 0:
    raise UserError(f"`learning_rate` must be > 0; got {learning_rate!r}.")
  if adversarial is not None and adversarial not in ADVERSARIAL_METHODS:
    raise UserError(f"`adversarial` must be None or one of {', '.join(ADVERSARIAL_METHODS)}; "
                    f"got {adversarial!r}.")
  if epochs == 0:
    return []
  optimizer = keras.optimizers.Adam(learning_rate)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if adversarial is None:
    model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"])
    history = model.fit(train, epochs=epochs, verbose=verbose)
    return [float(v) for v in history.history["loss"]]

  settings = adversarial_settings or AdversarialSettings()
  settings.validate()

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  losses = []
  batch = 0
  for epoch in range(epochs):
    total, count = 0.0, 0
    for x, y in train:
      x_adv = attacks.pgd(model, x, y, settings.epsilon, step_size=settings.resolved_step_size,
                          steps=settings.steps, seed=settings.seed + batch)
      total += float(step(tf.convert_to_tensor(x_adv), y))
      count += 1
      batch += 1
    losses.append(total / max(count, 1))
    if verbose:
      print(f"robust fine-tuning epoch {epoch + 1}/{epochs}: PGD loss {losses[-1]:.4f}")
  return losses
