"""Defenses, one module each, one common shape.

Every defense is a config dataclass with ``validate()`` (a bad value raises
``training.ConfigError`` naming the field) and a function
``fn(model, data, config) -> (defended_model, provenance)``: ``model`` is the
base model (a Keras model, a SavedModel path, or an architecture name / None
for defenses trained from scratch), ``data`` a ``DataSpec``, and the defended
model a plain functional model that ``export.export_saved_model`` exports and
``export.load_model`` loads. ``REGISTRY`` maps each defense's name to its
``(config class, function)`` for experiments to read.

- ``trainer``: the trained defenses' step for ``training.train``
  (``DefenseTrainer``, the robust-accuracy guard, ``DefenseSetup``) and
  ``train``, which gives ``training.train`` that step: what ``kd-train``,
  ``kd.train`` and the pipelines call.
- ``adversarial_training``: PGD-AT, FGSM-RS, TRADES on ``train``
  (``training.attack``: the inner maximisation inside the step).
- ``distillation``: defensive distillation at temperature T.
- ``dropout``: Defensive Dropout, dropout active at inference.
- ``pruning``: tfmot magnitude pruning, M0 -> M1 (``prune``, ``prune_defense``).
- ``logits_augmentation``: logits augmentation and gradient inhibition, M1 -> M2
  (``augment``, ``augment_defense``).

Example:
  >>> config_class, fn = REGISTRY["defensive_dropout"]
  >>> defended, record = fn(m0, DataSpec("mnist"), config_class(rate=0.3))
"""

from keras_defense.defenses import logits_augmentation as _logits_augmentation
from keras_defense.defenses import pruning as _pruning
from keras_defense.defenses.adversarial_training import adversarially_train
from keras_defense.defenses.adversarial_training import AdversarialTrainingConfig
from keras_defense.defenses.adversarial_training import METHODS as ADVERSARIAL_METHODS
from keras_defense.defenses.base import DataSpec
from keras_defense.defenses.distillation import distill
from keras_defense.defenses.distillation import DistillationConfig
from keras_defense.defenses.dropout import add_inference_dropout
from keras_defense.defenses.dropout import defensive_dropout
from keras_defense.defenses.dropout import DefensiveDropoutConfig
from keras_defense.defenses.trainer import defense_factory
from keras_defense.defenses.trainer import DefenseSetup
from keras_defense.defenses.trainer import DefenseTrainer
from keras_defense.defenses.guards import robust_accuracy
from keras_defense.defenses.guards import RobustAccuracyGuard
from keras_defense.defenses.trainer import train
from keras_defense.training.attack import craft

REGISTRY = {
    "adversarial_training": (AdversarialTrainingConfig, adversarially_train),
    "distillation": (DistillationConfig, distill),
    "defensive_dropout": (DefensiveDropoutConfig, defensive_dropout),
    "pruning": (_pruning.PruneConfig, _pruning.prune_defense),
    "logits_augmentation": (_logits_augmentation.AugmentConfig,
                            _logits_augmentation.augment_defense),
}
