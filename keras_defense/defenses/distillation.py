"""Defensive distillation (Papernot et al., IEEE S&P 2016).

Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to
Adversarial Perturbations against Deep Neural Networks",
https://arxiv.org/abs/1511.04508: a teacher is trained with its softmax at
temperature T (loss CE(y, softmax(z / T))); a student of the same
architecture is trained on the teacher's soft labels softmax(z_teacher / T),
also at T; the student is deployed at T = 1, i.e. it returns its raw logits z
(the exported model is the student itself: nothing divides its logits).
Training at T = 100 makes the deployed logits about T times larger, so the
softmax saturates and cross-entropy gradients vanish: gradient masking, which
Carlini & Wagner (S&P 2017, https://arxiv.org/abs/1608.04644) broke with a
margin loss. Measure it with the defense-aware attacks.

Both runs are ``trainer.train`` (``training.train`` with the defense's step:
``temperature``; the student also
``teacher_model_path``), so they checkpoint, resume and log like M0. The
teacher is exported to ``<run_dir>/teacher_model/1`` for the student's run.

Example:
  >>> student, record = distill(None, DataSpec("mnist"),
  ...                           DistillationConfig(run_dir="runs/mnist_distilled"))
"""

from __future__ import annotations

import dataclasses
import pathlib

from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.defenses import base
from keras_defense.defenses import trainer
from keras_defense.training.config import ConfigError

DEFAULT_TEMPERATURE = 100.0  # Papernot et al. 2016: T = 100 on MNIST


@dataclasses.dataclass
class DistillationConfig(training.TrainConfig):
  """``TrainConfig`` of both runs, with ``temperature`` (default 100) and ``epochs`` each.

  ``run_dir`` holds ``teacher/``, ``teacher_model/`` and ``student/``;
  ``export_dir`` receives the student. ``teacher_model_path`` and
  ``adversarial`` must stay unset (the teacher is trained here).
  """
  temperature: float = DEFAULT_TEMPERATURE
  run_dir: str = "runs/distillation"

  def validate(self) -> "DistillationConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    if self.teacher_model_path is not None:
      raise ConfigError(f"`teacher_model_path` must be unset: distillation trains its own "
                        f"teacher; got {self.teacher_model_path!r}.")
    if self.adversarial is not None:
      raise ConfigError(f"`adversarial` must be unset for distillation; "
                        f"got {self.adversarial!r}.")
    super().validate()
    return self

  def teacher_config(self) -> training.TrainConfig:
    """The teacher's run: labels at T, exported for the student."""
    run = pathlib.Path(self.run_dir)
    return training.TrainConfig(**{
        **_train_fields(self), "run_dir": str(run / "teacher"),
        "export_dir": str(run / "teacher_model"), "export_version": 1})

  def student_config(self, teacher_path: str) -> training.TrainConfig:
    """The student's run: the teacher's soft labels at T, exported to ``export_dir``."""
    return training.TrainConfig(**{
        **_train_fields(self), "run_dir": str(pathlib.Path(self.run_dir) / "student"),
        "teacher_model_path": teacher_path})


def _train_fields(config: training.TrainConfig) -> dict:
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(training.TrainConfig)}


def distill(model: str | None, data: base.DataSpec, config: DistillationConfig
            ) -> tuple[keras.Model, dict]:
  """Trains the teacher at T, then the student on its soft labels at T.

  Args:
    model: the architecture of teacher and student (a ``models.MODEL_NAMES``
      name), or None for ``config.model`` (default: the C&W net for the data).
    data: the dataset and its limits.
    config: the recipe of both runs.

  Returns:
    (the student, deployed at T = 1: its logits as they are; provenance with
    both runs' results).

  Raises:
    ConfigError: a bad config field.
    DataError: the data cannot be found.
  """
  config = data.apply(dataclasses.replace(config, model=model or config.model))
  config.validate()
  teacher = trainer.train(config.teacher_config())
  student = trainer.train(config.student_config(teacher.saved_model_path))
  return student.model, base.record(
      "distillation", config, student.to_dict(), teacher=teacher.to_dict(),
      deployed_temperature=1.0)
