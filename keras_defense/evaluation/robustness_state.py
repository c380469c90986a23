"""Where a robustness evaluation keeps its per-image state: slices, shards, merge.

The runner (``robustness``) attacks the ``n`` test images in **slices** of
``slice_size`` consecutive images: every attack call, clean prediction and
post-attack prediction sees the images of one slice only, with a seed derived
from (seed, slice number) (``slice_seed``). An image's outcome therefore
depends on its own slice alone, never on which process ran the slice, and
``num_shards`` processes (``shard_index`` each, as any batch scheduler starts
them: a Kubernetes Indexed Job, a Slurm array) each take a contiguous block
of whole slices (``shard_images``) and write it into their own state,
``<run_dir>/shards/<i>-of-<n>/`` (its own ``run.json`` and ``state/``).
``combine`` then concatenates the shards' state into ``<run_dir>/state/``
exactly as one process would have written it, refusing incomplete or
mismatched shards; the runner resumes that (nothing left to attack) and the
report follows. With ``n <= slice_size`` there is one slice with the seed
itself: the same calls as ``attacks.autoattack.auto_attack``.

State files (each written atomically): ``state/clean.npz`` (``pred`` (n,),
``seconds``) and ``state/eps_<ε>/<k>_<attack>.npz`` (``robust`` bool (n,),
``broken_idx``, ``x_adv``, ``attacked``, ``outside_threat_model``,
``seconds``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

SHARDS = "shards"
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def save_npz(path: pathlib.Path, **arrays) -> None:
  """Writes ``arrays`` to ``path`` atomically (temporary file, fsync, rename)."""
  with io_utils.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def eps_dir(eps: float) -> str:
  return f"eps_{eps:.6g}"


def step_files(epsilons: Sequence[float], attacks: Sequence[str]) -> list[str]:
  """The state files of a finished run, relative to ``state/``."""
  return ["clean.npz"] + [f"{eps_dir(e)}/{k:02d}_{name}.npz"
                          for e in sorted(float(v) for v in epsilons)
                          for k, name in enumerate(attacks)]


def slices(n: int, slice_size: int) -> list[tuple[int, int]]:
  """``[(start, stop)]`` of the slices of ``n`` images, in order."""
  return [(s, min(n, s + slice_size)) for s in range(0, n, slice_size)]


def slice_seed(seed: int, number: int) -> int:
  """The attacks' seed for slice ``number``: ``seed`` itself for slice 0.

  Later slices get a 31-bit hash of (seed, number), so no two slices draw the
  same random starts and no slice's seed depends on the others.
  """
  if number == 0:
    return int(seed)
  digest = hashlib.sha256(f"keras_defense.slice/{int(seed)}/{int(number)}".encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1


def shard_images(n: int, slice_size: int, index: int, count: int) -> tuple[int, int]:
  """Images ``[start, stop)`` of shard ``index`` of ``count``: whole slices, contiguous.

  Raises:
    UserError: more shards than slices (a shard would have no image).
  """
  cuts = slices(n, slice_size)
  if count > len(cuts):
    raise UserError(f"`num_shards`={count} is more than the {len(cuts)} slices of "
                    f"`slice_size`={slice_size} images in {n} images: a shard would get no "
                    f"image. Fix: pass --num_shards<={len(cuts)}, or --slice_size<={n // count} "
                    f"in a new --run_dir.")
  first, last = index * len(cuts) // count, (index + 1) * len(cuts) // count
  return cuts[first][0], cuts[last - 1][1]


def shard_name(index: int, count: int) -> str:
  return f"{index}-of-{count}"


def shard_dir(run_dir: str | os.PathLike, index: int, count: int) -> pathlib.Path:
  return pathlib.Path(run_dir) / SHARDS / shard_name(index, count)


def shard_count(run_dir: str | os.PathLike) -> int:
  """The ``n`` of the ``<run_dir>/shards/<i>-of-<n>`` directories.

  Raises:
    UserError: no shard directory, or shards of different counts.
  """
  root = pathlib.Path(run_dir) / SHARDS
  counts = sorted({int(m.group(2)) for p in (root.iterdir() if root.is_dir() else [])
                   if (m := _SHARD_NAME.match(p.name))})
  if not counts:
    raise UserError(f"--merge found no shard under {str(root)!r}: run kd-evaluate "
                    f"--shard_index=i --num_shards=n with this --run_dir first.")
  if len(counts) > 1:
    raise UserError(f"{str(root)!r} holds shards of different --num_shards "
                    f"({', '.join(map(str, counts))}); merge only one split: move the others "
                    f"away.")
  return counts[0]


def recorded_settings(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The full config a shard of ``run_dir`` recorded (``run.json`` "settings")."""
  count = shard_count(run_dir)
  for i in range(count):
    path = shard_dir(run_dir, i, count) / "run.json"
    if path.is_file():
      settings = io_utils.read_json(path).get("settings")
      if settings:
        return settings
  raise UserError(f"no shard of {str(run_dir)!r} has a run.json yet: nothing to merge.")


