"""Keras 3 <-> tf_keras: the same model rebuilt in the other Keras, with a proof.

tfmot (pruning, QAT, clustering) and keras-defense's training need tf_keras
(Keras 2); users save with Keras 3 (TF >= 2.16's ``keras``). ``to_tf_keras``
rebuilds a Keras 3 functional or Sequential model of built-in layers as a
tf_keras functional model, layer by layer through the functional graph (the
two Kerases serialize configs and graphs differently: ``module`` /
``registered_name`` keys, dtype policies as dicts, InputLayer ``batch_shape``
vs ``batch_input_shape``, ``inbound_nodes`` as ``{"args", "kwargs"}`` with
``__keras_tensor__`` entries vs ``[name, node, tensor, kwargs]`` lists), copies
the weights, and proves the copy: both models' logits on a probe batch agree
to ``atol`` (1e-5), else a ``BridgeError`` names the largest difference and the
first layer whose outputs differ. ``to_keras3`` is the reverse, for handing a
hardened model back in the user's format.

Refused, with a list of every offender: layers without a twin in the other
Keras, custom (registered or not) layers, ``Lambda`` layers (Python code),
nested models, and subclassed models (no graph to rebuild).

The graph is read by ``keras_graph`` (the same neutral form from either Keras).
Keras 3 is imported on first use (``_keras3``): it is only needed for users'
Keras 3 files and importing it costs seconds on every run that does not.
Layer names are kept, so weights match by name in both directions.

Example:
  >>> import keras  # Keras 3
  >>> k3 = keras.saving.load_model("m.keras", safe_mode=True, compile=False)
  >>> model = to_tf_keras(k3)  # tf_keras, logits checked to 1e-5
  >>> back = to_keras3(model)  # Keras 3 again
"""

from __future__ import annotations

import inspect

import numpy as np

from keras_defense.models import keras_graph
from keras_defense.util.compat import keras as tf_keras
from keras_defense.util.errors import UserError

PROBE_ATOL = 1e-5  # largest |logit difference| accepted between the two models
PROBE_BATCH = 8
_BUILTIN_MODULES = ("keras.layers", "keras.src.layers")  # custom layers: module None
_REFUSED = ("Lambda", "TFOpLambda", "SlicingOpLambda")  # code, not configuration
# tf_keras random layers' generator choice: how, not what, they draw (Keras 3 has one).
_RNG_KEYS = ("rng_type", "force_generator")
# Layer.__init__ keywords both Kerases accept besides a class's own parameters.
_BASE_KWARGS = {"name", "trainable", "dtype", "input_shape", "input_dim", "batch_input_shape",
                "batch_size", "activity_regularizer", "autocast", "dynamic", "weights"}


class BridgeError(UserError):
  """A model cannot be rebuilt in the other Keras, or the copy computes otherwise."""


def keras3():
  """The Keras 3 package (``import keras``), imported on first use."""
  import keras  # pylint: disable=g-import-not-at-top  (seconds to import; only for Keras 3 files)
  return keras


# --- checks ------------------------------------------------------------------

def _model_kind_problem(model, keras_module) -> str | None:
  name = type(model).__name__
  if not isinstance(model, keras_module.Model):
    return f"{name} is not a Keras model"
  if name not in ("Functional", "Sequential") or not type(model).__module__.startswith(
      ("keras.", "tf_keras.")):
    return (f"{name} (module {type(model).__module__}) is a subclassed model: it has no "
            f"layer graph to rebuild; build it with the functional API or Sequential")
  return None


def unsupported_layers(entries: list, target_layers) -> list[str]:
  """Every layer of a saved config the other Keras cannot rebuild, as "name (Class): why".

  Args:
    entries: the ``layers`` of a functional/Sequential config (dicts with
      ``class_name``, ``config``, ``module``, ``registered_name``).
    target_layers: the ``layers`` namespace of the Keras to rebuild in.
  """
  out = []
  for entry in entries:
    cls = entry.get("class_name")
    name = (entry.get("config") or {}).get("name", entry.get("name", "?"))
    module = entry.get("module")
    registered = entry.get("registered_name")
    if cls in ("Functional", "Sequential", "Model"):
      out.append(f"{name} ({cls}): a nested model; flatten it into one graph")
    elif cls in _REFUSED:
      out.append(f"{name} ({cls}): runs Python code; replace it with built-in layers")
    elif not str(module).startswith(_BUILTIN_MODULES) or registered not in (None, cls):
      out.append(f"{name} ({cls}, module {module}, registered {registered}): a custom layer")
    elif cls != "InputLayer" and not isinstance(getattr(target_layers, cls, None), type):
      out.append(f"{name} ({cls}): no twin in the other Keras")
  return out


