"""Thin registry entries for the two defenses that still live at the top level.

``keras_defense.pruning`` (M0 -> M1) and ``keras_defense.logits_augmentation``
(M1 -> M2) move into this package later (issue 14, item 1); until then these
entries give them the defenses' common shape by calling the existing modules
unchanged, so their behaviour and the shipped results stay as they are.
"""

from __future__ import annotations

import dataclasses

from keras_defense.compat import keras
from keras_defense.defenses import base


def prune_defense(model: str, data: base.DataSpec, config) -> tuple[keras.Model, dict]:
  """``pruning.prune`` of the SavedModel at ``model`` (default: ``config.base_model_path``).

  Args:
    model: path of the SavedModel to prune, or None for ``config.base_model_path``.
    data: the dataset and its limits.
    config: a ``pruning.PruneConfig``.

  Returns:
    (the stripped pruned model, provenance with the pruning results).
  """
  from keras_defense import pruning  # pylint: disable=g-import-not-at-top  (tfmot)
  config = data.apply(dataclasses.replace(config, base_model_path=model or
                                          config.base_model_path))
  result = pruning.prune(config)
  return result.model, base.record("pruning", config, result.to_dict())


def augment_defense(model: str, data: base.DataSpec, config) -> tuple[keras.Model, dict]:
  """``logits_augmentation.augment`` of the SavedModel at ``model`` (default: the config's).

  Args:
    model: path of the SavedModel to transform, or None for ``config.base_model_path``.
    data: the dataset (measured on its test split).
    config: a ``logits_augmentation.AugmentConfig``.

  Returns:
    (the transformed model, provenance with agreement and accuracies).
  """
  from keras_defense import logits_augmentation  # pylint: disable=g-import-not-at-top
  config = data.apply(dataclasses.replace(config, base_model_path=model or
                                          config.base_model_path))
  result = logits_augmentation.augment(config)
  return result.model, base.record(config.transform, config, result.to_dict())