def combine(run_dir: str | os.PathLike, *, identity: dict[str, Any], model_sha256: str,
            n: int, slice_size: int, epsilons: Sequence[float],
            attacks: Sequence[str]) -> str:
  """Concatenates every shard's state into ``<run_dir>/state``; returns their compute dtype.

  Args:
    run_dir: the run directory holding ``shards/<i>-of-<n>/``.
    identity: the merged run's ``RobustnessConfig.identity()`` (with the
      dataset's); each shard must have been bound to exactly it.
    model_sha256: the model's fingerprint; each shard must have attacked it.
    n: the number of test images.
    slice_size: images per slice.
    epsilons, attacks: the run's radii and the attack plan's names.

  Returns:
    The compute dtype the shards used (all the same).

  Raises:
    UserError: a shard missing, unfinished, bound to another configuration or
      model, or the shards disagreeing on the compute dtype; naming each.
  """
  count = shard_count(run_dir)
  needed = step_files(epsilons, attacks)
  problems, records, ranges = [], [], []
  for i in range(count):
    d = shard_dir(run_dir, i, count)
    name = shard_name(i, count)
    ranges.append(shard_images(n, slice_size, i, count))
    if not (d / "run.json").is_file():
      problems.append(f"shard {name} (images {ranges[-1][0]}-{ranges[-1][1] - 1}): not "
                      f"started (no {d / 'run.json'})")
      continue
    record = io_utils.read_json(d / "run.json")
    config = dict(record.get("config", {}))
    shard = config.pop("shard", None)
    if config != identity or record.get("model_sha256") != model_sha256:
      mine = dict(identity, model_sha256=model_sha256)
      theirs = dict(config, model_sha256=record.get("model_sha256"))
      diff = ", ".join(f"{k}={theirs.get(k)!r} (merge: {mine.get(k)!r})"
                       for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
      problems.append(f"shard {name}: another evaluation ({diff})")
      continue
    if shard != {"index": i, "count": count, "images": list(ranges[-1])}:
      problems.append(f"shard {name}: holds images {shard and shard.get('images')}, "
                      f"expected {list(ranges[-1])}")
      continue
    missing = [f for f in needed if not (d / "state" / f).is_file()]
    if missing:
      problems.append(f"shard {name}: unfinished, missing {', '.join(missing[:4])}"
                      + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                      + " (rerun it: it resumes)")
      continue
    records.append(record)
  if problems:
    raise UserError(f"cannot merge {str(run_dir)!r}: " + "; ".join(problems) + ".")
  dtypes = sorted({r.get("compute_dtype", "float32") for r in records})
  if len(dtypes) > 1:
    raise UserError(f"cannot merge {str(run_dir)!r}: the shards chose different compute "
                    f"dtypes ({', '.join(dtypes)}; --compute_dtype=auto times each machine). "
                    f"Fix: rerun them with --compute_dtype=float32 in a new --run_dir.")
  dirs = [shard_dir(run_dir, i, count) / "state" for i in range(count)]
  state = pathlib.Path(run_dir) / "state"
  for rel in needed:
    parts = [load_npz(d / rel) for d in dirs]
    if rel == "clean.npz":
      merged = {"pred": np.concatenate([p["pred"] for p in parts]),
                "seconds": np.float64(sum(float(p["seconds"]) for p in parts))}
    else:
      merged = {
          "robust": np.concatenate([p["robust"] for p in parts]),
          "broken_idx": np.concatenate([p["broken_idx"] + lo
                                        for p, (lo, _) in zip(parts, ranges)]).astype(np.int64),
          "x_adv": np.concatenate([p["x_adv"] for p in parts]),
          **{k: np.int64(sum(int(p[k]) for p in parts))
             for k in ("attacked", "outside_threat_model")},
          "seconds": np.float64(sum(float(p["seconds"]) for p in parts))}
    save_npz(state / rel, **merged)
  return dtypes[0]
