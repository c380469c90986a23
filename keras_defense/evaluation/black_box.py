"""The black-box ensemble kd-evaluate runs on a model without gradients (a ``.tflite``).

A LiteRT interpreter rounds in int8 kernels and offers no gradient, so a
white-box attack on it would either fail or be masked (Athalye, Carlini &
Wagner, ICML 2018, https://arxiv.org/abs/1802.00420). Its robustness is
measured here by attacks whose examples are judged on the interpreter, per
image worst case in the runner's protocol (``robustness``: each attack on the
images still robust):

1. ``transfer-pgd``: PGD (Madry et al. 2018: 40 steps of ε/30 in L-inf, of
   ε/4 in L2, random start) crafted on the **surrogate** (the float parent or QAT twin,
   any model kd-evaluate loads), judged on the interpreter. It is in the
   ensemble so that the ensemble is, by construction, at least as strong as
   the plain PGD transfer from the float parent on the same images;
2. ``transfer-apgd-ce``: APGD-CE (100 steps, AutoAttack's) on the surrogate;
3. ``transfer-apgd-t``: APGD-T (9 targets, DLR) on the surrogate;
4. ``bpda-apgd-ce``, ``bpda-apgd-t``: the same APGD runs on the **QAT twin**
   (``qat_twin``: the tfmot quantization-aware model the .tflite was
   converted from), judged on the interpreter: BPDA (Athalye et al. 2018,
   §4.1) through the fake quantization. The forward pass is the twin's
   ``FakeQuantWithMinMaxVars(PerChannel)`` ops, the quantized function as
   closely as the twin gets (weights per channel, activations per tensor,
   the int8 ranges the converter writes into the flatbuffer); the backward
   pass is TensorFlow's registered gradient of those ops, which passes the
   gradient unchanged inside [min, max] and zeroes it outside: the gradient of
   ``clip(x, min, max)``, i.e. the rounding replaced by the identity, which
   *is* BPDA's straight-through approximation. No custom gradient is needed:
   the BPDA members are APGD on the QAT twin with its own straight-through
   fake-quant gradients, examples checked on the interpreter;
5. ``square``: Square Attack (5,000 queries by default, p_init 0.8) on the
   interpreter itself, queries counted per image (``queries_square.npz``
   beside the runner's state of that ε).

The QAT twin is ``--qat_twin`` (kd-quantize ``--qat_twin_path`` writes it), or
the surrogate itself when it holds fake-quant ops (``qat_twin_path``); then
APGD on it is BPDA, so its APGD members are the ``bpda-*`` ones and
``transfer-pgd`` stays as the plain PGD baseline (the same attack is not run
twice). With ``transfer_cache`` (a directory), the ``transfer-*`` examples are
crafted once per image on that surrogate file and reused by later runs
(``transfer_cache``: the deployment table's artifacts of one parent share
them); the BPDA members, whose twin is the artifact's own, are never cached.
Without a surrogate or twin the ensemble is Square alone (a
score-based attack is still a real attack on the artifact; the report says the
evaluation is weaker). The surrogate's own white-box AutoAttack is a separate
kd-evaluate run of the surrogate (the deployment table runs it). Without
``--batch_size`` the batch is sized from memory on the surrogate (or twin),
where the gradient attacks run (``robustness._sized_model``); Square alone
takes the cap.

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
from keras_defense.evaluation import robustness_state as state_lib
from keras_defense.evaluation import transfer_cache
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.models import classifier as clf_lib
from keras_defense.models import scan
from keras_defense.util.errors import UserError

TRANSFER = ("transfer-pgd", "transfer-apgd-ce", "transfer-apgd-t")
BPDA = ("bpda-apgd-ce", "bpda-apgd-t")
ATTACKS = (*TRANSFER, *BPDA, "square")
FAKE_QUANT_OPS = frozenset({"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel",
                            "FakeQuantWithMinMaxArgs"})  # tfmot's quant_ops
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


def is_qat_model(path: str | None) -> bool:
  """True when ``path`` is a SavedModel holding fake-quant ops (a tfmot QAT model).

  Keras files are never QAT models here: tfmot's wrappers are not built-in
  layers, so the safe loader refuses them; export the QAT model as a SavedModel.
  """
  if not path or not (pathlib.Path(path) / "saved_model.pb").is_file():
    return False
  try:
    return bool(scan.op_types(path) & FAKE_QUANT_OPS)
  except scan.UnreadableModelError:
    return False  # the loader names what is wrong


def qat_twin_path(config: RobustnessConfig) -> str | None:
  """The QAT twin of the BPDA members: ``config.qat_twin``, else the surrogate when it
  is a QAT model (``is_qat_model``), else None."""
  if config.qat_twin:
    return str(config.qat_twin)
  return str(config.surrogate) if is_qat_model(config.surrogate) else None


def _same(a: str | None, b: str | None) -> bool:
  return bool(a and b) and pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def attack_names(config: RobustnessConfig) -> tuple[str, ...]:
  """The attacks this config runs, or ``config.attacks`` with version "custom".

  Standard: the transfer members with a surrogate, the BPDA members with a QAT
  twin (``qat_twin_path``; a twin that is the surrogate keeps only
  ``transfer-pgd`` of the transfer members: its APGD runs are the BPDA ones),
  then Square; Square alone with neither.

  Raises:
    UserError: a custom attack that is not black-box, a transfer without
      surrogate, or a BPDA member without a QAT twin.
  """
  twin = qat_twin_path(config)
  if config.version == "custom":
    names = tuple(config.attacks or ())
    bad = [a for a in names if a not in ATTACKS]
    if bad:
      raise UserError(f"`attacks` {', '.join(bad)} cannot run on {config.model!r}: a .tflite "
                      f"has no gradients; its black-box attacks are {', '.join(ATTACKS)}.")
  else:
    transfer = () if not config.surrogate else (
        TRANSFER[:1] if _same(twin, config.surrogate) else TRANSFER)
    names = (*transfer, *(BPDA if twin else ()), "square")
  if config.surrogate is None and any(a in TRANSFER for a in names):
    raise UserError("the transfer attacks need `surrogate` (--surrogate=PATH: the float "
                    "parent or the QAT twin).")
  if twin is None and any(a in BPDA for a in names):
    raise UserError("the BPDA attacks need a QAT twin: `qat_twin` (--qat_twin=PATH, the "
                    "tfmot quantization-aware SavedModel the .tflite was converted from; "
                    "kd-quantize --qat_twin_path writes it), or a QAT model as `surrogate`.")
  return names


def load_surrogate(config: RobustnessConfig, path: str | None = None, *,
                   what: str = "surrogate") -> clf_lib.Classifier:
  """A differentiable model (default ``config.surrogate``) as a Classifier (its only
  output, else ``logits``), checked on the first test images of the config's dataset.

  Raises:
    UserError: it cannot be loaded, is itself a .tflite, or does not take the images.
  """
  path = str(config.surrogate if path is None else path)
  if path.endswith(".tflite"):
    raise UserError(f"`{what}` {path!r} is a .tflite (no gradients); pass its float "
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
  """``transfer-*`` / ``bpda-*``: the attack after the prefix, run on ``surrogate`` (the
  surrogate or the QAT twin); the runner judges its examples on the interpreter."""
  model = surrogate.keras_model if surrogate.keras_model is not None else surrogate
  attack = name.split("-", 1)[1]

  def run(target, x, y, epsilon, *, seed, batch_size, compute_dtype):  # pylint: disable=unused-argument
    if attack == "pgd":
      return pgd(model, x, y, epsilon, norm=norm, steps=PGD_STEPS,
                 step_size=epsilon * PGD_STEP_FRACTION if norm == "linf" else epsilon / 4,
                 random_start=True, seed=seed, batch_size=batch_size)
    if attack == "apgd-ce":
      kwargs = {"loss": "ce", "restarts": 1}
    else:
      num_classes = int(np.asarray(surrogate(x[:1])).shape[-1])
      kwargs = {"loss": "dlr", "targeted": True, "restarts": 1,
                "n_target_classes": min(TARGET_CLASSES, num_classes - 1)}
    return apgd(model, x, y, epsilon, norm=norm, steps=APGD_STEPS, seed=seed,
                batch_size=batch_size, **kwargs)
  return run


def _square_fn(config: RobustnessConfig) -> AttackFn:
  state = pathlib.Path(config.run_dir) / "state"

  def run(target, x, y, epsilon, *, seed, batch_size, compute_dtype):  # pylint: disable=unused-argument
    x_adv, counts = square(target, x, y, epsilon, norm=config.norm,
                           queries=config.square_queries, p_init=P_INIT, seed=seed,
                           batch_size=batch_size, return_queries=True)
    state_lib.save_npz(state / state_lib.eps_dir(epsilon) / QUERIES_FILE,
                       queries=counts.astype(np.int64))
    return x_adv
  return run


def plan_factory(config: RobustnessConfig, *, surrogate: clf_lib.Classifier | None = None,
                 qat_twin: clf_lib.Classifier | None = None
                 ) -> Callable[[str, str, Sequence[str] | None], list[tuple[str, AttackFn]]]:
  """The runner's ``attack_plan`` for a model without gradients.

  Args:
    config: the evaluation (``model`` a .tflite; ``surrogate``, ``qat_twin`` optional).
    surrogate: the loaded surrogate; default: loaded from ``config.surrogate``
      when the plan is built (after the runner has validated the config).
    qat_twin: the loaded QAT twin; default: loaded from ``qat_twin_path(config)``
      (the surrogate's Classifier when the twin is the surrogate).

  Returns:
    ``(version, norm, attacks) -> [(name, fn)]`` as ``autoattack.plan``.
  """
  def make(version, norm, attacks):  # pylint: disable=unused-argument
    names = attack_names(config)
    clf, twin = surrogate, qat_twin
    if clf is None and any(n in TRANSFER for n in names):
      clf = load_surrogate(config)
    if twin is None and any(n in BPDA for n in names):
      path = qat_twin_path(config)
      twin = clf if (clf is not None and _same(path, config.surrogate)) else load_surrogate(
          config, path, what="qat_twin")
    sha = (transfer_cache.surrogate_key(clf_lib.fingerprint(config.surrogate), config.pixels())
           if config.transfer_cache and any(n in TRANSFER for n in names) else None)

    def fn(n):
      if n == "square":
        return _square_fn(config)
      run = _transfer_fn(n, twin if n in BPDA else clf, norm)
      return transfer_cache.cached(run, config.transfer_cache, sha, n, norm) if (
          sha and n in TRANSFER) else run
    return [(n, fn(n)) for n in names]
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