def _check_model(model, source_keras, target_keras) -> None:
  problem = _model_kind_problem(model, source_keras)
  if problem:
    raise BridgeError(f"cannot rebuild the model in the other Keras: {problem}.")
  bad = unsupported_layers(model.get_config()["layers"], target_keras.layers)
  bad += [f"{l.name} ({type(l).__name__}, module {type(l).__module__}): a custom layer"
          for l in model.layers if not type(l).__module__.startswith(("keras.", "tf_keras."))
          and not any(b.startswith(f"{l.name} (") for b in bad)]
  if bad:
    raise BridgeError(
        f"cannot rebuild model {model.name!r} in the other Keras; {len(bad)} layer(s) have "
        f"no built-in twin: {'; '.join(bad)}. Only built-in Keras layers are bridged.")


# --- building ----------------------------------------------------------------

def _accepted(cls) -> tuple[set, bool]:
  """(parameter names of ``cls.__init__`` and its bases', whether it takes **kwargs).

  A layer's ``__init__`` often passes ``**kwargs`` on to a base class that names
  them (tf_keras's BatchNormalization -> BatchNormalizationBase).
  """
  names, var_kw = set(), False
  for klass in cls.__mro__:
    init = klass.__dict__.get("__init__")
    if init is None:
      continue
    params = inspect.signature(init).parameters
    names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if klass is cls:
      var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
  return names, var_kw


def _clean_nested(obj, target_keras):
  """Initializer/regularizer/constraint configs without keys the target class lacks (None)."""
  if isinstance(obj, dict) and "class_name" in obj and isinstance(obj.get("config"), dict):
    module = str(obj.get("module") or "")
    namespace = getattr(target_keras, module.rsplit(".", 1)[-1], None)
    cls = getattr(namespace, obj["class_name"], None) if namespace is not None else None
    config = dict(obj["config"])
    if isinstance(cls, type):
      names, var_kw = _accepted(cls)
      if not var_kw:
        config = {k: v for k, v in config.items() if k in names or v is not None}
    return {**obj, "config": config}
  return obj


def _layer_config(layer: keras_graph.Layer, cls, target_keras) -> dict:
  """``layer``'s config for ``cls`` in the target Keras (raises on an argument it lacks)."""
  config = {k: _clean_nested(v, target_keras) for k, v in layer.config["config"].items()}
  config["dtype"] = keras_graph.dtype_name(config.get("dtype"))
  axis = config.get("axis")
  if layer.class_name == "BatchNormalization" and isinstance(axis, list) and len(axis) == 1:
    config["axis"] = axis[0]  # tf_keras stores [3]; Keras 3 takes an int only
  names, _ = _accepted(cls)
  for key in [k for k in config if k not in names and k not in _BASE_KWARGS]:
    value = config[key]
    if key in _RNG_KEYS or value in (None, False, {}, []) or (key in layer.defaults
                                          and _same(value, layer.defaults[key])):
      del config[key]  # an option left at its default (lora_rank, groups=1)
    else:
      raise BridgeError(
          f"layer {layer.name!r} ({layer.class_name}) sets {key}={config[key]!r}, which the "
          f"other Keras's {layer.class_name} does not have; it cannot be rebuilt there.")
  return config


def _same(a, b) -> bool:
  try:
    return bool(a == b) or (isinstance(a, (list, tuple)) and list(a) == list(b))
  except Exception:  # pylint: disable=broad-except
    return False


def _resolve(obj, tensors):
  if isinstance(obj, keras_graph.Ref):
    try:
      return tensors[(obj.layer, obj.node)][obj.tensor]
    except KeyError:
      raise _NotReady() from None
  if isinstance(obj, dict):
    return {k: _resolve(v, tensors) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_resolve(v, tensors) for v in obj]
  return obj


class _NotReady(Exception):
  """A layer's inputs are not built yet."""


def _flatten(out) -> list:
  if isinstance(out, dict):
    return [t for k in sorted(out) for t in _flatten(out[k])]
  if isinstance(out, (list, tuple)):
    return [t for o in out for t in _flatten(o)]
  return [out]


def _build(graph: keras_graph.Graph, target_keras):
  """The target Keras's functional model of ``graph`` (fresh weights)."""
  tensors: dict[tuple[str, int], list] = {}
  pending = list(graph.layers)
  while pending:
    left = []
    for layer in pending:
      if layer.class_name == "InputLayer":
        cfg = layer.config
        tensors[(layer.name, 0)] = [target_keras.Input(
            batch_shape=tuple(cfg["batch_shape"]), dtype=cfg["dtype"], name=layer.name)]
        continue
      try:
        calls = [(_resolve(a, tensors), _resolve(k, tensors)) for a, k in layer.calls]
      except _NotReady:
        left.append(layer)
        continue
      cls = getattr(target_keras.layers, layer.class_name)
      config = _layer_config(layer, cls, target_keras)
      try:
        made = cls.from_config(config)
        for i, (args, kwargs) in enumerate(calls):
          tensors[(layer.name, i)] = _flatten(made(*args, **kwargs))
      except (TypeError, ValueError) as e:
        raise BridgeError(f"layer {layer.name!r} ({layer.class_name}) cannot be rebuilt in "
                          f"the other Keras from its config: {type(e).__name__}: "
                          f"{str(e).splitlines()[-1][:300]}") from e
    if len(left) == len(pending):
      raise BridgeError(f"the graph of model {graph.name!r} cannot be ordered: layers "
                        f"{[l.name for l in left]} wait on tensors no layer makes.")
    pending = left
  inputs = [tensors[(r.layer, r.node)][r.tensor] for r in graph.inputs]
  outputs = [tensors[(r.layer, r.node)][r.tensor] for r in graph.outputs]
  return target_keras.Model(inputs=inputs[0] if len(inputs) == 1 else inputs,
                            outputs=outputs[0] if len(outputs) == 1 else outputs,
                            name=graph.name)


