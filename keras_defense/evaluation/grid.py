"""Runs the attack grid: models x attacks x epsilons x threat models -> rows.

Each *group* crafts one set of adversarial examples (one source model, loss,
attack, targeted flag and epsilon) and scores it on every model that threat
model evaluates with it: examples crafted on M0 with cross-entropy serve both
M0's grey-box cell and M1/M2's transfer cells. Finished cells are saved one
JSON file each under ``cells_dir`` (atomically), so an interrupted evaluation
resumes where it stopped and a rerun recomputes nothing.

A row's success rate counts only images the evaluated model classified
correctly before the attack (untargeted: misclassified afterwards; targeted:
the target class reached), with a 95% Wilson interval.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from keras_defense import attacks
from keras_defense.util import config_checks
from keras_defense.util import io_utils
from keras_defense.util import randomness
from keras_defense.evaluation import statistics
from keras_defense.evaluation import threat_models as tm
from keras_defense.attacks import validation
from keras_defense.util.errors import UserError

GRADIENT_ATTACKS = ("fgsm", "bim")
CW_ATTACKS = ("cw_l2", "cw_linf", "cw_l0")
TARGET_SELECTIONS = ("random", "least_likely", "next")
AUTOATTACK_VERSIONS = ("none", "standard", "plus", "rand")
NUM_EXAMPLES_SHOWN = 8


@dataclasses.dataclass
class EvalConfig:
  """The attack grid. Field names match the experiment flags."""
  attacks: tuple[str, ...] = GRADIENT_ATTACKS
  epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
  targeted_modes: tuple[bool, ...] = (False, True)
  target_selection: str = "random"
  threat_models: tuple[str, ...] = tm.THREAT_MODELS
  eval_size: int | None = None  # None: every image given
  bim_steps: int = 10  # the defense authors' code: 10 iterations
  rel_step_size: float = 0.25  # BIM step = rel_step_size * epsilon
  cw_attacks: tuple[str, ...] = CW_ATTACKS
  cw_eval_size: int = 100
  cw_targeted_modes: tuple[bool, ...] = (False,)
  # Per C&W attack: keyword arguments, plus "eval_size" to override cw_eval_size.
  cw_options: dict = dataclasses.field(default_factory=dict)
  batch_size: int = 1000
  compute_dtype: str = "float32"
  seed: int = 0
  # AutoAttack (Croce & Hein 2020) on every model: "none" or an autoattack.plan
  # version; at ``autoattack_epsilons`` (empty: ``epsilons``) on the first
  # ``autoattack_size`` test images (None: all), per-image worst case.
  autoattack_version: str = "none"
  autoattack_epsilons: tuple[float, ...] = ()
  autoattack_size: int | None = None
  autoattack_batch_size: int = 500
  # The sanity check of Carlini et al.'s checklist: at this ε (1 = the whole
  # [0, 1] range) any image can become any other, so robust accuracy must be 0.
  sanity_epsilon: float = 1.0
  sanity_size: int = 100

  def validate(self) -> "EvalConfig":
    need = config_checks.checker(UserError)
    for a in self.attacks:
      need(a in GRADIENT_ATTACKS,
           f"`attacks` must be from {', '.join(GRADIENT_ATTACKS)}; got {a!r}.")
    for a in self.cw_attacks:
      need(a in CW_ATTACKS, f"`cw_attacks` must be from {', '.join(CW_ATTACKS)}; got {a!r}.")
    need(not self.attacks or len(self.epsilons) > 0,
         "`epsilons` must list at least one epsilon; got an empty list.")
    for e in self.epsilons:
      need(np.isfinite(e) and e > 0, f"`epsilons` must all be > 0; got {e!r}.")
    need(len(self.targeted_modes) > 0, "`targeted_modes` must not be empty.")
    need(not self.cw_attacks or len(self.cw_targeted_modes) > 0,
         "`cw_targeted_modes` must not be empty when `cw_attacks` are given.")
    need(self.target_selection in TARGET_SELECTIONS,
         f"`target_selection` must be one of {', '.join(TARGET_SELECTIONS)}; "
         f"got {self.target_selection!r}.")
    for t in self.threat_models:
      need(t in tm.THREAT_MODELS,
           f"`threat_models` must be from {', '.join(tm.THREAT_MODELS)}; got {t!r}.")
    need(self.eval_size is None or int(self.eval_size) >= 1,
         f"`eval_size` must be >= 1; got {self.eval_size}.")
    need(int(self.cw_eval_size) >= 1, f"`cw_eval_size` must be >= 1; got {self.cw_eval_size}.")
    need(int(self.bim_steps) >= 1, f"`bim_steps` must be >= 1; got {self.bim_steps}.")
    need(self.rel_step_size > 0, f"`rel_step_size` must be > 0; got {self.rel_step_size}.")
    need(int(self.batch_size) >= 1, f"`batch_size` must be >= 1; got {self.batch_size}.")
    need(self.autoattack_version in AUTOATTACK_VERSIONS,
         f"`autoattack_version` must be one of {', '.join(AUTOATTACK_VERSIONS)}; "
         f"got {self.autoattack_version!r}.")
    for e in self.autoattack_epsilons:
      need(np.isfinite(e) and 0 < e <= 1, f"`autoattack_epsilons` must be in (0, 1]; got {e!r}.")
    need(self.autoattack_size is None or int(self.autoattack_size) >= 1,
         f"`autoattack_size` must be >= 1; got {self.autoattack_size}.")
    need(int(self.autoattack_batch_size) >= 1,
         f"`autoattack_batch_size` must be >= 1; got {self.autoattack_batch_size}.")
    need(0 < self.sanity_epsilon <= 1, f"`sanity_epsilon` must be in (0, 1]; got "
         f"{self.sanity_epsilon}.")
    need(int(self.sanity_size) >= 0, f"`sanity_size` must be >= 0; got {self.sanity_size}.")
    return self

  @property
  def autoattack_eps(self) -> tuple[float, ...]:
    """The ε AutoAttack runs at (``autoattack_epsilons``, else ``epsilons``)."""
    return tuple(self.autoattack_epsilons or self.epsilons)


@dataclasses.dataclass(frozen=True)
class Group:
  """One set of adversarial examples and the cells it is scored in."""
  source: str
  loss: str
  attack: str
  targeted: bool
  epsilon: float | None
  plans: tuple[tm.Plan, ...]


def cell_key(plan: tm.Plan, attack: str, targeted: bool, epsilon: float | None) -> str:
  eps = "none" if epsilon is None else f"{epsilon:g}"
  return (f"{plan.threat_model}__{plan.target}__{attack}__"
          f"{'targeted' if targeted else 'untargeted'}__{eps}")


def cell_files(cells_dir: str | os.PathLike, model: str) -> list[pathlib.Path]:
  """Every file (row JSON, success mask, examples) of the cells scored on ``model``."""
  return sorted(f for f in pathlib.Path(cells_dir).glob("*")
                if f.name.split("__")[1:2] == [model])  # cell_key: <threat model>__<model>__…


def build_groups(model_names: Sequence[str], source: str, config: EvalConfig) -> list[Group]:
  """The attack grid as groups, in a stable order."""
  specs = [(a, t, e) for e in config.epsilons for a in config.attacks
           for t in config.targeted_modes]
  specs += [(a, t, None) for a in config.cw_attacks for t in config.cw_targeted_modes]
  groups = []
  for attack, targeted, eps in specs:
    by_craft: dict[tuple[str, str], list[tm.Plan]] = {}
    for threat in config.threat_models:
      for target in model_names:
        p = tm.plan(threat, target, source=source, attack=attack)
        if p is not None:
          by_craft.setdefault((p.source, p.loss), []).append(p)
    for (src, loss), plans in by_craft.items():
      groups.append(Group(src, loss, attack, targeted, eps, tuple(plans)))
  return groups


def _craft(model, x, y, group: Group, config: EvalConfig):
  common = dict(targeted=group.targeted, batch_size=config.batch_size,
                compute_dtype=config.compute_dtype)
  if group.attack == "fgsm":
    return attacks.fgsm(model, x, y, group.epsilon, loss=group.loss, **common)
  if group.attack == "bim":
    return attacks.bim(model, x, y, group.epsilon, loss=group.loss,
                       step_size=config.rel_step_size * group.epsilon,
                       steps=config.bim_steps, **common)
  fn = {"cw_l2": attacks.carlini_wagner_l2, "cw_linf": attacks.carlini_wagner_linf,
        "cw_l0": attacks.carlini_wagner_l0}[group.attack]
  opts = dict(config.cw_options.get(group.attack, {}))
  opts.pop("eval_size", None)
  return fn(model, x, y, targeted=group.targeted, **opts)


def _craft_distributed(strategy, models, xs, ys, goal, group: Group, config: EvalConfig):
  """FGSM/BIM crafted on the group's source and scored on its targets, data-parallel."""
  from keras_defense.evaluation import distributed_attack  # pylint: disable=g-import-not-at-top
  bim = group.attack == "bim"
  return distributed_attack.attack_and_score(
      strategy, models[group.source], {p.target: models[p.target] for p in group.plans},
      xs, ys, attack=group.attack, epsilon=group.epsilon,
      step_size=config.rel_step_size * group.epsilon if bim else None,
      steps=config.bim_steps if bim else 1, targeted=group.targeted, y_target=goal,
      loss=group.loss, compute_dtype=config.compute_dtype,
      batch_size=config.batch_size)


