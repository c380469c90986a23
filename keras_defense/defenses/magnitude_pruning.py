"""Magnitude pruning of a Keras model with tfmot: wrap, schedule, strip.

A thin layer over ``tensorflow_model_optimization.sparsity.keras``:
``prune_model`` wraps each layer with ``prune_low_magnitude`` and a
``PolynomialDecay`` schedule (one final sparsity for Dense layers, one for
Conv2D layers), ``pruning_callbacks`` are the callbacks its training needs
(``UpdatePruningStep``; ``PruningSummaries`` to TensorBoard), ``strip_pruning``
removes the wrappers and ``aligned_end_step`` puts a schedule's end on its
mask-update grid. ``pruning.prune`` is the run that uses them.

Layer handling (decided here, explicit in ``prune_model``):
  * every ``Dense`` layer, the logits layer included, is pruned to
    ``dense_sparsity`` (the design card says "all FC layers"); pass
    ``prune_logits=False`` to leave the logits layer dense;
  * every ``Conv2D`` layer is pruned to ``conv_sparsity``;
  * any other layer whose weights tfmot prunes (``prunable_weight_names``:
    its registry, e.g. Conv1D/Conv3D/SeparableConv2D's pointwise kernel,
    Conv2DTranspose, Embedding) is pruned to ``conv_sparsity`` if it is a
    convolution (``CONV_TYPES``), else to ``dense_sparsity``;
  * all other layers are left as they are: those without weights (pooling,
    flatten, dropout, input, Add) and those with weights tfmot does not prune
    (BatchNormalization, DepthwiseConv2D: its registry lists no weights),
    which ``left_unpruned`` names.
Only kernels are pruned; biases are kept (tfmot's default for Dense/Conv2D).

Example:
  >>> pruned = prune_model(m0, dense_sparsity=0.9, conv_sparsity=0.95, begin_step=0,
  ...                      end_step=2000, frequency=100)
  >>> pruned.fit(x, y, callbacks=pruning_callbacks())
  >>> m1 = strip_pruning(pruned)
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

from keras_defense.util.compat import keras

_sparsity = tfmot.sparsity.keras
WRAPPER_TYPE = _sparsity.prune_low_magnitude(keras.layers.Dense(1)).__class__

PRUNABLE_TYPES = (keras.layers.Dense, keras.layers.Conv2D)
# Convolutions take conv_sparsity (Conv2DTranspose and Conv3DTranspose are subclasses).
CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
              keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


def prunable_weight_names(layer) -> list[str]:
  """The weights of ``layer`` tfmot's magnitude pruning prunes ([] : leave the layer alone).

  tfmot's registry (``PruneRegistry``) decides: ``["kernel"]`` for Dense and
  Conv*, ``["pointwise_kernel"]`` for SeparableConv*, ``[]`` for
  BatchNormalization and DepthwiseConv2D. Recurrent and attention layers,
  which tfmot handles per cell/projection, are left alone here.
  """
  registry = prune_registry.PruneRegistry
  if not registry.supports(layer) or registry._is_rnn_layer(layer) or registry._is_mha_layer(layer):  # pylint: disable=protected-access
    return []
  return list(registry._weight_names(layer))  # pylint: disable=protected-access


def left_unpruned(model: keras.Model) -> list[dict]:
  """The layers of ``model`` that hold weights but are not pruned, with why.

  Returns:
    ``[{"name", "type", "weights", "why"}]``: ``weights`` counts the layer's
    parameters; ``why`` is tfmot's reason (no prunable weights, or not supported).
  """
  out = []
  for layer in model.layers:
    inner = layer.layer if isinstance(layer, WRAPPER_TYPE) else layer
    if isinstance(layer, WRAPPER_TYPE) or not inner.weights or prunable_weight_names(inner):
      continue
    supported = prune_registry.PruneRegistry.supports(inner)
    out.append({"name": inner.name, "type": type(inner).__name__,
                "weights": int(sum(np.prod(w.shape) for w in inner.weights)),
                "why": "tfmot prunes none of its weights" if supported
                       else "not supported by tfmot's pruning"})
  return out


def validate_sparsity(value: float, name: str) -> None:
  """Raises ValueError unless ``value`` is a sparsity in [0, 1)."""
  if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
    raise TypeError(f"`{name}` must be a float in [0, 1); got {type(value).__name__}.")
  if not (0.0 <= float(value) < 1.0) or math.isnan(float(value)):
    raise ValueError(f"`{name}` must be in [0, 1) (the fraction of weights set to "
                     f"zero; 0.9 keeps 10%); got {value!r}.")


def kept_at_most(sparsity: float, layer) -> float:
  """The sparsity to give tfmot so a kernel keeps at most ``(1 - sparsity)`` of its weights.

  tfmot keeps ``round(n * (1 - s))`` weights of an ``n``-weight kernel, which can be
  one more than the fraction asked for (461 of 9,216 = 5.002% for s = 0.95);
  this returns ``s'`` with ``round(n * (1 - s')) = max(1, floor(n * (1 - s)))``.
  """
  names = prunable_weight_names(layer) or ["kernel"]
  n = int(np.prod(getattr(layer, names[0]).shape))
  keep = max(1, math.floor(n * (1.0 - float(sparsity)) + 1e-6))
  return 1.0 - keep / n


def prune_model(model: keras.Model, *, dense_sparsity: float, conv_sparsity: float,
                begin_step: int, end_step: int, frequency: int,
                initial_sparsity: float = 0.0,
                prune_logits: bool = True,
                dropout: float | None = None) -> keras.Model:
  """Wraps the layers of ``model`` tfmot can prune (Dense, Conv2D, ...) for magnitude pruning.

  Each prunable layer gets its own ``PolynomialDecay`` schedule (tfmot's
  default power 3) from ``initial_sparsity`` at ``begin_step`` to its final
  sparsity at ``end_step``, updating the mask every ``frequency`` steps. Train
  the result with ``UpdatePruningStep`` (see ``pruning_callbacks``), then call
  ``strip_pruning``. The mask is only updated on steps where
  ``(step - begin_step) % frequency == 0``, so choose ``end_step`` on that grid
  (``prune`` does) or the final sparsity is not reached.

  Args:
    model: a built functional or Sequential tf_keras model (weights are kept).
    dense_sparsity: final fraction of zero weights in every Dense kernel, [0, 1).
    conv_sparsity: final fraction of zero weights in every Conv2D kernel, [0, 1).
    begin_step: training step (1-based, counted by the wrappers) at which
      pruning starts, >= 0.
    end_step: step at which the final sparsity is reached, > ``begin_step``.
    frequency: steps between mask updates, >= 1.
    initial_sparsity: sparsity at ``begin_step``, [0, 1).
    prune_logits: also prune the output Dense layer (default True: the design
      card prunes all FC layers). If False it is left unwrapped and dense.
    dropout: if not None, the rate of every Dropout layer of the clone, [0, 1)
      (fine-tuning a sparse net with less dropout); None keeps the model's.
      Dropout does nothing at inference, so the served model is unchanged.

  Returns:
    A new model (clone) whose Dense/Conv2D layers are ``PruneLowMagnitude``
    wrappers holding copies of the original weights.

  Raises:
    ValueError: a sparsity outside [0, 1) or a bad step range.
  """
  validate_sparsity(dense_sparsity, "dense_sparsity")
  validate_sparsity(conv_sparsity, "conv_sparsity")
  validate_sparsity(initial_sparsity, "initial_sparsity")
  if int(begin_step) < 0:
    raise ValueError(f"`begin_step` must be >= 0; got {begin_step}.")
  if int(end_step) <= int(begin_step):
    raise ValueError(f"`end_step` must be > `begin_step` ({begin_step}); got {end_step}.")
  if int(frequency) < 1:
    raise ValueError(f"`frequency` must be >= 1; got {frequency}.")
  if dropout is not None and not 0.0 <= float(dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1) or None; got {dropout!r}.")
  output_layer = model.layers[-1]

  def schedule(final):
    return _sparsity.PolynomialDecay(
        initial_sparsity=float(initial_sparsity), final_sparsity=float(final),
        begin_step=int(begin_step), end_step=int(end_step), frequency=int(frequency))

  def fresh(layer):  # a copy, so the pruned model never shares variables with `model`
    return layer.__class__.from_config(layer.get_config())

  def clone_layer(layer):
    if isinstance(layer, keras.layers.Conv2D):
      return _sparsity.prune_low_magnitude(
          fresh(layer), pruning_schedule=schedule(kept_at_most(conv_sparsity, layer)))
    if isinstance(layer, keras.layers.Dense) and (layer is not output_layer or prune_logits):
      return _sparsity.prune_low_magnitude(
          fresh(layer), pruning_schedule=schedule(kept_at_most(dense_sparsity, layer)))
    if not isinstance(layer, keras.layers.Dense) and prunable_weight_names(layer):
      target = conv_sparsity if isinstance(layer, CONV_TYPES) else dense_sparsity
      return _sparsity.prune_low_magnitude(
          fresh(layer), pruning_schedule=schedule(kept_at_most(target, layer)))
    if isinstance(layer, keras.layers.Dropout) and dropout is not None:
      return layer.__class__.from_config({**layer.get_config(), "rate": float(dropout)})
    return fresh(layer)  # logits kept dense, or a layer without prunable weights

  pruned = keras.models.clone_model(model, clone_function=clone_layer)
  for old, new in zip(model.layers, pruned.layers):
    target = new.layer if isinstance(new, WRAPPER_TYPE) else new
    target.set_weights(old.get_weights())
  return pruned


def pruning_callbacks(log_dir: str | os.PathLike | None = None) -> list:
  """``UpdatePruningStep`` (required) plus ``PruningSummaries`` if ``log_dir``."""
  callbacks = [_sparsity.UpdatePruningStep()]
  if log_dir is not None:
    callbacks.append(_sparsity.PruningSummaries(log_dir=str(log_dir), update_freq="epoch",
                                                write_graph=False, profile_batch=0))
  return callbacks


def strip_pruning(model: keras.Model) -> keras.Model:
  """Removes the tfmot wrappers; the zeros stay in the plain kernels.

  tfmot's ``strip_pruning`` keeps the wrappers' variables, whose names carry a
  ``prune_low_magnitude_`` prefix into the SavedModel; the result is therefore
  cloned once more so that its variables are named like the base model's
  (``dense1/kernel``), which lets plain-TensorFlow consumers match M0/M1/M2
  variables by name.
  """
  stripped = _sparsity.strip_pruning(model)
  clean = keras.models.clone_model(stripped)
  clean.set_weights(stripped.get_weights())
  return clean


def has_pruning_wrappers(model: keras.Model) -> bool:
  """True if any layer of ``model`` is still a tfmot pruning wrapper."""
  return any(isinstance(l, WRAPPER_TYPE) for l in model.layers)


def aligned_end_step(begin_step: int, end_step: int, frequency: int) -> int:
  """The last mask-update step <= ``end_step`` on the grid begin + k*frequency."""
  k = (int(end_step) - int(begin_step)) // int(frequency)
  return int(begin_step) + k * int(frequency)