def _copy_weights(source, target) -> None:
  for layer in target.layers:
    if type(layer).__name__ == "InputLayer":  # a Sequential does not list its own
      continue
    weights = source.get_layer(layer.name).get_weights()
    mine = layer.get_weights()
    if [w.shape for w in weights] != [w.shape for w in mine]:
      raise BridgeError(
          f"layer {layer.name!r} ({type(layer).__name__}): weight shapes "
          f"{[w.shape for w in weights]} do not match the rebuilt layer's "
          f"{[w.shape for w in mine]}.")
    layer.set_weights(weights)


# --- the proof ---------------------------------------------------------------

def _numpy(x) -> np.ndarray:
  return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


def probe_batch(model, *, batch: int = PROBE_BATCH, seed: int = 0) -> np.ndarray:
  """Uniform [0, 1) float32 images of ``model``'s input shape."""
  shape = [int(d) for d in model.input_shape[1:]]
  return np.random.default_rng(seed).uniform(size=(batch, *shape)).astype(np.float32)


def _layer_outputs(model, keras_module):
  """A model of ``model``'s inputs to every non-input layer's output (single-node layers)."""
  named = [(l.name, l.output) for l in model.layers
           if type(l).__name__ != "InputLayer" and len(getattr(l, "_inbound_nodes", [])) == 1]
  return [n for n, _ in named], keras_module.Model(model.inputs, [t for _, t in named])


def check_same_logits(source, target, source_keras, target_keras, *,
                      probe: np.ndarray | None = None, atol: float = PROBE_ATOL) -> float:
  """Largest |logit difference| of the two models on ``probe``; raises past ``atol``.

  Raises:
    BridgeError: the difference exceeds ``atol``; names the first layer whose
      outputs differ by more than ``atol``.
  """
  x = probe_batch(source) if probe is None else np.asarray(probe, np.float32)
  diff = float(np.max(np.abs(_numpy(source(x, training=False))
                              - _numpy(target(x, training=False)))))
  if diff <= atol:
    return diff
  where = "no single layer (the differences add up)"
  try:
    names, src_all = _layer_outputs(source, source_keras)
    _, tgt_all = _layer_outputs(target, target_keras)
    for name, a, b in zip(names, src_all(x, training=False), tgt_all(x, training=False)):
      layer_diff = float(np.max(np.abs(_numpy(a) - _numpy(b))))
      if layer_diff > atol:
        where = f"layer {name!r} (outputs differ by {layer_diff:.3g})"
        break
  except Exception as e:  # pylint: disable=broad-except  (diagnosis only)
    where = f"(per-layer comparison failed: {type(e).__name__}: {e})"
  raise BridgeError(
      f"the rebuilt model {target.name!r} does not compute what the original does: logits "
      f"differ by up to {diff:.3g} on {len(x)} probe images (allowed {atol:g}); first "
      f"difference at {where}.")


def _convert(model, source_keras, target_keras, flavour: str, probe, atol):
  _check_model(model, source_keras, target_keras)
  rebuilt = _build(keras_graph.read_graph(model, flavour), target_keras)
  _copy_weights(model, rebuilt)
  check_same_logits(model, rebuilt, source_keras, target_keras, probe=probe, atol=atol)
  return rebuilt


def to_tf_keras(model, *, probe: np.ndarray | None = None,
                atol: float = PROBE_ATOL) -> tf_keras.Model:
  """The Keras 3 ``model`` rebuilt as a tf_keras functional model with its weights.

  Args:
    model: a Keras 3 functional or Sequential model of built-in layers.
    probe: float32 images ``[n, *input_shape]`` for the logits check; default
      ``PROBE_BATCH`` uniform [0, 1) images (seed 0).
    atol: the largest |logit difference| accepted.

  Returns:
    A tf_keras ``Model`` with the same layer names, graph and weights.

  Raises:
    BridgeError: a subclassed model, layers without a tf_keras twin (all listed),
      or logits that differ by more than ``atol`` (the largest difference and
      the first differing layer named).
  """
  return _convert(model, keras3(), tf_keras, "keras3", probe, atol)


def to_keras3(model: tf_keras.Model, *, probe: np.ndarray | None = None,
              atol: float = PROBE_ATOL):
  """The tf_keras ``model`` rebuilt as a Keras 3 functional model (``to_tf_keras``'s reverse).

  Args, Raises: as ``to_tf_keras``, with the Kerases swapped.
  """
  return _convert(model, tf_keras, keras3(), "tf_keras", probe, atol)
