"""The ops of a SavedModel that touch the outside world, found before it runs.

A SavedModel is a program: besides computing logits its graph can read and
write files, print, log, call Python or remote functions, or read datasets
from disk, and any of that runs the moment a loader initializes it or a
signature is called. ``check_saved_model`` reads ``saved_model.pb`` (nothing
is loaded or run) and refuses a model that holds such an op, unless the op is
allowed by name (``--allow_ops=WriteFile,...``).

What is read: every MetaGraph's top-level graph and its whole function
library: every concrete function, the functions they call
(``PartitionedCall``/``StatefulPartitionedCall``), ``If``/``Case``/``While``
branch and body functions, and functions no signature reaches (a loader can
still call them through the object graph). TensorFlow's own
``saved_model_cli scan`` is not enough: it reads one MetaGraph's ops through
``meta_graph.ops_used_by_graph_def``, which follows ``PartitionedCall`` and
``StatefulPartitionedCall`` only, so an op inside a ``tf.cond`` branch of a
``tf.function`` is missed; its denylist (``PrintV2``, ``ReadFile``,
``WriteFile``) is imported here and extended below, each addition with its
reason.

The loader's own checkpoint machinery is not refused: ``tf.saved_model.save``
writes a save and a restore function (``__inference__traced_save_*``,
``__inference__traced_restore_*``, full of ``SaveV2``, ``RestoreV2``,
``MergeV2Checkpoints``) into every SavedModel, reached from the graph nodes
that the MetaGraph's ``saver_def`` names. Exactly those checkpoint ops, in
exactly the nodes and functions only ``saver_def`` reaches, are exempt; any
other denied op there is still refused, and a checkpoint op anywhere else is.

A scan is not a sandbox: it knows op names, not what a custom kernel or a
future TensorFlow op does. Run models you do not trust in a sandbox anyway
(docs/RELIABILITY.md, "Running models you did not write").

Example:
  >>> check_saved_model("saved_models/mnist_m0/1")  # passes: returns None
  >>> [f.op for f in scan_saved_model(path)]
  ['WriteFile']
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable, Sequence

from absl import flags as _absl_flags

from keras_defense.util.compat import tf  # noqa: F401  (TensorFlow after the Keras choice)
from keras_defense.util.errors import UserError

from tensorflow.core.protobuf import saved_model_pb2

# TensorFlow's denylist lives in the saved_model_cli tool, whose import also
# defines ~28 absl command-line flags (--dir, --all, --inputs, --outdir, ...)
# in the global FLAGS: every kd-* binary would then accept them silently. The
# flags it added are removed again; only the set is used.
_FLAGS_BEFORE = frozenset(_absl_flags.FLAGS)
from tensorflow.python.tools import saved_model_cli as _saved_model_cli  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
for _name in frozenset(_absl_flags.FLAGS) - _FLAGS_BEFORE:  # none if imported before
  delattr(_absl_flags.FLAGS, _name)

TF_DENYLIST = frozenset(_saved_model_cli._OP_DENYLIST)  # pylint: disable=protected-access

# Op -> what it does to the outside world (in the refusal message), written
# as (what it does, the ops that do it).
_EXTENSION_GROUPS = (
    # Files, beside TensorFlow's ReadFile/WriteFile: listing, memory-mapping,
    # file-system settings, the TF1 queue readers and a file-fed input op.
    ("lists files", "MatchingFiles"),
    ("memory-maps a file", "ImmutableConst"),
    ("changes file-system settings", "FileSystemSetConfiguration"),
    ("reads files", "RecordInput", "WholeFileReader", "WholeFileReaderV2",
     "TextLineReader", "TextLineReaderV2", "TFRecordReader", "TFRecordReaderV2",
     "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "LMDBReader"),
    # Checkpoints: reading or writing one outside the loader's own restore
    # (exempt in saver_def's functions, see the module docstring).
    ("writes a checkpoint", "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints"),
    ("reads a checkpoint", "Restore", "RestoreV2", "RestoreSlice",
     "LoadAndRemapMatrix"),
    ("reads vocabulary files", "GenerateVocabRemapping"),
    ("reads a text file", "InitializeTableFromTextFile",
     "InitializeTableFromTextFileV2"),
    # Printing and logging: the TF1 Print, summary writers (event files or a
    # database), and debugger ops that dump tensors to a file:// or grpc:// URL.
    ("prints", "Print"),
    ("writes event files", "CreateSummaryFileWriter"),
    ("writes a summary database", "CreateSummaryDbWriter"),
    ("writes a summary", "WriteSummary", "WriteRawProtoSummary",
     "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary",
     "WriteAudioSummary", "WriteGraphSummary", "ImportEvent",
     "FlushSummaryWriter"),
    ("dumps tensors to a debug URL", "DebugIdentity", "DebugIdentityV2",
     "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary"),
    # Code outside the graph: Python functions of the running process, and
    # functions run on another (remote) device or task.
    ("calls Python", "PyFunc", "PyFuncStateless", "EagerPyFunc"),
    ("calls a remote function", "RemoteCall"),
    # tf.data ops that read or write files, a database or the network.
    ("reads files", "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset",
     "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2", "CSVDataset",
     "CSVDatasetV2", "ExperimentalCSVDataset", "LMDBDataset",
     "ExperimentalLMDBDataset", "LoadDataset", "SnapshotDatasetReader",
     "SnapshotNestedDatasetReader", "SnapshotChunkDataset"),
    ("reads a database", "SqlDataset", "ExperimentalSqlDataset"),
    ("lists files", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
     "ListSnapshotChunksDataset"),
    ("writes files", "SaveDataset", "SaveDatasetV2", "DistributedSave",
     "DatasetToTFRecord", "ExperimentalDatasetToTFRecord"),
    ("reads and writes files", "SnapshotDataset", "SnapshotDatasetV2"),
    # A cache's file name is a runtime tensor ("" caches in memory): not
    # decidable from the graph, so refused like a file write.
    ("may write cache files", "CacheDataset", "CacheDatasetV2"),
    ("reads from the network", "DataServiceDataset", "DataServiceDatasetV2",
     "DataServiceDatasetV3", "DataServiceDatasetV4"),
)
_EXTENSIONS = {op: what for what, *ops in _EXTENSION_GROUPS for op in ops}
_TF_REASONS = {"ReadFile": "reads a file", "WriteFile": "writes a file", "PrintV2": "prints"}

# Every op refused unless allowed, and what it does.
DENYLIST: dict[str, str] = {
    **{op: _TF_REASONS.get(op, "flagged by saved_model_cli scan") for op in TF_DENYLIST},
    **_EXTENSIONS}

# The checkpoint ops of tf.saved_model.save's own save/restore functions.
SAVER_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints",
                       "Restore", "RestoreV2", "RestoreSlice"})

# How to allow ops, in the refusal: kd-evaluate's flag, or the library argument
# for loaders no binary flag reaches yet.
FIX_FLAG = "pass --allow_ops={ops}"
FIX_LIBRARY = ("pass --allow_ops={ops} to kd-evaluate, or allow_ops=[{quoted}] to "
               "keras_defense.load_model (kd-train, kd-prune, kd-augment, kd-experiment and "
               "kd-sweep have no override)")
_DOCS = 'docs/RELIABILITY.md, "Running models you did not write"'
_GRAPH = "<top-level graph>"


class UnsafeModelError(UserError):
  """A SavedModel holds ops that touch the outside world and were not allowed."""


class UnreadableModelError(UserError):
  """saved_model.pb is missing or does not parse (the loaders say "corrupt")."""


@dataclasses.dataclass(frozen=True)
class Finding:
  """One denied op in a SavedModel.

  Attributes:
    op: the op type, e.g. ``WriteFile``.
    what: what it does, e.g. "writes a file".
    function: the library function holding it (``"<top-level graph>"`` for a
      node of a MetaGraph's graph itself).
    node: the node's name inside that function or graph.
    signatures: the signatures whose call reaches it (``__saved_model_init_op``
      runs at load time); empty if none does.
  """
  op: str
  what: str
  function: str
  node: str
  signatures: tuple[str, ...]


def _tensor_node(name: str) -> str:
  """'^a' / 'a:0' / 'a' -> 'a' (a graph input or a signature's tensor name)."""
  return name.lstrip("^").split(":")[0]


def _called(node, library: dict) -> list[str]:
  """Library functions a node calls: its op type, and every function-valued attr.

  Covers PartitionedCall/StatefulPartitionedCall (``f``), If/StatelessIf
  (``then_branch``/``else_branch``), While (``cond``/``body``), Case
  (``branches``, a list) and any other op taking functions.
  """
  names = [node.op] if node.op in library else []
  for attr in node.attr.values():
    if attr.HasField("func"):
      names.append(attr.func.name)
    names.extend(f.name for f in attr.list.func)
  return [n for n in names if n in library]


def _closure(functions: Iterable[str], library: dict) -> set[str]:
  """The functions given and every function they call, transitively."""
  seen, todo = set(), list(functions)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      for node in library[name].node_def:
        todo.extend(_called(node, library))
  return seen


def _upstream(graph_nodes: dict, roots: Iterable[str]) -> set[str]:
  """Graph node names feeding ``roots`` (data and control inputs), roots included."""
  seen, todo = set(), [_tensor_node(r) for r in roots if r]
  while todo:
    name = todo.pop()
    if name in graph_nodes and name not in seen:
      seen.add(name)
      todo.extend(_tensor_node(i) for i in graph_nodes[name].input)
  return seen


def _scan_meta_graph(meta, denylist) -> list[Finding]:
  graph = meta.graph_def
  library = {f.signature.name: f for f in graph.library.function}
  nodes = {n.name: n for n in graph.node}

  def functions_of(node_names):
    return _closure([f for n in node_names for f in _called(nodes[n], library)], library)

  saver = meta.saver_def
  saver_nodes = _upstream(nodes, [saver.save_tensor_name, saver.restore_op_name,
                                  saver.filename_tensor_name])
  # A function is the saver's only if nothing but saver_def's nodes reaches it.
  saver_functions = functions_of(saver_nodes) - functions_of(set(nodes) - saver_nodes)
  reach = {}
  for key, sig in meta.signature_def.items():
    for fn in functions_of(_upstream(nodes, [t.name for t in sig.outputs.values()])):
      reach.setdefault(fn, set()).add(key)

  findings = []

  def check(node, function, exempt):
    if node.op in denylist and not (exempt and node.op in SAVER_OPS):
      findings.append(Finding(op=node.op, what=denylist[node.op], function=function,
                              node=node.name,
                              signatures=tuple(sorted(reach.get(function, ())))))

  for node in graph.node:
    check(node, _GRAPH, node.name in saver_nodes)
  for name, fn in library.items():
    for node in fn.node_def:
      check(node, name, name in saver_functions)
  return findings


def _read(path: pathlib.Path):
  pb = path / "saved_model.pb"
  if not pb.is_file():
    raise UnreadableModelError(f"model path {str(path)!r} is not a SavedModel (no "
                               f"saved_model.pb in it).")
  proto = saved_model_pb2.SavedModel()
  try:
    proto.ParseFromString(pb.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  (a corrupt protobuf)
    # Fail closed: refused unscanned (tf.saved_model.load parses it the same way).
    raise UnreadableModelError(f"could not load the model at {str(path)!r} (corrupt "
                               f"saved_model.pb): {type(e).__name__}: {e}") from e
  return proto


def scan_saved_model(path: str | os.PathLike, *,
                     denylist: dict[str, str] | None = None) -> list[Finding]:
  """Lists the denied ops of a SavedModel, reading saved_model.pb only (nothing runs).

  Args:
    path: a SavedModel directory.
    denylist: op -> what it does; default ``DENYLIST``.

  Returns:
    One ``Finding`` per denied node, in every MetaGraph's graph and function
    library (the loader's own checkpoint ops excepted); empty if none.

  Raises:
    UnreadableModelError: no saved_model.pb, or one that does not parse.
  """
  denylist = DENYLIST if denylist is None else denylist
  proto = _read(pathlib.Path(path))
  return [f for meta in proto.meta_graphs for f in _scan_meta_graph(meta, denylist)]


def op_types(path: str | os.PathLike) -> frozenset[str]:
  """Every op type in a SavedModel's graphs and function libraries (read, nothing runs).

  E.g. ``"FakeQuantWithMinMaxVars" in op_types(path)`` tells a tfmot
  quantization-aware (QAT) model from a float one.

  Raises:
    UnreadableModelError: no saved_model.pb, or one that does not parse.
  """
  proto = _read(pathlib.Path(path))
  return frozenset(n.op for meta in proto.meta_graphs
                   for n in [*meta.graph_def.node,
                             *(d for f in meta.graph_def.library.function for d in f.node_def)])


def _describe(findings: Sequence[Finding], limit: int = 3) -> str:
  by_op: dict[str, list[Finding]] = {}
  for f in findings:
    by_op.setdefault(f.op, []).append(f)
  parts = []
  for op, fs in sorted(by_op.items()):
    places = []
    for f in fs:
      where = f"function {f.function!r}" if f.function != _GRAPH else f"graph node {f.node!r}"
      if f.signatures:
        sigs = ", ".join(repr(s) for s in f.signatures)
        where += f" (called by signature{'s' if len(f.signatures) > 1 else ''} {sigs})"
      if where not in places:
        places.append(where)
    more = f" and {len(places) - limit} more" if len(places) > limit else ""
    parts.append(f"{op} ({fs[0].what}) in {', '.join(places[:limit])}{more}")
  return "; ".join(parts)


def check_saved_model(path: str | os.PathLike, *, allow_ops: Sequence[str] = (),
                      fix: str = FIX_FLAG) -> None:
  """Refuses a SavedModel whose graph touches the outside world, before it is loaded.

  Args:
    path: a SavedModel directory.
    allow_ops: op types to let through (the user's explicit, per-op
      ``--allow_ops``), e.g. ``("WriteFile",)``.
    fix: how the caller's user allows ops, with ``{ops}`` for their
      comma-separated names (``FIX_FLAG``: kd-evaluate's flag).

  Raises:
    UnsafeModelError: the model holds a denied op not in ``allow_ops``; the
      message names each op, the function it sits in and the flag to allow it.
    UnreadableModelError: no saved_model.pb, or one that does not parse.
  """
  allowed = {str(a).strip() for a in allow_ops}
  findings = [f for f in scan_saved_model(path) if f.op not in allowed]
  if findings:
    ops = ",".join(sorted({f.op for f in findings} | (allowed & set(DENYLIST))))
    raise UnsafeModelError(
        f"model {str(path)!r} refused: it calls {_describe(findings)}. A model is a "
        f"program and keras-defense does not run one that touches files, prints or calls "
        f"out unless told to. If you trust it, "
        f"{fix.format(ops=ops, quoted=', '.join(repr(o) for o in ops.split(',')))} "
        f"(a scan is not a sandbox: see {_DOCS}).")
