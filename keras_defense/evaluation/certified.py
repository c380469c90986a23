"""The proven side of an evaluation: certified accuracy beside the attacks' robust accuracy.

An attack's robust accuracy is an upper bound (the images it failed to
break); ``certify.bounds`` gives the lower bound (the images no perturbation
in the ε-ball can change). ``certify_model`` computes it for a model kd-evaluate
or the defenses comparison attacks, with several bound methods (default IBP and
CROWN-IBP); an image counts as certified when *any* method proves it (each is
a sound lower bound, so their union is one too). A model the bounds cannot
read (a layer they do not support, a SavedModel not exported by tf_keras, a
Keras 3 or .tflite model, a randomized model) gets a ``Certified`` with
``reason`` set and no numbers: "n/a", never a crash. A model taking another
pixel convention (``models.pixels``) is bounded through the convention's map,
the ε-ball staying in [0, 1] pixel units as for the attacks.

``check_sound`` holds the two sides against each other: an image certified at
ε that an attack broke at ε (or at a smaller ε, whose ball lies inside) is a
bug in the bounds or in the attack's bookkeeping, and raises
``CertificationBug`` naming the image, ε, the methods and the attack; so does
a certified count above the robust count.

Example:
  >>> cert = certify_model("saved_models/mnist_m0_ibp/1", x, y, (0.1, 0.3))
  >>> cert.per_eps[0.3]["certified_acc"], cert.methods
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Iterable, Sequence

import numpy as np

from keras_defense.certify import bounds
from keras_defense.data import test_images as inputs
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.evaluation.robustness_result import RobustnessResult
from keras_defense.models import export
from keras_defense.models import pixels as pixels_lib
from keras_defense.util import io_utils
from keras_defense.util.compat import keras
from keras_defense.util.errors import UserError

DEFAULT_METHODS = ("ibp", "crown_ibp")


class CertificationBug(RuntimeError):
  """An image certified at ε was broken by an attack at ε (a bug, not a user error)."""


@dataclasses.dataclass
class Certified:
  """Certified accuracy of one model on the evaluated images.

  Attributes:
    methods: the bound methods tried, in order (an image is certified when
      any proves it).
    norm: "linf" or "l2".
    n: images evaluated.
    per_eps: ε -> {"eps", "n_certified", "certified_acc", "certified_indices"
      (sorted indices into the evaluated images), "by_method" ({method:
      {"n_certified", "certified_indices"}}), "seconds"}; empty when
      ``reason`` is set.
    reason: why the model cannot be bounded ("n/a"), else None.
  """
  methods: tuple[str, ...]
  norm: str
  n: int
  per_eps: dict[float, dict[str, Any]] = dataclasses.field(default_factory=dict)
  reason: str | None = None

  @property
  def available(self) -> bool:
    return self.reason is None

  def to_dict(self) -> dict[str, Any]:
    return {"methods": list(self.methods), "norm": self.norm, "n_examples": self.n,
            "reason": self.reason,
            "per_eps": [self.per_eps[e] for e in sorted(self.per_eps)]}


def bounded_model(path: str, *, allow_ops: Sequence[str] = ()) -> tuple[Any, str | None]:
  """The tf_keras model the bounds read from ``path``, or None and the reason why not.

  Args:
    path: a SavedModel exported by tf_keras or a .keras/.h5 file.
    allow_ops: as ``export.load_model``.
  """
  if str(path).endswith(".tflite"):
    return None, "a .tflite flatbuffer has no tf_keras layers to bound"
  try:
    model = export.load_model(path, allow_ops=allow_ops)
  except UserError as e:
    return None, f"not a tf_keras model the bounds can read ({e})"
  if not isinstance(model, keras.Model):
    return None, f"not a tf_keras model ({type(model).__name__}; Keras 3 models are opaque)"
  try:
    bounds.bounded(model)
  except (UserError, TypeError) as e:
    return None, str(e).split(" Fix:")[0]
  return model, None


def predicts_like(model: Any, x: np.ndarray, predictions: np.ndarray, *,
                  pixels: pixels_lib.PixelConvention | None = None,
                  batch_size: int = bounds.DEFAULT_BATCH_SIZE) -> str | None:
  """None if ``model`` predicts ``predictions`` (N,) on ``x``, else the reason to refuse it.

  The bounds speak for the tf_keras model; the attacks ran on the evaluated
  model (e.g. a SavedModel signature): they must be the same function.
  ``x`` in [0, 1] pixels; ``pixels``: the model's convention (None: [0, 1]).
  """
  pixels = pixels or pixels_lib.PixelConvention()
  mine = np.concatenate([np.argmax(np.asarray(model(pixels.to_model(x[i:i + batch_size]),
                                                    training=False)), axis=-1)
                         for i in range(0, len(x), batch_size)])
  differ = int(np.sum(mine != np.asarray(predictions)))
  if differ:
    return (f"the tf_keras model predicts differently from the evaluated model on {differ} "
            f"of {len(x)} images")
  return None


def _eps_file(state: pathlib.Path, method: str, eps: float) -> pathlib.Path:
  return state / f"{method}_eps_{eps:.6g}.json"


def certify_model(model: Any, x: np.ndarray, y: np.ndarray, epsilons: Iterable[float], *,
                  norm: str = "linf", methods: Sequence[str] = DEFAULT_METHODS,
                  batch_size: int = bounds.DEFAULT_BATCH_SIZE,
                  state_dir: str | pathlib.Path | None = None,
                  reason: str | None = None,
                  pixels: pixels_lib.PixelConvention | None = None) -> Certified:
  """Certified accuracy at every ε, the union over ``methods``.

  Args:
    model: a tf_keras model (``bounded_model``), or None with ``reason``.
    x: float32 (N, H, W, C) images in [0, 1]; y: int labels (N,).
    epsilons: radii of the ``norm`` ball, in [0, 1] pixel units.
    norm: "linf" or "l2".
    methods: bound methods (``certify.bounds.METHODS``).
    batch_size: images per bound computation.
    state_dir: if given, each (method, ε) is saved there as JSON and a rerun
      loads it instead of recomputing.
    reason: why the model cannot be bounded (then nothing is computed).
    pixels: the model's input convention (``models.pixels``); None: [0, 1].

  Returns:
    A ``Certified``; ``reason`` set (and no numbers) if the model is None or
    the bounds refuse it (e.g. "crown" on a network too large).
  """
  methods = bounds.check_methods(methods)
  out = Certified(methods=methods, norm=norm, n=len(y))
  if model is None or reason is not None:
    out.reason = reason or "no tf_keras model"
    return out
  try:
    for m in methods:
      bounds.bounded(model, pixels).check(m, norm, "adaptive")
  except UserError as e:
    out.reason = str(e).split(" Fix:")[0]
    return out
  state = None if state_dir is None else pathlib.Path(state_dir)
  for eps in sorted(float(e) for e in epsilons):
    union = np.zeros(len(y), bool)
    by_method, seconds = {}, 0.0
    for m in methods:
      path = None if state is None else _eps_file(state, m, eps)
      if path is not None and path.is_file():
        saved = io_utils.read_json(path)
        idx = np.asarray(saved["certified_indices"], np.int64)
        seconds += saved["seconds"]
      else:
        start = time.perf_counter()
        idx = np.flatnonzero(bounds.certify(model, x, y, eps, method=m, norm=norm,
                                            pixels=pixels, batch_size=batch_size))
        took = time.perf_counter() - start
        seconds += took
        if path is not None:
          io_utils.write_json(path, {"method": m, "eps": eps, "n": len(y), "seconds": took,
                                     "certified_indices": [int(i) for i in idx]})
      union[idx] = True
      by_method[m] = {"n_certified": int(len(idx)),
                      "certified_indices": [int(i) for i in idx]}
    out.per_eps[eps] = {"eps": eps, "n_certified": int(union.sum()),
                        "certified_acc": float(union.mean()) if len(y) else 0.0,
                        "certified_indices": [int(i) for i in np.flatnonzero(union)],
                        "by_method": by_method, "seconds": seconds}
  return out


@dataclasses.dataclass(frozen=True)
class AttackOutcome:
  """Images one attack broke at one ε (indices into the evaluated images)."""
  eps: float
  attack: str
  broken: np.ndarray


def check_sound(cert: Certified, outcomes: Sequence[AttackOutcome], *,
                clean_correct: np.ndarray | None = None,
                robust_counts: dict[float, int] | None = None) -> None:
  """Fails loudly where the proof and the attacks disagree.

  Args:
    cert: the certified images.
    outcomes: every attack's broken images at every ε it ran.
    clean_correct: bool (N,), images classified correctly without attack.
    robust_counts: ε -> images the attacks left robust (certified must not
      exceed it).

  Raises:
    CertificationBug: an image certified at ε is misclassified clean, or was
      broken by an attack at ε or at a smaller ε (whose ball lies inside);
      or more images are certified than robust. The message names the image
      index, ε, the methods that certified it and the attack.
  """
  for eps, entry in sorted(cert.per_eps.items()):
    certified = np.asarray(entry["certified_indices"], np.int64)
    if not len(certified):
      continue

    def methods_of(i, entry=entry):
      return ", ".join(m for m, v in entry["by_method"].items()
                       if i in v["certified_indices"]) or "?"
    if clean_correct is not None:
      bad = certified[~np.asarray(clean_correct, bool)[certified]]
      if len(bad):
        i = int(bad[0])
        raise CertificationBug(
            f"image {i} is certified at ε {eps:g} by {methods_of(i)} but misclassified "
            f"clean ({len(bad)} such images): the bounds are unsound (a bug).")
    for out in sorted(outcomes, key=lambda o: o.eps):
      if out.eps > eps * (1 + 1e-9):
        continue
      both = np.intersect1d(certified, np.asarray(out.broken, np.int64))
      if len(both):
        i = int(both[0])
        where = f"at ε {eps:g}" if np.isclose(out.eps, eps) else \
            f"at the smaller ε {out.eps:g} (inside the ε {eps:g} ball)"
        raise CertificationBug(
            f"image {i} is certified at ε {eps:g} by {methods_of(i)} but attack "
            f"{out.attack!r} broke it {where} ({len(both)} such images): a bound or the "
            f"attack's bookkeeping is unsound (a bug).")
    if robust_counts is not None and eps in robust_counts and \
        entry["n_certified"] > robust_counts[eps]:
      raise CertificationBug(
          f"at ε {eps:g}, {entry['n_certified']} images are certified but only "
          f"{robust_counts[eps]} survived the attacks: certified must be <= robust (a bug).")


def attack_outcomes(run_dir: str | pathlib.Path) -> list[AttackOutcome]:
  """Every finished (ε, attack) step of a robustness run directory's state, in order."""
  state = pathlib.Path(run_dir) / "state"
  out = []
  for eps_dir in sorted(state.glob("eps_*")) if state.is_dir() else []:
    for step in sorted(eps_dir.glob("[0-9][0-9]_*.npz")):
      with np.load(step) as st:
        out.append(AttackOutcome(eps=float(eps_dir.name[len("eps_"):]),
                                 attack=step.stem[3:], broken=st["broken_idx"]))
  return out