def _targets(selection: str, model, x, y, num_classes: int, seed: int) -> np.ndarray:
  if selection == "random":
    return attacks.random_targets(y, num_classes, seed=seed)
  if selection == "next":
    return attacks.next_class_targets(y, num_classes)
  return attacks.least_likely_targets(model, x)


def _mean(values: np.ndarray) -> float | None:
  return float(values.mean()) if values.size else None


def score(model, x, x_adv, y, *, targeted: bool, y_target=None,
          batch_size: int = 1000) -> dict[str, Any]:
  """Success counts, Wilson interval and mean norms of the successful examples."""
  result = attacks.attack_success(model, x_adv, y, x_clean=x, targeted=targeted,
                                  y_target=y_target, batch_size=batch_size)
  counted = result.initially_correct
  if targeted:
    counted = counted & (np.asarray(y_target) != np.asarray(y))
  return summarize(x, x_adv, result.success & counted, counted)


def summarize(x, x_adv, success: np.ndarray, counted: np.ndarray) -> tuple[dict, np.ndarray]:
  """``score``'s row statistics from its per-image masks (bool (N,) each)."""
  n, k = int(counted.sum()), int(success.sum())
  low, high = statistics.wilson_interval(k, n)
  norms = attacks.perturbation_norms(x, x_adv)
  return {"n": n, "successes": k, "success_rate": k / n if n else 0.0,
          "ci_low": low, "ci_high": high,
          "mean_l0": _mean(norms.l0[success]), "mean_l2": _mean(norms.l2[success]),
          "mean_linf": _mean(norms.linf[success])}, success


