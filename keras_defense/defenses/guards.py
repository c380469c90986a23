"""The per-epoch guards of the trained defenses: measure on held-out images, keep the best.

``RobustAccuracyGuard`` measures PGD robust accuracy on a held-out validation
slice after every epoch, keeps the best epoch's weights on disk and warns when
robust accuracy collapses (catastrophic overfitting, Wong et al. 2020).
``CertifiedAccuracyGuard`` is the same guard measuring IBP-certified accuracy
(certified training). ``defenses.trainer.DefenseSetup`` hands them to
``training.train`` as callbacks.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import numpy as np

from keras_defense.certify import bounds as cert_bounds
from keras_defense.util import io_utils
from keras_defense.util.compat import keras

GUARD_STEPS = 10  # PGD-10 for the per-epoch check
COLLAPSE_FRACTION = 0.5  # warn when robust accuracy < half the best so far


def robust_accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, epsilon: float, *,
                    steps: int = GUARD_STEPS, seed: int = 0) -> float:
  """Accuracy of ``model`` under L-inf PGD-``steps`` (step 2.5 eps / steps, random start)."""
  from keras_defense import attacks  # pylint: disable=g-import-not-at-top
  x_adv = attacks.pgd(model, x, y, epsilon, step_size=2.5 * epsilon / steps, steps=steps,
                      seed=seed)
  pred = np.argmax(model.predict(x_adv, batch_size=1000, verbose=0), axis=-1)
  return float(np.mean(pred == y))


class RobustAccuracyGuard(keras.callbacks.Callback):
  """Per-epoch PGD robust accuracy on held-out images; keeps the best weights.

  Put it *before* ``BackupAndRestore`` in the callback list: epoch ``e``'s
  measurement and best weights are on disk before its checkpoint, so a run
  killed at any point and resumed keeps the same history and best epoch as an
  uninterrupted one. Adds ``val_pgd_accuracy`` to the epoch logs (TensorBoard:
  ``validation/epoch_pgd_accuracy``).

  Files in ``state_dir``: ``robust_guard.json`` (per-epoch accuracies, best
  epoch) and ``robust_best_<epoch>.npz`` (the weights of each epoch that was
  the best when it ended; all but the final best are deleted when training
  ends).

  Args:
    classifier: the model being trained (its weights are read and restored).
    x, y: the held-out images (float32 in [0, 1]) and int labels.
    epsilon: L-inf radius of the PGD check.
    state_dir: where the state is kept.
    first_epoch: the epoch this run starts at (``training.resume_epoch``):
      entries of later epochs, left by a killed run, are dropped.
    seed: PGD's seed (the same images and starts every epoch).
    write: False on non-chief workers (they keep the state in memory only).
    first_eligible_epoch: epochs before it are measured and logged but never
      kept as the best (robust pruning: an epoch that ends before the pruning
      schedule has reached its final sparsity holds a denser model).
  """

  # What is measured, as files, logs and messages name it (a subclass changes them).
  FILE_PREFIX = "robust"
  LOG_KEY = "val_pgd_accuracy"
  LABEL = f"PGD-{GUARD_STEPS} robust"

  def __init__(self, classifier: keras.Model, x: np.ndarray, y: np.ndarray, *,
               epsilon: float, state_dir: str | os.PathLike, first_epoch: int = 0,
               seed: int = 0, write: bool = True, first_eligible_epoch: int = 0):
    super().__init__()
    self.classifier = classifier
    self.x, self.y = x, y
    self.epsilon = float(epsilon)
    self.state_dir = pathlib.Path(state_dir)
    self.seed = int(seed)
    self.write = write
    self.first_eligible_epoch = int(first_eligible_epoch)
    self.history: dict[int, float] = {}
    self.collapses: list[int] = []
    self.best_epoch: int | None = None
    self.best_weights: list[np.ndarray] | None = None
    self._load(int(first_epoch))

  @property
  def _json(self) -> pathlib.Path:
    return self.state_dir / f"{self.FILE_PREFIX}_guard.json"

  def _npz(self, epoch: int) -> pathlib.Path:
    return self.state_dir / f"{self.FILE_PREFIX}_best_{epoch}.npz"

  def _load(self, first_epoch: int) -> None:
    if first_epoch == 0 or not self._json.is_file():
      return
    state = io_utils.read_json(self._json)
    self.history = {int(e): float(a) for e, a in state["history"].items()
                    if int(e) < first_epoch}
    self.collapses = [e for e in state.get("collapses", []) if e < first_epoch]
    eligible = [e for e in self.history if e >= self.first_eligible_epoch]
    if eligible:
      best = max(eligible, key=lambda e: (self.history[e], -e))
      with np.load(self._npz(best)) as f:
        self.best_weights = [f[f"w{i}"] for i in range(len(f.files))]
      self.best_epoch = best

  @property
  def best_accuracy(self) -> float | None:
    return None if self.best_epoch is None else self.history[self.best_epoch]

  def measure(self) -> float:
    """PGD robust accuracy of the classifier now (tests may replace it)."""
    return robust_accuracy(self.classifier, self.x, self.y, self.epsilon, seed=self.seed)

  def on_epoch_end(self, epoch, logs=None):
    acc = float(self.measure())
    self.history[int(epoch)] = acc
    if logs is not None:
      logs[self.LOG_KEY] = acc
    best = self.best_accuracy
    if epoch < self.first_eligible_epoch:
      pass  # measured and logged, never kept (see first_eligible_epoch)
    elif best is None or acc > best:
      self.best_epoch = int(epoch)
      self.best_weights = [np.array(w) for w in self.classifier.get_weights()]
      if self.write:
        with io_utils.atomic_path(self._npz(epoch)) as tmp:
          with open(tmp, "wb") as f:
            np.savez(f, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
    elif acc < COLLAPSE_FRACTION * best:
      self.collapses.append(int(epoch))
      logging.warning(
          "%s accuracy collapsed at epoch %d: %.4f at eps %g on %d held-out images, below "
          "half the best (%.4f, epoch %d) - catastrophic overfitting? The best epoch's "
          "weights will be kept.", self.LABEL, epoch + 1, acc, self.epsilon, len(self.y),
          best, self.best_epoch + 1)
    if self.best_epoch is None:
      logging.info("epoch %d: %s accuracy %.4f (not eligible as the best before "
                   "epoch %d)", epoch + 1, self.LABEL, acc, self.first_eligible_epoch + 1)
    else:
      logging.info("epoch %d: %s accuracy %.4f (best %.4f at epoch %d)", epoch + 1,
                   self.LABEL, acc, self.best_accuracy, self.best_epoch + 1)
    if self.write:
      io_utils.write_json(self._json, self.state())

  def on_train_end(self, logs=None):
    # Only now: until the last checkpoint, a resumed run may fall back to an
    # earlier best (the entries after its checkpoint are dropped).
    if self.write and self.best_epoch is not None:
      for old in self.state_dir.glob(f"{self.FILE_PREFIX}_best_*.npz"):
        if old != self._npz(self.best_epoch):
          old.unlink(missing_ok=True)

  def restore_best(self) -> None:
    """Gives the classifier the best epoch's weights (no-op before any epoch)."""
    if self.best_weights is not None:
      self.classifier.set_weights(self.best_weights)

  def state(self) -> dict:
    """JSON-able: per-epoch accuracies, best epoch (0-based) and accuracy, collapses."""
    return {"epsilon": self.epsilon, "pgd_steps": GUARD_STEPS, "images": int(len(self.y)),
            "first_eligible_epoch": self.first_eligible_epoch,
            "history": {str(e): a for e, a in sorted(self.history.items())},
            "best_epoch": self.best_epoch, "best_accuracy": self.best_accuracy,
            "collapses": list(self.collapses)}


class CertifiedAccuracyGuard(RobustAccuracyGuard):
  """Per-epoch IBP certified accuracy on held-out images; keeps the best weights.

  ``RobustAccuracyGuard`` with the measurement swapped: the share of the
  held-out images that IBP certifies at ``epsilon`` (cheap: one bounded
  forward pass). Files ``certified_guard.json`` and
  ``certified_best_<epoch>.npz``; epoch log ``val_certified_accuracy``.
  """
  FILE_PREFIX = "certified"
  LOG_KEY = "val_certified_accuracy"
  LABEL = "IBP certified"

  def measure(self) -> float:
    return float(np.mean(cert_bounds.certify(self.classifier, self.x, self.y, self.epsilon,
                                             method="ibp")))

  def state(self) -> dict:
    out = super().state()
    del out["pgd_steps"]
    return {**out, "method": "ibp"}
