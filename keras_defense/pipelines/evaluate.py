"""kd-evaluate's pipeline: run the AutoAttack protocol on a model, then write its report.

``run(config)`` composes the runner (``evaluation.robustness.run``: resumable
per (ε, attack), writes only ``run.json`` and ``state/``) with the report
(``reports.robustness_report.write``: results.json, report.md,
worst_case_adversarials.png, tensorboard/), so the runner never knows the
layer above it. The experiment, the defense comparison and the sweep run their
AutoAttack evaluations through here too.

Example:
  >>> config = RobustnessConfig(model="saved_models/mnist_m0/1", output_key="logits",
  ...                           run_dir="runs/eval_m0", epsilons=(0.3,), n_examples=1000)
  >>> result = run(config)
  >>> result.summary()
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from keras_defense.evaluation import black_box
from keras_defense.evaluation import certified
from keras_defense.evaluation import robustness
from keras_defense.evaluation import robustness_state
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.evaluation.robustness_result import RobustnessResult
from keras_defense.reports import robustness_report


def run(config: RobustnessConfig, *, progress: robustness.Progress | None = None,
        attack_plan: Callable[[str, str, Sequence[str] | None], robustness.Plan] | None = None
        ) -> RobustnessResult:
  """Evaluates (resuming saved state), then writes the run directory's artifacts.

  Args:
    config: what to evaluate (validated by the runner).
    progress: called as ``progress(done, total, description)``; see
      ``robustness.run``.
    attack_plan: ``(version, norm, attacks) -> [(name, fn)]``; default
      ``keras_defense.attacks.autoattack.plan``, or for a ``.tflite`` (no
      gradients) the black-box ensemble (``evaluation.black_box``).

  Returns:
    The ``RobustnessResult`` (with ``certified`` when ``config.certify``
    names bound methods); ``config.run_dir`` then holds results.json,
    report.md, tensorboard/ and, when an image was broken,
    worst_case_adversarials.png.

  Raises:
    UserError: as ``robustness.run``, before any attack runs or anything is
      written.
    certified.CertificationBug: an image certified at ε that an attack broke
      (a bug in the bounds or the attacks).

  A shard (``config.num_shards > 1``) writes only its state; ``merge`` reports.
  """
  if attack_plan is None and black_box.applies(config):  # a .tflite: no gradients
    attack_plan = black_box.plan_factory(config)
  result = robustness.run(config, progress=progress, attack_plan=attack_plan)
  if config.num_shards == 1:  # a shard's numbers are reported by the merge
    if config.certify:
      result.certified = certified.for_evaluation(config, result)
    robustness_report.write(config.run_dir, result)
  return result


def merge(run_dir: str, *, progress: robustness.Progress | None = None,
          command: str | None = None,
          attack_plan: Callable[[str, str, Sequence[str] | None], robustness.Plan] | None = None
          ) -> RobustnessResult:
  """Combines the finished shards of ``run_dir`` and writes the report one process would.

  The configuration is the one the shards recorded (``robustness_state``);
  the model and the images are loaded again (for the grid's predictions).

  Raises:
    UserError: no shard, or a shard missing, unfinished or mismatched, naming it.
  """
  settings = robustness_state.recorded_settings(run_dir)
  fields = {f.name for f in dataclasses.fields(RobustnessConfig)}
  config = RobustnessConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in settings.items() if k in fields})
  config = dataclasses.replace(config, run_dir=str(run_dir), shard_index=0, num_shards=1,
                               merge=True, command=command or config.command,
                               # The merge attacks nothing: it runs on one device.
                               strategy="default", num_cpu_devices=None)
  return run(config, progress=progress, attack_plan=attack_plan)
