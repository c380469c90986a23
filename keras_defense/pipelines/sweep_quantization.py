"""The sweep's quantized points: what ships, converted, measured and attacked black-box.

A quantized point (``sweep_grid.Point.quantization`` ptq_int8 or qat_int8) is
its float point's model (the pruned / augmented SavedModel) converted into a
``.tflite`` by ``compression.quantize`` (kd-quantize's library): full-integer
PTQ calibrated on 500 training images, or tfmot quantization-aware fine-tuning
for ``quantize_epochs`` epochs (prune-preserving for a pruned model, so the
zeros survive) then int8, which also exports the QAT twin. ``build`` makes it
in ``<run_dir>/parents/<key>/`` (stage ``quantize``, under the parents' lock).

``evaluate`` attacks it the only honest way a model without gradients can be
attacked: kd-evaluate's black-box ensemble (``evaluation.black_box`` through
``pipelines.evaluate.run``, in ``<run_dir>/work/<key>/black_box/<tag>/``,
resumable) on the LiteRT interpreter, with the float point as the surrogate
(transfer-pgd, transfer-apgd-ce, transfer-apgd-t), the QAT twin for BPDA
(bpda-apgd-ce, bpda-apgd-t; qat_int8 only) and Square
(``SweepConfig.square_queries``; the transfer examples crafted once per float
point, in ``<run_dir>/work/transfer_cache/``), on the images the float points' robust
accuracy uses (the AutoAttack sample). Its record has the float points'
fields (robust accuracy = the ensemble's per-image worst case, Wilson
interval; clean accuracy on the interpreter; the float model's weight counts)
plus ``bytes``/``gzip_bytes`` of the .tflite, ``agreement`` (top-1 with the
float point on the test images) and ``black_box`` (attacks, images broken by
each); ``zero_gradient_fraction`` and the FGSM/BIM ``success`` rates are
empty (white-box attacks cannot run on it).

Example:
  >>> config = dataclasses.replace(config, quantization=("none", "ptq_int8"))
  >>> sweep.run(config)   # the ptq_int8 points are built and evaluated here
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Any

import numpy as np

from keras_defense import attacks
from keras_defense import compression
from keras_defense.compression import measurement
from keras_defense.compression import quantization
from keras_defense.evaluation import robustness
from keras_defense.evaluation import sweep_grid
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.evaluation.sweep_grid import Point
from keras_defense.evaluation.sweep_grid import SweepConfig
from keras_defense.models import architectures
from keras_defense.models import tflite
from keras_defense.pipelines import evaluate as evaluate_pipeline
from keras_defense.util import io_utils
from keras_defense.util import progress as progress_lib
from keras_defense.util.errors import UserError

TFLITE = "model.tflite"
TWIN = "twin"  # <parent>/twin/1: the QAT twin (SavedModel) of a qat_int8 point


def settings(config: SweepConfig, p: Point) -> dict[str, Any]:
  """What a quantized model depends on beyond its float parent (bound in its done.json)."""
  return {"method": p.quantization, "train_limit": config.train.train_limit,
          "representative_size": quantization.DEFAULT_REPRESENTATIVE_SIZE,
          "seed": config.seed,
          **({"epochs": config.quantize_epochs} if p.quantization == "qat_int8" else {})}


def build(config: SweepConfig, p: Point, base: str, pdir: pathlib.Path) -> dict:
  """Converts the float model ``base`` into ``<pdir>/model.tflite``; the done.json record.

  ``saved_model`` names the .tflite (the parents' common field, made relative
  to the run directory by the caller); ``qat_twin`` the twin, relative too.
  """
  run_dir = pathlib.Path(config.run_dir)
  qat = p.quantization == "qat_int8"
  result = compression.quantize(compression.QuantizeConfig(
      base_model_path=base, export_path=str(pdir / TFLITE), dataset=config.dataset,
      method=p.quantization, epochs=config.quantize_epochs,
      train_limit=config.train.train_limit, seed=config.seed, agreement_size=0,
      data_dir=config.data_dir, manual_dir=config.manual_dir,
      validation_size=config.train.validation_size, verbose=0,
      qat_twin_path=str(pdir / TWIN) if qat else None))
  twin = result.record.get("qat_twin")
  return {"saved_model": result.export_path, "float_model": io_utils.relative_to(base, run_dir),
          "qat_twin": io_utils.relative_to(twin, run_dir) if twin else None,
          "settings": settings(config, p), "measurement": result.record["measurement"]}


def check_built(config: SweepConfig, p: Point, pdir: pathlib.Path, path: str
                ) -> tuple[str, str | None]:
  """(the .tflite, its QAT twin or None) of a built quantized point.

  Raises:
    UserError: it was built with other settings (e.g. another ``quantize_epochs``).
  """
  record = io_utils.read_json(pdir / "done.json")
  want = settings(config, p)
  if record.get("settings") != want:
    raise UserError(f"quantized model {p.key} in {str(pdir)!r} was built with "
                    f"{record.get('settings')}, but this sweep asks for {want}. Fix: the "
                    f"same --quantize_epochs/--train_flagfile as before, or another --run_dir.")
  twin = record.get("qat_twin")
  return path, str(pathlib.Path(config.run_dir) / twin) if twin else None


def evaluate(sweep: Any, p: Point) -> dict:
  """A quantized point's record (see the module doc); ``sweep`` is ``pipelines.sweep``'s
  run-directory object (its parents, loaded models, test images and progress)."""
  c, e = sweep.c, sweep.c.eval
  t0 = time.time()
  m0_path, float_path = sweep.m0(p), sweep.model(p.float_point())
  lite_path, twin = sweep.quantized(p)
  start = time.time()
  x, y = sweep.test_arrays()
  lite = tflite.TFLiteModel(lite_path)
  float_model = sweep.load_model(float_path)
  pred = lite.predict_classes(x)
  float_pred = attacks.predict_classes(float_model, x)
  n = len(x) if e.eval_size is None else min(len(x), int(e.eval_size))
  if e.autoattack_version != "none" and e.autoattack_size is not None:
    n = min(n, int(e.autoattack_size))  # the float points' robust images
  rel = lambda path: io_utils.relative_to(path, sweep.dir)  # pylint: disable=unnecessary-lambda-assignment
  bound = {"eps": c.epsilon, "n": n, "square_queries": c.square_queries,
           "batch_size": e.autoattack_batch_size, "seed": e.seed,
           "surrogate": rel(float_path), "qat_twin": rel(twin) if twin else None}
  tag = hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()[:10]
  bb_dir = sweep.dir / "work" / p.key / "black_box" / tag
  result = evaluate_pipeline.run(RobustnessConfig(
      model=lite_path, run_dir=str(bb_dir), dataset=c.dataset, norm="linf",
      epsilons=(c.epsilon,), n_examples=n, version="standard", seed=e.seed,
      batch_size=e.autoattack_batch_size, data_dir=c.data_dir, manual_dir=c.manual_dir,
      surrogate=float_path, qat_twin=twin, square_queries=c.square_queries,
      # ptq_int8 and qat_int8 of one float point judge the same transfer examples.
      transfer_cache=str(sweep.dir / "work" / "transfer_cache"), slice_size=max(1, n)),
      progress=progress_lib.labelled(sweep.progress, f"{p.key} black-box"))
  masks = robustness.robust_masks(bb_dir)
  mask = next(v for eps, v in masks.items() if np.isclose(eps, c.epsilon))
  per_eps = result.to_dict()["per_eps"][0]
  total0, _ = architectures.count_weights(sweep.load_model(m0_path))
  total, nonzero = architectures.count_weights(float_model)
  return {
      **sweep_grid.record_head(
          c, p, clean_acc=float(np.mean(pred == y)), n_clean=int(len(y)), n=len(mask),
          n_robust=int(mask.sum()), definition=(
              "per-image worst case at eps of kd-evaluate's black-box ensemble on the "
              f".tflite (LiteRT): {', '.join(result.attacks)}")),
      "autoattack": None,
      "black_box": {"attacks": list(result.attacks), "square_queries": c.square_queries,
                    "broken": {s["attack"]: s["broken"] for s in per_eps["attacks"]},
                    "clean_acc": result.clean_acc, "dir": str(bb_dir.relative_to(sweep.dir))},
      "nonzero_params": nonzero, "total_params": total,
      "compression_ratio": total0 / max(nonzero, 1),
      "zero_gradient_fraction": None, "success": {},
      "saved_model": rel(lite_path), "float_saved_model": rel(float_path),
      "qat_twin": rel(twin) if twin else None, "m0_saved_model": rel(m0_path),
      "bytes": measurement.file_bytes(lite_path),
      "gzip_bytes": measurement.gzipped_bytes(lite_path),
      "agreement": float(np.mean(pred == float_pred)),
      "seconds": time.time() - start, "build_seconds": start - t0,
  }