def evaluate(models: dict[str, Any], x: np.ndarray, y: np.ndarray, config: EvalConfig, *,
             source: str, num_classes: int, cells_dir: str | os.PathLike | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             strategy: Any = None) -> tuple[list[dict], list[dict]]:
  """Runs the grid; returns (rows, examples for image grids).

  Args:
    models: name -> Keras model (logits out), in report order; must contain
      ``source``.
    x: float32 (N, H, W, C) test images in [0, 1].
    y: int (N,) labels.
    config: the grid.
    source: the unprotected model's name, crafted on for transfer.
    num_classes: number of classes (for target selection).
    cells_dir: where finished cells are kept for resuming; None: nowhere.
    progress: called as progress(done_groups, total_groups, description).
    strategy: a ``tf.distribute.Strategy`` (``distribution.make_strategy``):
      FGSM/BIM groups are crafted and scored data-parallel under it
      (``distributed_attack``), with the same counts as one device; C&W stays
      on one device. None: everything on one device.

  Raises:
    UserError: bad config, or ``source`` not in ``models``.
    ValueError, TypeError: ``x`` or ``y`` of the wrong shape, type or range.
  """
  config.validate()
  if source not in models:
    raise UserError(f"`source` model {source!r} is not among {list(models)}.")
  # Checked once up front, before any cell is computed or written.
  x = validation.check_images(x, 0.0, 1.0)
  y = validation.check_labels(y, len(x), num_classes)
  n_grad = len(x) if config.eval_size is None else min(len(x), int(config.eval_size))
  n_cw = min(len(x), int(config.cw_eval_size))
  cells = pathlib.Path(cells_dir) if cells_dir else None
  groups = build_groups(list(models), source, config)
  rows, examples = [], []
  show = _showcase(config)
  for i, group in enumerate(groups):
    desc = (f"{group.attack} {'targeted' if group.targeted else 'untargeted'}"
            f"{'' if group.epsilon is None else f' eps={group.epsilon:g}'} on "
            f"{group.source} ({group.loss})")
    if progress:
      progress(i, len(groups), desc)
    keys = [cell_key(p, group.attack, group.targeted, group.epsilon) for p in group.plans]
    if cells is not None and all((cells / f"{k}.json").is_file() for k in keys):
      for k in keys:
        rows.append(io_utils.read_json(cells / f"{k}.json"))
        examples.extend(load_example(cells, k))
      continue
    n = n_grad if group.epsilon is not None else min(
        len(x), int(config.cw_options.get(group.attack, {}).get("eval_size", n_cw)))
    xs, ys = x[:n], y[:n]
    start = time.time()
    # A randomized model draws the same masks in this group however the run
    # got here (fresh, or resumed with earlier groups loaded from disk).
    for m in models.values():
      randomness.reseed(m, config.seed, "grid", group.source, group.loss, group.attack,
                        group.targeted, group.epsilon)
    crafter = models[group.source]
    goal = (_targets(config.target_selection, crafter, xs, ys, num_classes, config.seed)
            if group.targeted else None)
    scored = None
    if strategy is not None and group.attack in GRADIENT_ATTACKS:
      scored = _craft_distributed(strategy, models, xs, ys, goal, group, config)
      x_adv = scored.x_adv
    else:
      x_adv = _craft(crafter, xs, goal if group.targeted else ys, group, config)
    craft_seconds = time.time() - start
    for plan, key in zip(group.plans, keys):
      t0 = time.time()
      if scored is not None:
        stats, success = summarize(xs, x_adv, scored.success[plan.target],
                                   scored.counted[plan.target])
      else:
        stats, success = score(models[plan.target], xs, x_adv, ys,
                               targeted=group.targeted, y_target=goal,
                               batch_size=config.batch_size)
      row = {"model": plan.target, "attack": group.attack, "targeted": group.targeted,
             "epsilon": group.epsilon, "threat_model": plan.threat_model,
             "source_model": plan.source, "loss": plan.loss, **stats,
             "seconds": craft_seconds + time.time() - t0}
      ex = _example(models[plan.target], plan, group, xs, x_adv, ys) if show(plan, group) \
          else None
      if cells is not None:
        # The per-image outcome and the example first: the .json marks the
        # cell finished (the report's per-image worst case reads the outcome).
        save_success(cells, key, success)
        if ex is not None:
          with io_utils.atomic_path(cells / f"{key}.npz") as tmp:
            with open(tmp, "wb") as f:
              np.savez_compressed(f, **{k: v for k, v in ex.items()
                                        if isinstance(v, np.ndarray)})
        io_utils.write_json(cells / f"{key}.json", row)
      rows.append(row)
      if ex is not None:
        examples.append(ex)
    logging.info("[%d/%d] %s: %d images, %.1f s", i + 1, len(groups), desc, n,
                 time.time() - start)
  if progress:
    progress(len(groups), len(groups), "done")
  return rows, examples


