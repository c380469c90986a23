"""An attack batch size that fits in memory: available bytes over bytes per image.

``choose_batch_size(model, image_shape)`` measures what one more image costs
an attack step: it traces the compiled input-gradient step (the attacks'
inner step: logits, cross-entropy, gradient with respect to the images) for a
probe batch of 1 and of 2 images and sums the float tensors every op of the
two graphs outputs (recursing into the functions a SavedModel's call ops
name); the difference is the per-image cost. That sum counts every
intermediate of the forward and backward pass as if all were alive at once,
so it overestimates the peak (on purpose). Added to it: ``STATE_COPIES``
image-sized tensors per image the attack itself keeps (current, best,
gradient, momentum, start, their float64 checks on the host).

The budget is ``fraction`` of the memory available now: Linux's
``MemAvailable`` (``/proc/meminfo``, no psutil), lowered to the cgroup's
remaining limit (``memory.max - memory.current``, a container's or a Slurm
job's) when there is one. The result is capped at ``cap`` (kd-evaluate's
500: a small model keeps its batch size) and floored to a multiple of 8.

Example:
  >>> batch, details = choose_batch_size(model, (224, 224, 3))
  >>> details["per_image_bytes"], details["available_bytes"]
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from keras_defense.attacks import runtime
from keras_defense.util.compat import tf

STATE_COPIES = 16
_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def available_bytes(meminfo: str = "/proc/meminfo",
                    cgroup: str = "/sys/fs/cgroup") -> int | None:
  """Bytes a process can still allocate here, or None if Linux does not say.

  ``MemAvailable`` from ``meminfo``, lowered to the cgroup v2 limit left
  (``memory.max`` - ``memory.current``) when one is set.
  """
  found = None
  try:
    for line in pathlib.Path(meminfo).read_text().splitlines():
      if line.startswith("MemAvailable:"):
        found = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    found = None
  try:
    limit = pathlib.Path(cgroup, "memory.max").read_text().strip()
    used = int(pathlib.Path(cgroup, "memory.current").read_text().strip())
    if limit != "max":
      left = max(0, int(limit) - used)
      found = left if found is None else min(found, left)
  except (OSError, ValueError):
    pass
  return found


def _graph_bytes(graph: Any, seen: set) -> int:
  """Bytes of the float outputs of every op of ``graph`` and of the functions it calls."""
  total = 0
  for op in graph.get_operations():
    for out in op.outputs:
      if out.dtype.is_floating and out.shape.is_fully_defined():
        total += out.shape.num_elements() * out.dtype.size
    if op.type in _CALL_OPS:
      name = op.get_attr("f").name
      if name in seen:
        continue
      seen.add(name)
      fn = graph._get_function(name)  # pylint: disable=protected-access
      inner = getattr(fn, "graph", None)
      if inner is not None:
        total += _graph_bytes(inner, seen)
  return total


def _step_bytes(model: Any, image_shape: Sequence[int], batch: int) -> int:
  logits_fn = runtime.logits_function(model, "float32")
  grad = tf.function(lambda x: runtime.ce_input_gradient(logits_fn, x))
  concrete = grad.get_concrete_function(
      tf.TensorSpec([batch, *image_shape], tf.float32))
  return _graph_bytes(concrete.graph, set())


def per_image_bytes(model: Any, image_shape: Sequence[int]) -> int:
  """Bytes one more image costs an attack step (see the module docstring)."""
  shape = tuple(int(d) for d in image_shape)
  image = 4 * int(tf.TensorShape(shape).num_elements())
  activations = _step_bytes(model, shape, 2) - _step_bytes(model, shape, 1)
  return max(activations, 0) + STATE_COPIES * image


def choose_batch_size(model: Any, image_shape: Sequence[int], *, cap: int = 500,
                      fraction: float = 0.5,
                      available: int | None = None) -> tuple[int, dict[str, Any]]:
  """The largest attack batch of at most ``cap`` whose step fits ``fraction`` of memory.

  Args:
    model: Keras model or callable, float32 images (N, H, W, C) -> logits.
    image_shape: (H, W, C).
    cap: the batch size used when memory allows it.
    fraction: share of the available memory the attack's step may take.
    available: bytes available (default ``available_bytes()``; None there:
      ``cap`` is used).

  Returns:
    ``(batch_size, details)``: details holds ``per_image_bytes``,
    ``available_bytes``, ``fraction``, ``cap`` and ``limited_by``
    ("memory" or "cap"), for results.json.
  """
  per_image = per_image_bytes(model, image_shape)
  available = available_bytes() if available is None else int(available)
  if available is None:
    batch, limited = cap, "cap (no MemAvailable)"
  else:
    fit = int(fraction * available // max(per_image, 1))
    batch = max(1, min(cap, fit if fit < 8 else fit - fit % 8))
    limited = "memory" if fit < cap else "cap"
  return batch, {"batch_size": batch, "per_image_bytes": int(per_image),
                 "available_bytes": available, "fraction": fraction, "cap": cap,
                 "limited_by": limited}
