"""The black-box ensemble kd-evaluate runs on a model without gradients (a ``.tflite``).

A LiteRT interpreter rounds in int8 kernels and offers no gradient, so a
white-box attack on it would either fail or be masked (Athalye, Carlini &
Wagner, ICML 2018, https://arxiv.org/abs/1802.00420). Its robustness is
measured here by attacks that need only its outputs, per image worst case in
the runner's protocol (``robustness``: each attack on the images still robust):

1. ``transfer-pgd``: PGD (Madry et al. 2018: 40 steps of ε/30 in L-inf, of
   ε/4 in L2, random start) crafted on the **surrogate** (the float parent or QAT twin,
   any model kd-evaluate loads), judged on the interpreter. It is in the
   ensemble so that the ensemble is, by construction, at least as strong as
   the plain PGD transfer from the float parent on the same images;
2. ``transfer-apgd-ce``: APGD-CE (100 steps, AutoAttack's) on the surrogate;
3. ``transfer-apgd-t``: APGD-T (9 targets, DLR) on the surrogate;
4. ``square``: Square Attack (5,000 queries by default, p_init 0.8) on the
   interpreter itself, queries counted per image (``queries_square.npz``
   beside the runner's state of that ε).

Without a surrogate the ensemble is Square alone (a score-based attack is
still a real attack on the artifact; the report says the evaluation is
weaker). The surrogate's own white-box AutoAttack is a separate kd-evaluate
run of the surrogate (the deployment table runs it).

Example:
  >>> plan = plan_factory(config)       # config.model ends in .tflite
  >>> robustness.run(config, attack_plan=plan)
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from keras_defense.attacks.apgd import apgd
from keras_defense.attacks.gradient_attacks import pgd
from keras_defense.attacks.square import square
from keras_defense.data import test_images as inputs
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.models import classifier as clf_lib
from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

TRANSFER = ("transfer-pgd", "transfer-apgd-ce", "transfer-apgd-t")
ATTACKS = (*TRANSFER, "square")
PGD_STEPS = 40            # Madry et al. 2018's MNIST PGD: 40 steps ...
PGD_STEP_FRACTION = 0.1 / 3  # ... of 0.01 at ε 0.3 (ε / 30), random start
APGD_STEPS = 100          # AutoAttack's
TARGET_CLASSES = 9        # AutoAttack's APGD-T
P_INIT = 0.8              # AutoAttack's Square
QUERIES_FILE = "queries_square.npz"

AttackFn = Callable[..., np.ndarray]


def applies(config: RobustnessConfig) -> bool:
  """True when ``config.model`` has no gradients (a ``.tflite``): the black-box ensemble runs."""
  return str(config.model).endswith(".tflite")


def attack_names(config: RobustnessConfig) -> tuple[str, ...]:
  """The attacks this config runs: all of ``ATTACKS`` (Square alone without a surrogate),
  or ``config.attacks`` with version "custom".

  Raises:
    UserError: a custom attack that is not black-box, or a transfer without surrogate.
  """
  if config.version == "custom":
    names = tuple(config.attacks or ())
    bad = [a for a in names if a not in ATTACKS]
    if bad:
      raise UserError(f"`attacks` {', '.join(bad)} cannot run on {config.model!r}: a .tflite "
                      f"has no gradients; its black-box attacks are {', '.join(ATTACKS)}.")
  else:
    names = ATTACKS if config.surrogate else ("square",)
  if config.surrogate is None and any(a in TRANSFER for a in names):
    raise UserError("the transfer attacks need `surrogate` (--surrogate=PATH: the float "
                    "parent or the QAT twin).")
  return names


def load_surrogate(config: RobustnessConfig) -> clf_lib.Classifier:
  """The surrogate as a differentiable Classifier (its only output, else ``logits``),
  checked on the first test images of the config's dataset.

  Raises:
    UserError: it cannot be loaded, is itself a .tflite, or does not take the images.
  """
  path = str(config.surrogate)
  if path.endswith(".tflite"):
    raise UserError(f"`surrogate` {path!r} is a .tflite (no gradients); pass its float "
                    f"parent or QAT twin (a SavedModel or Keras file).")
  try:
    clf = clf_lib.load_classifier(path, allow_ops=config.allow_ops)
  except UserError as first:
    try:
      clf = clf_lib.load_classifier(path, output_key="logits", allow_ops=config.allow_ops)
    except UserError:
      raise first from None
  clf.use_pixels(config.pixels())
  images = inputs.load_test_images(config.dataset, n_examples=min(config.n_examples, 256),
                                   model_shape=clf.input_shape, data_dir=config.data_dir,
                                   manual_dir=config.manual_dir)
  clf.check_input(images.image_shape, dataset=config.dataset)
  num_classes = inputs.resolve_num_classes(images, clf.scores)
  clf.use_output(clf_lib.detect_output(clf, images.x, num_classes=num_classes))
  return clf


def _transfer_fn(name: str, surrogate: clf_lib.Classifier, norm: str) -> AttackFn:
  model = surrogate.keras_model if surrogate.keras_model is not None else surrogate

  def run(target, x, y, epsilon, *, seed, batch_size, compute_dtype):  # pylint: disable=unused-argument
    if name == "transfer-pgd":
      return pgd(model, x, y, epsilon, norm=norm, steps=PGD_STEPS,
                 step_size=epsilon * PGD_STEP_FRACTION if norm == "linf" else epsilon / 4,
                 random_start=True, seed=seed, batch_size=batch_size)
    if name == "transfer-apgd-ce":
      kwargs = {"loss": "ce", "restarts": 1}
    else:
      num_classes = int(np.asarray(surrogate(x[:1])).shape[-1])
      kwargs = {"loss": "dlr", "targeted": True, "restarts": 1,
                "n_target_classes": min(TARGET_CLASSES, num_classes - 1)}
    return apgd(model, x, y, epsilon, norm=norm, steps=APGD_STEPS, seed=seed,
                batch_size=batch_size, **kwargs)
  return run


def _eps_dir(eps: float) -> str:
  return f"eps_{eps:.6g}"  # as robustness._eps_dir


def _square_fn(config: RobustnessConfig) -> AttackFn:
  state = pathlib.Path(config.run_dir) / "state"

  def run(target, x, y, epsilon, *, seed, batch_size, compute_dtype):  # pylint: disable=unused-argument
    x_adv, counts = square(target, x, y, epsilon, norm=config.norm,
                           queries=config.square_queries, p_init=P_INIT, seed=seed,
                           batch_size=batch_size, return_queries=True)
    path = state / _eps_dir(epsilon) / QUERIES_FILE
    with io_utils.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, queries=counts.astype(np.int64))
    return x_adv
  return run


def plan_factory(config: RobustnessConfig, *, surrogate: clf_lib.Classifier | None = None
                 ) -> Callable[[str, str, Sequence[str] | None], list[tuple[str, AttackFn]]]:
  """The runner's ``attack_plan`` for a model without gradients.

  Args:
    config: the evaluation (``model`` a .tflite; ``surrogate`` optional).
    surrogate: the loaded surrogate; default: loaded from ``config.surrogate``
      when the plan is built (after the runner has validated the config).

  Returns:
    ``(version, norm, attacks) -> [(name, fn)]`` as ``autoattack.plan``.
  """
  def make(version, norm, attacks):  # pylint: disable=unused-argument
    names = attack_names(config)
    clf = surrogate
    if clf is None and any(n in TRANSFER for n in names):
      clf = load_surrogate(config)
    return [(n, _square_fn(config) if n == "square" else _transfer_fn(n, clf, norm))
            for n in names]
  return make


def query_summary(run_dir: str) -> dict[str, Any]:
  """Square's per-image query counts per ε, from the saved state: {ε: {...}}."""
  out = {}
  state = pathlib.Path(run_dir) / "state"
  for path in sorted(state.glob(f"eps_*/{QUERIES_FILE}")) if state.is_dir() else []:
    with np.load(path) as z:
      q = z["queries"]
    eps = float(path.parent.name[len("eps_"):])
    out[f"{eps:g}"] = {"images": int(len(q)), "total": int(q.sum()),
                       "mean": float(q.mean()) if len(q) else 0.0,
                       "median": float(np.median(q)) if len(q) else 0.0,
                       "max": int(q.max()) if len(q) else 0}
  return out