def _showcase(config: EvalConfig):
  """Which cells get an image grid: untargeted BIM (else FGSM) at the largest eps."""
  if not config.attacks or False not in config.targeted_modes:
    return lambda plan, group: False
  attack = "bim" if "bim" in config.attacks else config.attacks[0]
  eps = max(config.epsilons)
  return lambda plan, group: (group.attack == attack and not group.targeted
                              and group.epsilon == eps
                              and plan.threat_model in (tm.GREY_BOX, tm.ADAPTIVE))


def _example(model, plan, group, x, x_adv, y) -> dict:
  k = NUM_EXAMPLES_SHOWN
  xa = np.asarray(x_adv[:k], np.float32)
  return {"model": plan.target, "attack": group.attack, "threat_model": plan.threat_model,
          "targeted": group.targeted, "epsilon": group.epsilon, "x": x[:k], "x_adv": xa, "y": y[:k],
          "pred_clean": attacks.predict_classes(model, x[:k]),
          "pred_adv": attacks.predict_classes(model, xa)}


def fooled_mask(cells: pathlib.Path, model_names: Sequence[str], source: str,
                config: EvalConfig, *, model: str, epsilon: float, n: int
                ) -> tuple[np.ndarray, list[str]]:
  """Images among the first ``n`` that any ε-bounded grid cell fooled on ``model``.

  Every FGSM/BIM cell at ``epsilon`` scored on ``model`` (any threat model,
  untargeted or targeted) counts: a success is a misclassified image within the
  ε-ball. C&W cells are not ε-bounded and do not count.

  Returns:
    (bool (n,) fooled, the cell keys used).

  Raises:
    UserError: a cell of the grid has no per-image mask (finished before masks
      were kept): rerun the 'attack' stage.
  """
  fooled = np.zeros(n, bool)
  used = []
  for g in build_groups(model_names, source, config):
    if g.epsilon is None or not np.isclose(g.epsilon, epsilon):
      continue
    for plan in g.plans:
      if plan.target != model:
        continue
      key = cell_key(plan, g.attack, g.targeted, g.epsilon)
      mask = load_success(cells, key)
      if mask is None:
        raise UserError(f"attack cell {key} in {str(cells)!r} has no per-image mask "
                        f"(made before they were kept); delete {str(cells)!r} and the "
                        f"'attack' stage record, and rerun the 'attack' stage.")
      k = min(n, len(mask))
      fooled[:k] |= mask[:k]
      used.append(key)
  return fooled, used


def save_success(cells: pathlib.Path, key: str, success: np.ndarray) -> None:
  """Writes a cell's per-image success mask (bool (n,), the first n test images) atomically."""
  with io_utils.atomic_path(cells / f"{key}.success.npy") as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(success, bool))


def load_success(cells: pathlib.Path, key: str) -> np.ndarray | None:
  """A cell's per-image success mask, or None for a cell finished before masks were kept."""
  path = cells / f"{key}.success.npy"
  return np.load(path) if path.is_file() else None


def load_example(cells: pathlib.Path, key: str) -> list[dict]:
  path = cells / f"{key}.npz"
  if not path.is_file():
    return []
  threat, model, attack, targeted, eps = key.split("__")
  with np.load(path) as z:
    return [{"model": model, "attack": attack, "threat_model": threat,
             "targeted": targeted == "targeted",
             "epsilon": None if eps == "none" else float(eps),
             **{k: z[k] for k in z.files}}]
