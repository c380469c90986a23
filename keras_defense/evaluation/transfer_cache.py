"""Transfer examples crafted once on a surrogate and reused by every artifact judged with them.

A transfer attack (``black_box``'s ``transfer-*`` members) crafts its examples
on the surrogate alone: for image *i*, APGD on the float parent gives the same
kind of example whichever ``.tflite`` is judged on it afterwards. The
deployment table judges five artifacts of one parent on the same 1,000 images,
and without a cache each row crafted the parent's APGD-T examples again, the
most expensive step of its row (about as long as the parent's own white-box
evaluation).

``cached(fn, directory, surrogate_sha256, name, norm)`` wraps an attack
function of the runner's signature. Examples are stored per image, keyed by a
SHA-1 of the image's float32 bytes and its label, in
``<directory>/<surrogate SHA-256[:16]>/<name>-<norm>-eps<ε>-seed<seed>.npz`` (the
SHA-256 also covers the pixel convention when it is not [0, 1], ``surrogate_key``);
a call crafts only the images the file lacks (in one call, as the runner
would) and returns the stored example for the others. An example is reused
only for the same surrogate file (its SHA-256) and pixel convention, attack,
norm, ε and seed, so a retrained parent or another seed never sees another
model's examples. Which images were crafted together (hence the random starts
they drew) depends on the order the artifacts ran; every example is still the attack's own output on
the surrogate for that image.

Example:
  >>> fn = cached(fn, "runs/deploy/M1/transfer_cache", sha, "transfer-apgd-t", "linf")
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Callable

import numpy as np

from keras_defense.evaluation import robustness_state as state_lib

AttackFn = Callable[..., np.ndarray]


def image_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """A 20-byte SHA-1 per image over its float32 pixels and int64 label: shape (n, 20), uint8."""
  x = np.ascontiguousarray(x, np.float32)
  y = np.asarray(y, np.int64)
  return np.array([np.frombuffer(hashlib.sha1(xi.tobytes() + yi.tobytes()).digest(), np.uint8)
                   for xi, yi in zip(x, y)], np.uint8).reshape(len(x), 20)


def surrogate_key(sha256: str, pixels) -> str:
  """The surrogate's SHA-256, or, when its pixel convention is not [0, 1], a SHA-256 of both:
  the same file under another --mean/--std is another function of the images."""
  if pixels.is_identity:
    return sha256
  return hashlib.sha256((sha256 + json.dumps(pixels.to_dict(), sort_keys=True)).encode()
                        ).hexdigest()


def cache_path(directory: str | pathlib.Path, surrogate_sha256: str, name: str, norm: str,
               epsilon: float, seed: int) -> pathlib.Path:
  """The file holding ``name``'s examples on that surrogate at (norm, ε, seed)."""
  return (pathlib.Path(directory) / surrogate_sha256[:16]
          / f"{name}-{norm}-eps{float(epsilon):.6g}-seed{int(seed)}.npz")


def cached(fn: AttackFn, directory: str | pathlib.Path, surrogate_sha256: str, name: str,
           norm: str) -> AttackFn:
  """``fn`` with its examples stored in and read from ``directory`` (see the module doc)."""

  def run(target, x, y, epsilon, *, seed, batch_size, compute_dtype):
    path = cache_path(directory, surrogate_sha256, name, norm, epsilon, seed)
    keys = image_keys(x, y)
    if path.is_file():
      stored = state_lib.load_npz(path)
      old_keys, old_adv = stored["keys"], stored["x_adv"]
    else:
      old_keys, old_adv = np.zeros((0, 20), np.uint8), np.zeros((0, *x.shape[1:]), np.float32)
    index = {k.tobytes(): i for i, k in enumerate(old_keys)}
    where = np.array([index.get(k.tobytes(), -1) for k in keys], np.int64)
    out = np.empty(x.shape, np.float32)
    hit = where >= 0
    out[hit] = old_adv[where[hit]]
    miss = np.flatnonzero(~hit)
    if len(miss):
      new = np.asarray(fn(target, x[miss], y[miss], epsilon, seed=seed, batch_size=batch_size,
                          compute_dtype=compute_dtype), np.float32)
      out[miss] = new
      # The same image twice in one call is stored once.
      _, first = np.unique(keys[miss], axis=0, return_index=True)
      state_lib.save_npz(path, keys=np.concatenate([old_keys, keys[miss][first]]),
                         x_adv=np.concatenate([old_adv, new[first]]))
    return out
  return run