def for_evaluation(config: RobustnessConfig, result: RobustnessResult) -> Certified:
  """Certifies the images a finished kd-evaluate run attacked, and checks it against them.

  The bounds run on the tf_keras model inside ``config.model`` (n/a, with
  the reason, when there is none or it predicts differently from the
  evaluated model; a model taking other pixels than [0, 1] is bounded through
  its convention's map); per (method, ε) results are kept in
  ``<run_dir>/state/certified/`` so a rerun reuses them.

  Raises:
    CertificationBug: as ``check_sound``, against the run's per-image state.
  """
  methods = tuple(config.certify)  # validated with the config
  cert = Certified(methods=methods, norm=config.norm, n=result.n)
  run_dir = pathlib.Path(config.run_dir)
  clean = run_dir / "state" / "clean.npz"
  model, reason = bounded_model(config.model, allow_ops=config.allow_ops)
  if model is None:
    cert.reason = reason
    return cert
  images = inputs.load_test_images(config.dataset, n_examples=config.n_examples,
                                   model_shape=model.input_shape, data_dir=config.data_dir,
                                   manual_dir=config.manual_dir)
  with np.load(clean) as st:
    pred = st["pred"]
  reason = predicts_like(model, images.x, pred, pixels=config.pixels())
  cert = certify_model(model, images.x, images.y, config.epsilons, norm=config.norm,
                       pixels=config.pixels(),
                       methods=methods, batch_size=config.batch_size or
                       bounds.DEFAULT_BATCH_SIZE, reason=reason,
                       state_dir=run_dir / "state" / "certified")
  if cert.available:
    check_sound(cert, attack_outcomes(run_dir), clean_correct=pred == images.y,
                robust_counts={e.eps: e.robust for e in result.epsilons})
  return cert
