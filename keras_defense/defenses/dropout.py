"""Defensive Dropout: dropout kept active at inference (Wang et al., ICCAD 2018).

Siyue Wang et al., "Defensive Dropout for Hardening Deep Neural Networks under
Adversarial Attacks", ICCAD 2018, https://arxiv.org/abs/1809.05165: a trained
classifier answers every query with a fresh dropout mask, so its output and
its gradients are random. It is a randomized defense: evaluate it with
expectation over transformation (the gradient averaged over many masks;
Athalye, Carlini & Wagner 2018), e.g. AutoAttack's ``rand`` version.

The defended model is built from built-in Keras layers only: the base model's
layers (cloned, same weights) with a ``keras.layers.Dropout`` inserted after
each chosen layer and *called with* ``training=True`` in the functional graph.
That call argument is part of the saved functional config and of the traced
SavedModel graph, so ``export.load_model`` accepts the model and the plain
TensorFlow ``serving_default`` signature is random too (the masks come from
the layer's ``tf.random.Generator``, a variable saved with the model).

Example:
  >>> defended, record = defensive_dropout(m0, DataSpec("mnist"),
  ...                                      DefensiveDropoutConfig(rate=0.3))
  >>> defended(x) is different at each call
"""

from __future__ import annotations

import dataclasses

from keras_defense.util.compat import keras
from keras_defense.defenses import base
from keras_defense.training.config import ConfigError

LAYER_PREFIX = "defensive_dropout"


@dataclasses.dataclass
class DefensiveDropoutConfig:
  """Defensive Dropout's settings.

  Attributes:
    rate: fraction of units dropped at inference, in (0, 1). Wang et al. tune
      it per model (accuracy against robustness); no single paper default.
    layers: names of the layers whose outputs get a dropout; None: every Dense
      layer but the logits layer (the C&W nets: dense1, dense2).
    seed: seed of the dropout layers' generators.
  """
  rate: float = 0.3
  layers: tuple[str, ...] | None = None
  seed: int = 0

  def validate(self) -> "DefensiveDropoutConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) \
        or not 0 < self.rate < 1:
      raise ConfigError(f"`rate` must be in (0, 1); got {self.rate!r}.")
    if self.layers is not None and (isinstance(self.layers, str) or not self.layers):
      raise ConfigError(f"`layers` must be a non-empty tuple of layer names or None; "
                        f"got {self.layers!r}.")
    if int(self.seed) < 0:
      raise ConfigError(f"`seed` must be >= 0; got {self.seed}.")
    return self


def _chain(model: keras.Model) -> list:
  """The layers of a single-input, single-output chain model, input first.

  Raises:
    ValueError: a layer has several inbound layers or is used more than once.
  """
  layers = model.layers
  for layer in layers[1:]:
    nodes = layer.inbound_nodes
    if len(nodes) != 1 or len(nodes[0].inbound_layers if isinstance(
        nodes[0].inbound_layers, list) else [nodes[0].inbound_layers]) != 1:
      raise ValueError(f"Defensive Dropout rebuilds chain models (each layer fed by "
                       f"one layer); layer {layer.name!r} of {model.name!r} is not.")
  return layers


def layer_seed(seed: int, index: int) -> int:
  """The generator seed of the ``index``-th dropout layer: a key of its own.

  ``tf.random.Generator.from_seed`` puts a small integer seed into the counter
  and leaves the key 0, so seeds ``s`` and ``s + 1`` give the same stream one
  block apart: two layers seeded so would draw shifted copies of one mask. A
  seed of ``k << 128`` is the state (counter 0, key k): a separate stream.
  """
  return (int(seed) * 1024 + index + 1) << 128


def add_inference_dropout(model: keras.Model, rate: float, *,
                          layers: tuple[str, ...] | None = None,
                          seed: int | None = 0) -> keras.Model:
  """A copy of ``model`` with dropout active at inference after ``layers``.

  Args:
    model: a tf_keras functional chain model (images -> logits), e.g. M0.
    rate: dropout rate in (0, 1).
    layers: layer names to follow with a dropout; None: every Dense layer but
      the output layer.
    seed: seed of the dropout generators (``layer_seed(seed, i)`` for the i-th:
      its own Philox key, so the layers' streams never overlap); None: random.

  Returns:
    A new functional model (cloned layers holding copies of the weights);
    every call draws new masks, with or without ``training=True``.

  Raises:
    ValueError: a named layer is missing, or the model is not a chain.
  """
  clone = keras.models.clone_model(model)
  clone.set_weights(model.get_weights())
  chain = _chain(clone)
  names = {l.name for l in chain}
  if layers is None:
    layers = tuple(l.name for l in chain[1:-1] if isinstance(l, keras.layers.Dense))
  missing = [n for n in layers if n not in names]
  if missing:
    raise ValueError(f"`layers` names layers {missing} that {model.name!r} does not have; "
                     f"it has {sorted(names)}.")
  inputs = keras.Input(shape=clone.input_shape[1:], name=chain[0].name)
  x = inputs
  for layer in chain[1:]:
    x = layer(x)
    if layer.name in layers:
      i = layers.index(layer.name)
      x = keras.layers.Dropout(rate, seed=None if seed is None else layer_seed(seed, i),
                               name=f"{LAYER_PREFIX}_{i + 1}")(x, training=True)
  return keras.Model(inputs, x, name=f"{model.name}_defensive_dropout")


def defensive_dropout(model: keras.Model, data: base.DataSpec | None,
                      config: DefensiveDropoutConfig) -> tuple[keras.Model, dict]:
  """Defensive Dropout on a trained ``model`` (no training: the mask is the defense).

  Args:
    model: the trained classifier (images -> logits).
    data: the data it was trained on (recorded only); may be None.
    config: the rate and layers.

  Returns:
    (the randomized model, its provenance).

  Raises:
    ConfigError: a bad config field, or a layer ``model`` does not have.
  """
  config.validate()
  try:
    defended = add_inference_dropout(model, config.rate, layers=config.layers,
                                     seed=config.seed)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dropped = [l.name for l in defended.layers if l.name.startswith(LAYER_PREFIX)]
  return defended, base.record(
      "defensive_dropout", config, {"dropout_layers": dropped},
      dataset=None if data is None else data.dataset, base_model=model.name,
      randomized=True)
