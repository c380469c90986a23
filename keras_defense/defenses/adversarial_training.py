"""Adversarial training: PGD-AT, FGSM-RS and TRADES on the one training loop.

The inner maximisation (``training.attack.craft``) runs inside the compiled
train step (``trainer``), on tensors, with a ``GradientTape`` on the inputs;
``training.train`` does the rest (checkpoints and resume, TensorBoard, tf.distribute, export), so an
adversarially trained model is a plain functional model like M0.

- PGD-AT (Madry et al., ICLR 2018, https://arxiv.org/abs/1706.06083):
  min_theta E max_{||delta||_inf <= eps} CE(f(x + delta), y); the inner max is
  PGD from a uniform random start in the eps-ball (MNIST: eps 0.3, 40 steps
  of 0.01).
- FGSM-RS (Wong, Rice & Kolter, ICLR 2020, https://arxiv.org/abs/2001.03994):
  delta ~ U(-eps, eps) (clipped so x + delta stays in [0, 1]), one signed
  step of alpha = 1.25 eps, clipped to the eps-ball and the box; i.e. PGD with
  one step of alpha.
- TRADES (Zhang et al., ICML 2019, https://arxiv.org/abs/1901.08573):
  CE(f(x), y) + beta * KL(f(x) || f(x')), x' from PGD ascending the KL term
  from x + 0.001 * N(0, 1) (their code), beta 6.

The adversarial examples are crafted against the model in inference mode
(``training=False``: no dropout), as the TRADES reference code does
(``model.eval()``), then the update uses training mode.

Example:
  >>> model, record = adversarially_train(
  ...     None, DataSpec("mnist"),
  ...     AdversarialTrainingConfig(adversarial=AdversarialSpec("fgsm_rs", epsilon=0.3),
  ...                               epochs=5, run_dir="runs/mnist_m0_at"))
"""

from __future__ import annotations

import dataclasses

from keras_defense import training
from keras_defense.defenses import base
from keras_defense.defenses import trainer
from keras_defense.training.config import AdversarialSpec
from keras_defense.training.config import ConfigError
from keras_defense.util.compat import keras

METHODS = training.ADVERSARIAL_METHODS  # ("pgd", "fgsm_rs", "trades")


@dataclasses.dataclass
class AdversarialTrainingConfig(training.TrainConfig):
  """``TrainConfig`` with adversarial training on (default PGD-AT at eps 0.3).

  The fields are ``TrainConfig``'s (so flags and configs name them alike);
  ``adversarial`` is a ``training.AdversarialSpec`` (method "pgd" | "fgsm_rs"
  | "trades", epsilon, steps / step size (None: the method's default, see
  ``AdversarialSpec.attack_steps``), TRADES' beta, the guard's image count).
  """
  adversarial: AdversarialSpec | None = AdversarialSpec("pgd")

  def validate(self) -> "AdversarialTrainingConfig":
    """Checks every field; returns self. Raises ConfigError naming the field."""
    if self.adversarial is None:
      raise ConfigError(f"`adversarial` must be one of {', '.join(METHODS)}; got None.")
    super().validate()
    return self


def adversarially_train(model: str | None, data: base.DataSpec,
                        config: AdversarialTrainingConfig
                        ) -> tuple[keras.Model, dict]:
  """Trains a classifier adversarially with ``training.train``.

  Args:
    model: the architecture to train from scratch (a ``models.MODEL_NAMES``
      name), or None for ``config.model`` (default: the C&W net for the
      data's image shape).
    data: the dataset and its limits.
    config: the recipe; exported if ``config.export_dir`` is set.

  Returns:
    (the float32 functional model with the best-robust-accuracy weights,
    its provenance: defense, config, results, robust-accuracy history).

  Raises:
    ConfigError: a bad config field.
    DataError: the data cannot be found.
  """
  config = data.apply(dataclasses.replace(config, model=model or config.model))
  config.validate()
  result = trainer.train(config)
  return result.model, base.record("adversarial_training", config, result.to_dict())
