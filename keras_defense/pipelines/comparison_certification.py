"""The defenses comparison's certified column: a proof beside every AutoAttack number.

``certify_rows(config, rows)`` gives every finished row a ``certified``
record (``evaluation.certified.Certified.to_dict``): certified accuracy at
each AutoAttack ε on the same first images AutoAttack attacked, the union of
``config.certify``'s bound methods. It needs only the row's saved model and
the test images, so it runs at the report stage (``--stages=report`` too):
rows finished before the column existed get it without rerunning an attack.
Randomized rows, models the bounds cannot read, and rows whose model is not in
the checkout or is not the one their attacks ran on (its SHA-256) get "n/a" and
the reason.

Each row's certificate is kept in ``<run_dir>/certified/<key>.json``, bound to
the model's SHA-256, the ε, the image count and the methods (recomputed when
any differs). When the row's AutoAttack state and grid cells are in the run
directory, every certified image is checked against them
(``certified.check_sound``: an image certified at ε that AutoAttack or an
FGSM/BIM cell broke at ε raises ``CertificationBug``); always, the certified
count must not exceed AutoAttack's robust count.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import logging
import numpy as np

from keras_defense import data
from keras_defense.certify import bounds
from keras_defense.evaluation import certified as cert_lib
from keras_defense.evaluation import grid as evaluation
from keras_defense.models import classifier as clf_lib
from keras_defense.pipelines import comparison_rows
from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

RANDOMIZED = ("randomized at inference (Defensive Dropout): a certificate holds for one "
              "deterministic function")


def _outcomes(config, row: dict, keys: Sequence[str], n: int, epsilons: Sequence[float]
              ) -> tuple[list[cert_lib.AttackOutcome], np.ndarray | None]:
  """The attacks' per-image outcomes for ``row`` that the run directory still holds."""
  run_dir = pathlib.Path(config.run_dir)
  outcomes, clean = [], None
  aa_dir = (row.get("autoattack") or {}).get("dir")
  if aa_dir and (run_dir / aa_dir / "state").is_dir():
    outcomes += cert_lib.attack_outcomes(run_dir / aa_dir)
    clean_file = run_dir / aa_dir / "state" / "clean.npz"
    if clean_file.is_file():
      with np.load(clean_file) as st:
        clean = st["pred"]
  cells = run_dir / "attack" / "cells"
  e = config.eval
  if cells.is_dir() and e.attacks:
    for eps in epsilons:
      if not any(np.isclose(eps, g) for g in e.epsilons):
        continue
      n_grid = min(n, row["n_grid"])
      try:
        fooled, _ = evaluation.fooled_mask(cells, list(keys), keys[0], e, model=row["key"],
                                           epsilon=eps, n=n_grid)
      except UserError as err:  # cells made before per-image masks were kept
        logging.warning("row %s: grid cells not readable for the certified check (%s)",
                        row["name"], err)
        continue
      outcomes.append(cert_lib.AttackOutcome(eps=float(eps), attack="FGSM/BIM grid",
                                             broken=np.flatnonzero(fooled)))
  return outcomes, clean


def _model_digest(row: dict) -> tuple[str | None, str | None]:
  """(the row's model SHA-256, None), or (None, why it cannot be certified for the row).

  A certificate speaks for the row only on the model its attacks ran on: the
  model must be in this checkout (a row kept from an earlier run may name one
  built there and never committed) and, when the row recorded the attacked
  model's SHA-256 (``comparison_rows.attacked_sha256``), have that digest.
  """
  path = row["saved_model"]
  if not pathlib.Path(path).exists():
    return None, (f"the row's model {path} is not in this checkout (a row kept from the run "
                  f"that built it); rebuild the model and rerun the row to certify it")
  attacked = comparison_rows.attacked_sha256(row)
  digest = clf_lib.fingerprint(path)
  if attacked and attacked != digest:
    return None, (f"the model at {path} (SHA-256 {digest[:12]}…) is not the one this row's "
                  f"attacks ran on ({attacked[:12]}…); rerun the row to certify it")
  return digest, None


def certify_row(config, row: dict, keys: Sequence[str]) -> dict[str, Any]:
  """The row's ``certified`` record (cached in ``<run_dir>/certified/<key>.json``)."""
  methods = bounds.check_methods(config.certify, "certify")
  epsilons = sorted(float(e) for e in config.eval.autoattack_eps)
  n = row["per_eps"][f"{epsilons[0]:g}"]["n_examples"]
  if row["randomized"]:
    return cert_lib.Certified(methods=methods, norm="linf", n=n, reason=RANDOMIZED).to_dict()
  digest, unusable = _model_digest(row)
  if unusable:
    return cert_lib.Certified(methods=methods, norm="linf", n=n, reason=unusable).to_dict()
  path = pathlib.Path(config.run_dir) / "certified" / f"{row['key']}.json"
  binding = {"model_sha256": digest, "eps": epsilons,
             "n_examples": n, "methods": list(methods), "dataset": config.dataset}
  if path.is_file():
    saved = io_utils.read_json(path)
    if saved.get("binding") == binding:
      return saved["certified"]
  model, reason = cert_lib.bounded_model(row["saved_model"])
  x = y = None
  if model is not None:
    x, y = data.load_arrays(config.dataset, "test", limit=n, data_dir=config.data_dir,
                            manual_dir=config.manual_dir)
  cert = cert_lib.certify_model(model, x, y, epsilons, norm="linf", methods=methods,
                                reason=reason)
  if cert.available:
    outcomes, clean = _outcomes(config, row, keys, n, epsilons)
    if clean is not None:
      reason = cert_lib.predicts_like(model, x, clean)
      if reason:  # the bounds would speak for another function
        cert = cert_lib.Certified(methods=methods, norm="linf", n=n, reason=reason)
    if cert.available:
      cert_lib.check_sound(
          cert, outcomes, clean_correct=None if clean is None else clean == y,
          robust_counts={float(p["eps"]): p["autoattack_n_robust"]
                         for p in row["per_eps"].values()})
  record = cert.to_dict()
  io_utils.write_json(path, {"binding": binding, "certified": record})
  return record


def certify_rows(config, rows: list[dict]) -> list[dict]:
  """``rows`` with each one's ``certified`` record added (the row files are not rewritten)."""
  keys = [r.key for r in config.rows]
  out = []
  for row in rows:
    mine = keys[:1] if row["key"] == keys[0] else [keys[0], row["key"]]
    out.append(dict(row, certified=certify_row(config, row, mine)))
  return out
