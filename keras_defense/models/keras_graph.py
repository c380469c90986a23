"""A Keras functional/Sequential model's layer graph, read the same way from Keras 3 and tf_keras.

The two Kerases serialize graphs differently: Keras 3's ``inbound_nodes`` are
``{"args", "kwargs"}`` with ``__keras_tensor__`` entries, tf_keras's are
``[name, node, tensor, kwargs]`` lists; single inputs/outputs are flat in
Keras 3; InputLayers hold ``batch_shape`` vs ``batch_input_shape``; a
Sequential is a chain. ``read_graph`` turns either into one neutral form
(``Graph`` of ``Layer`` with ``Ref`` tensors) that ``keras_bridge`` rebuilds in
the other Keras. Nothing here is deserialized: configs are read as data.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


@dataclasses.dataclass(frozen=True)
class Ref:
  """A tensor in a functional graph: output ``tensor`` of node ``node`` of ``layer``."""
  layer: str
  node: int
  tensor: int


@dataclasses.dataclass
class Layer:
  """One layer: its config entry and the calls (args, kwargs with ``Ref``s) of its nodes."""
  name: str
  class_name: str
  config: dict
  calls: list  # [(args, kwargs)] with Ref for tensors; [] for an InputLayer
  defaults: dict = dataclasses.field(default_factory=dict)  # the source class's defaults


@dataclasses.dataclass
class Graph:
  """A model as layers in config order, with its input and output tensors."""
  name: str
  layers: list  # [Layer], InputLayers first-class
  inputs: list  # [Ref]
  outputs: list  # [Ref]


def _refs_keras3(obj):
  """Keras 3 inbound args/kwargs with every ``__keras_tensor__`` as a Ref."""
  if isinstance(obj, dict):
    if obj.get("class_name") == "__keras_tensor__":
      return Ref(*obj["config"]["keras_history"])
    return {k: _refs_keras3(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_refs_keras3(v) for v in obj]
  return obj


def _io_refs(entries) -> list:
  """``input_layers`` / ``output_layers``: one [name, node, tensor] or a list of them."""
  if entries and isinstance(entries[0], str):
    entries = [entries]
  return [Ref(*e[:3]) for e in entries]


def _input_layer(name: str, shape, dtype) -> Layer:
  return Layer(name, "InputLayer", {"batch_shape": list(shape), "dtype": dtype or "float32",
                                     "name": name}, [])


def read_graph(model, flavour: str) -> Graph:
  """The functional graph of ``model`` (flavour "keras3" or "tf_keras")."""
  config = model.get_config()
  layers = []
  if type(model).__name__ == "Sequential":
    prev = None
    for entry in config["layers"]:
      cfg = entry["config"]
      if entry["class_name"] == "InputLayer":
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        layers.append(_input_layer(cfg["name"], shape, dtype_name(cfg.get("dtype"))))
      else:
        if prev is None:  # no InputLayer entry: the built shape
          shape = config.get("build_input_shape") or model.input_shape
          layers.append(_input_layer(f"{config['name']}_input", shape, "float32"))
          prev = Ref(layers[-1].name, 0, 0)
        layers.append(Layer(cfg["name"], entry["class_name"], entry, [([prev], {})],
                             init_defaults(type(model.get_layer(cfg["name"])))))
      prev = Ref(layers[-1].name, 0, 0)
    return Graph(config["name"], layers, [Ref(layers[0].name, 0, 0)], [prev])
  for entry in config["layers"]:
    cfg = entry["config"]
    if entry["class_name"] == "InputLayer":
      shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
      layers.append(_input_layer(entry["name"], shape, dtype_name(cfg.get("dtype"))))
      continue
    calls = []
    for node in entry.get("inbound_nodes", []):
      if flavour == "keras3":
        calls.append((_refs_keras3(node["args"]), _refs_keras3(node.get("kwargs", {}))))
      else:  # tf_keras: [[name, node, tensor, kwargs], ...]; one entry is called bare
        refs = [Ref(*n[:3]) for n in node]
        kwargs = node[0][3] if len(node[0]) > 3 else {}
        calls.append(([refs[0]] if len(refs) == 1 else [refs], dict(kwargs)))
    layers.append(Layer(entry["name"], entry["class_name"], entry, calls,
                         init_defaults(type(model.get_layer(entry["name"])))))
  return Graph(config["name"], layers, _io_refs(config["input_layers"]),
                _io_refs(config["output_layers"]))




def dtype_name(dtype) -> Any:
  """A dtype policy as its name ("float32", "mixed_float16"); other values unchanged."""
  if isinstance(dtype, dict):
    return (dtype.get("config") or {}).get("name", "float32")
  return dtype


def init_defaults(cls) -> dict:
  """The default of every ``__init__`` parameter of ``cls`` and its bases."""
  out = {}
  for klass in reversed(cls.__mro__):
    init = klass.__dict__.get("__init__")
    if init is not None:
      out.update({n: p.default for n, p in inspect.signature(init).parameters.items()
                  if p.default is not p.empty})
  return out
