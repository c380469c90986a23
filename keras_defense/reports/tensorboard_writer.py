"""TensorBoard summaries of an attack experiment: scalars, image grids, text.

Written with ``tf.summary`` (TF2 summaries: scalars and images are stored as
tensors with the ``scalars`` / ``images`` / ``text`` plugin metadata, which is
what TensorBoard's plugins read). The event files are written into a temporary
directory that is renamed into place, so a crash never leaves a half-written
log directory and a rerun replaces the previous one instead of adding a second
event file next to it.

Example:
  write_summaries("run/tensorboard/report",
                  scalars=[("success_rate/grey_box/m2/fgsm_untargeted", 300, 0.05)],
                  images=[("adversarial_examples/m2", image_grid([x, x_adv]))],
                  texts=[("report", markdown)])
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from keras_defense.util import io_utils
from keras_defense.util.compat import tf


def write_summaries(logdir: str | os.PathLike, *,
                    scalars: Iterable[tuple[str, int, float]] = (),
                    images: Iterable[tuple[str, np.ndarray]] = (),
                    pngs: Iterable[tuple[str, str | os.PathLike]] = (),
                    texts: Iterable[tuple[str, str]] = ()) -> str:
  """Writes one event file under ``logdir`` (replacing what was there).

  Args:
    logdir: the log directory, e.g. ``<run_dir>/tensorboard/report``.
    scalars: (tag, step, value) triples.
    images: (tag, image) pairs; image is float [H, W, C] or [k, H, W, C] in
      [0, 1], C in {1, 3}.
    pngs: (tag, path of a PNG file) pairs, logged as images (e.g. the plots).
    texts: (tag, markdown text) pairs.

  Returns:
    ``logdir`` as a string.

  Raises:
    ValueError: an image of the wrong rank or channel count.
  """
  scalars, images, pngs, texts = list(scalars), list(images), list(pngs), list(texts)
  for tag, image in images:
    image = np.asarray(image)
    if image.ndim not in (3, 4) or image.shape[-1] not in (1, 3):
      raise ValueError(f"image {tag!r} must be [H, W, C] or [k, H, W, C] with C in (1, 3); "
                       f"got shape {image.shape}.")
  with io_utils.atomic_path(logdir, directory=True) as tmp:
    writer = tf.summary.create_file_writer(tmp)
    try:
      with writer.as_default():
        for tag, step, value in scalars:
          tf.summary.scalar(tag, float(value), step=int(step))
        for tag, image in images:
          image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
          if image.ndim == 3:
            image = image[None]
          tf.summary.image(tag, image, step=0, max_outputs=int(image.shape[0]))
        for tag, path in pngs:
          with open(path, "rb") as f:
            decoded = tf.io.decode_png(f.read(), channels=3)
          tf.summary.image(tag, decoded[None], step=0)
        for tag, text in texts:
          tf.summary.text(tag, text, step=0)
      writer.flush()
    finally:
      writer.close()
  return str(logdir)


def image_grid(rows: Sequence[np.ndarray], *, pad: int = 1) -> np.ndarray:
  """Tiles image batches into one image: one grid row per batch.

  Args:
    rows: batches, each float [k, H, W, C] in [0, 1], all of the same H, W, C;
      shorter batches are padded with white tiles.
    pad: white pixels between tiles.

  Returns:
    float32 [R·(H+pad)-pad, K·(W+pad)-pad, C] in [0, 1].

  Raises:
    ValueError: no rows, or batches with different image shapes.
  """
  rows = [np.asarray(r, np.float32) for r in rows]
  if not rows:
    raise ValueError("image_grid needs at least one row of images; got none.")
  shape = rows[0].shape[1:]
  if any(r.ndim != 4 or r.shape[1:] != shape for r in rows):
    raise ValueError(f"all image rows must be [k, H, W, C] of one shape; got "
                     f"{[r.shape for r in rows]}.")
  h, w, c = shape
  k = max(r.shape[0] for r in rows)
  grid = np.ones((len(rows) * (h + pad) - pad, k * (w + pad) - pad, c), np.float32)
  for i, r in enumerate(rows):
    for j, img in enumerate(r):
      grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = img
  return np.clip(grid, 0.0, 1.0)
