"""tf.distribute strategies by name: one device, mirrored replicas, or a cluster.

``make_strategy("default")`` is TensorFlow's default (no-op) strategy, so code
that always enters ``strategy.scope()`` behaves exactly as without one.
``"mirrored"`` replicates over all local GPUs or, without GPUs, over N logical
CPU devices (useful for tests and for measuring); ``"multi_worker"`` is
``MultiWorkerMirroredStrategy`` configured by the ``TF_CONFIG`` environment
variable. Strategies are built once per process and cached (a second
``MultiWorkerMirroredStrategy`` in one process cannot reconfigure collectives).

In a multi-worker run every worker executes the same program; only the chief
may write artifacts. ``output_path`` maps a path to a per-worker temporary
location for the others (TF's ``workertemp_<task_id>`` convention, as Keras'
``BackupAndRestore`` and ``TensorBoard`` do), and ``is_chief`` says which one
this process is. See docs/DISTRIBUTED.md.

Example:
  >>> strategy = make_strategy("mirrored", num_cpu_devices=2)
  >>> with strategy.scope():
  ...   model = build_model(...); model.compile(...)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

from keras_defense.models import export
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker")

_CACHE: dict[tuple, tf.distribute.Strategy] = {}


class StrategyError(UserError):
  """A strategy cannot be built as asked (bad name, devices, TF_CONFIG)."""


def configure_cpu_devices(num_cpu_devices: int) -> list[str]:
  """Splits the physical CPU into ``num_cpu_devices`` logical devices.

  Must run before TensorFlow initialises its devices (before the first op or
  device listing in the process). Calling it again with the same number is a
  no-op.

  Args:
    num_cpu_devices: number of logical CPU devices, >= 1.

  Returns:
    The logical CPU device names.

  Raises:
    StrategyError: ``num_cpu_devices`` < 1, or the devices are already
      initialised with a different number.
  """
  if isinstance(num_cpu_devices, bool) or not isinstance(num_cpu_devices, int):
    raise StrategyError(f"`num_cpu_devices` must be an int >= 1; got {num_cpu_devices!r}.")
  if num_cpu_devices < 1:
    raise StrategyError(f"`num_cpu_devices` must be >= 1; got {num_cpu_devices}.")
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if not current or len(current) != num_cpu_devices:
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
    except RuntimeError:
      have = len(tf.config.list_logical_devices("CPU"))
      if have != num_cpu_devices:
        raise StrategyError(
            f"cannot split the CPU into {num_cpu_devices} logical devices: TensorFlow "
            f"has already initialised its devices ({have} CPU device(s)). Build the "
            f"strategy before any TensorFlow op runs in this process, or run in a "
            f"fresh process.") from None
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def _check_tf_config() -> dict:
  raw = os.environ.get("TF_CONFIG")
  fix = ('Set TF_CONFIG on every worker, e.g. {"cluster": {"worker": '
         '["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}} '
         "(see docs/DISTRIBUTED.md).")
  if not raw:
    raise StrategyError(f"--strategy=multi_worker needs the TF_CONFIG environment "
                        f"variable; it is not set. {fix}")
  try:
    config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise StrategyError(f"TF_CONFIG is not valid JSON ({e.msg} at char {e.pos}). "
                        f"{fix}") from None
  cluster = config.get("cluster") if isinstance(config, dict) else None
  task = config.get("task") if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
    raise StrategyError(f"TF_CONFIG must have a 'cluster' with a 'worker' list; got "
                        f"{raw!r}. {fix}")
  if not isinstance(task, dict) or task.get("type") not in cluster:
    raise StrategyError(f"TF_CONFIG 'task' must name a job of the cluster "
                        f"({', '.join(cluster)}) and an index; got {task!r}. {fix}")
  index = task.get("index")
  if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
    raise StrategyError(f"TF_CONFIG task index must be in [0, "
                        f"{len(cluster[task['type']])}); got {index!r}. {fix}")
  return config


def make_strategy(name: str = "default", *,
                  num_cpu_devices: int | None = None) -> tf.distribute.Strategy:
  """Returns the strategy called ``name`` (built once per process).

  Args:
    name: one of ``STRATEGIES``: "default" (one device, today's behaviour),
      "mirrored" (all local GPUs; without GPUs, ``num_cpu_devices`` logical CPU
      devices, default 2), "multi_worker" (``MultiWorkerMirroredStrategy``
      from ``TF_CONFIG``).
    num_cpu_devices: logical CPU devices for "mirrored" without GPUs; for
      "multi_worker", logical CPU devices per worker is not supported by TF's
      collective CPU path, so it must be None there.

  Returns:
    A ``tf.distribute.Strategy``.

  Raises:
    StrategyError: unknown name, devices already initialised, ``TF_CONFIG``
      missing or invalid, or ``num_cpu_devices`` with a strategy that takes none.
  """
  if name not in STRATEGIES:
    raise StrategyError(f"`strategy` must be one of {', '.join(STRATEGIES)}; got {name!r}.")
  if num_cpu_devices is not None and name != "mirrored":
    raise StrategyError(f"`num_cpu_devices` only applies to --strategy=mirrored; got "
                        f"num_cpu_devices={num_cpu_devices} with strategy {name!r}.")
  if name == "default":
    return tf.distribute.get_strategy()
  key = (name, num_cpu_devices)
  if key in _CACHE:
    return _CACHE[key]
  if name == "mirrored":
    if num_cpu_devices is None and tf.config.list_physical_devices("GPU"):
      strategy = tf.distribute.MirroredStrategy()
    else:
      devices = configure_cpu_devices(2 if num_cpu_devices is None else num_cpu_devices)
      strategy = tf.distribute.MirroredStrategy(devices)
  else:
    _check_tf_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  _CACHE[key] = strategy
  return strategy


def scope(strategy: tf.distribute.Strategy):
  """``strategy.scope()``, or no context at all for the default strategy.

  "default" enters nothing, so it runs exactly the code that ran before
  strategies existed (checked: same loss, accuracy and attack rows).
  """
  if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
    return contextlib.nullcontext()
  return strategy.scope()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True unless this process is a non-chief worker of a multi-worker strategy."""
  return bool(strategy.extended.should_checkpoint)


def task_id(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, "cluster_resolver", None)
  return int(resolver.task_id) if resolver is not None and resolver.task_id is not None else 0


def output_path(path: str | os.PathLike | None, strategy: tf.distribute.Strategy
                ) -> str | None:
  """Where this process writes ``path``: itself on the chief, else a temp sibling.

  A non-chief worker writes to ``<parent>/workertemp_<task_id>/<name>`` (TF's
  convention), so it can run the same saving code (SavedModel saving may need
  every worker's collectives) without touching the chief's artifacts.
  """
  if path is None or is_chief(strategy):
    return None if path is None else str(path)
  p = pathlib.Path(path)
  return str(p.parent / f"workertemp_{task_id(strategy)}" / p.name)


def remove_worker_output(path: str | os.PathLike | None,
                         strategy: tf.distribute.Strategy) -> None:
  """Deletes what ``output_path`` gave a non-chief worker; no-op on the chief."""
  if path is None or is_chief(strategy):
    return
  shutil.rmtree(pathlib.Path(output_path(path, strategy)).parent, ignore_errors=True)


def export_saved_model(model, export_dir: str | os.PathLike,
                       strategy: tf.distribute.Strategy, *,
                       version: int | None = None, provenance: dict | None = None) -> str:
  """``export.export_saved_model`` from every worker; only the chief's copy is kept.

  Every worker saves (SavedModel saving may use collectives), the others into
  ``output_path``'s temporary location, which is deleted; all then wait for
  each other (``barrier``).

  Returns:
    The chief's exported path (every worker reports it: same version, same
    starting state).
  """
  saved = export.export_saved_model(model, output_path(export_dir, strategy),
                                    version=version, provenance=provenance)
  remove_worker_output(export_dir, strategy)
  barrier(strategy)
  return str(pathlib.Path(export_dir) / pathlib.Path(saved).name)


def shard_by_data(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
                  ) -> tf.data.Dataset:
  """Asks for element-wise (DATA) auto-sharding across workers.

  The tfds/in-memory pipelines here have no file-level sharding to offer, so
  the default (FILE, falling back to DATA with a warning) is made explicit.
  Single-process strategies are unaffected.
  """
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)
  return dataset


def barrier(strategy: tf.distribute.Strategy) -> None:
  """Waits until every replica of every worker gets here (an all-reduce of ones).

  Used after the chief's exports, so a worker that next reads them (the
  experiment's next stage) finds them renamed into place (shared filesystem).
  """
  if strategy.num_replicas_in_sync > 1:
    strategy.reduce(tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.constant(1.0)), axis=None)
