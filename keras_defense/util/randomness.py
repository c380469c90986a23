"""The random generators inside a randomized model, reset per unit of work.

A randomized defense (Defensive Dropout) draws fresh masks at every call from
the ``tf.random.Generator`` of each of its dropout layers: a variable whose
state advances with each call. What one computation draws then depends on
every call the process made before it, so a run resumed after a kill (which
loads its finished units instead of recomputing them) would draw other masks
for the rest than an uninterrupted run did, and its numbers would differ.

``reseed(model, seed, *unit)`` sets every generator of ``model`` to a state
derived from the seed, the unit's name (a grid group, an (ε, attack) step, the
clean pass) and the generator's variable name: each unit draws the same masks
however the run got there, and the generators of different units and layers
start far apart in the stream. Only the counter is set; each generator keeps
its key. A model without generators, or whose generators are never called at
inference (the training-only dropout of the C&W nets), is unaffected.

Generators are found in a Keras model (each layer's ``_random_generator``, the
tf_keras convention), in a loaded SavedModel (the ``StateVar`` variables its
signatures capture) and in a ``classifier.Classifier`` (through ``loaded``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from keras_defense.util.compat import keras
from keras_defense.util.compat import tf


def _keras_states(model: Any) -> list:
  states = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
    if isinstance(generator, tf.random.Generator):
      states.append(generator.state)
  return states


def generator_states(model: Any) -> list:
  """The state variables of every ``tf.random.Generator`` ``model`` holds, in a fixed order."""
  loaded = getattr(model, "loaded", None)
  if loaded is not None and loaded is not model:
    return generator_states(loaded)
  if isinstance(model, keras.Model):
    return _keras_states(model)
  states, seen = [], set()
  for name in sorted(getattr(model, "signatures", None) or {}):
    for v in model.signatures[name].variables:
      if v.dtype == tf.int64 and v.name.split("/")[-1].startswith("StateVar") \
          and id(v) not in seen:
        seen.add(id(v))
        states.append(v)
  return states


def reseed(model: Any, seed: int, *unit: Any) -> int:
  """Sets every generator of ``model`` to the state of (seed, unit); returns how many."""
  states = generator_states(model)
  for v in states:
    digest = hashlib.sha256(json.dumps([int(seed), [str(u) for u in unit], v.name])
                            .encode()).digest()
    state = v.numpy().copy()
    state[0] = int.from_bytes(digest[:8], "little") >> 2   # the counter's low word
    state[1:-1] = 0                                        # Philox: the counter's high word
    v.assign(state)                                        # state[-1], the key, is kept
  return len(states)
