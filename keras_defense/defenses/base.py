"""The common shape of a defense: which data, and what a defended model records.

Every defense is a config dataclass with ``validate()`` and a function
``fn(model, data, config) -> (defended_model, provenance)``, where ``data`` is a
``DataSpec`` and ``provenance`` a JSON-able dict (``record``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keras_defense import training
from keras_defense.util import provenance as provenance_lib


@dataclasses.dataclass
class DataSpec:
  """Which data a defense trains or measures on; fills the same-named config fields."""
  dataset: str = "mnist"
  data_dir: str | None = None
  manual_dir: str | None = None
  train_limit: int | None = None
  test_limit: int | None = None
  validation_size: int | None = None

  def apply(self, config: Any) -> Any:
    """A copy of ``config`` with every field of this spec that ``config`` also has."""
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in dataclasses.asdict(self).items()
                                          if k in names})


def record(defense: str, config: Any, results: dict | None = None, **extra) -> dict:
  """A defended model's provenance: the defense, its full config, results, versions.

  The config as its flags name it (``training.config_dict``).
  """
  return {"defense": defense, "config": training.config_dict(config),
          "results": dict(results or {}), **extra, "versions": provenance_lib.versions()}
