"""The deployment table: each parent model as it ships (float, float16, int8, QAT, robust QAT,
clustered), measured and attacked, row by row, resumable (kd-experiment --deployment_row).

For each (parent, variant) row, in ``<run_dir>/<parent>/<variant>/``:

1. the artifact: the parent SavedModel itself (``float``), or a ``.tflite`` made
   by ``compression.quantize`` (kept and reused when its provenance sidecar exists);
2. bytes raw and gzip (a SavedModel's ``variables/``, a .tflite's file);
   latency per image on LiteRT (1 thread, batch 1, median; the float row on
   TensorFlow, named so); clean accuracy on ``clean_size`` test images and top-1
   agreement with the parent on them;
3. robust accuracy at each ε on the first ``robust_size`` test images:
   a .tflite by kd-evaluate's black-box ensemble (``evaluation.black_box``,
   transfer from the parent + Square on the interpreter; the QAT rows also BPDA
   through their QAT twin, which kd-quantize exports to ``<variant>_twin/1``), the
   float row by white-box AutoAttack (``twin_attacks``); the float parent's
   white-box number is shown beside every row. The transfer examples are
   crafted on the parent once per image and reused by its other artifacts
   (``<run_dir>/<parent>/transfer_cache/``, ``evaluation.transfer_cache``).

A finished row writes ``row.json``; a rerun skips it, and an interrupted
evaluation resumes (kd-evaluate's state). The report is rendered from the rows
finished so far (``reports.deployment_report``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from keras_defense import compression
from keras_defense import data
from keras_defense.compression import measurement
from keras_defense.evaluation.robustness_config import RobustnessConfig
from keras_defense.models import export
from keras_defense.models import tflite
from keras_defense.pipelines import evaluate
from keras_defense.reports import deployment_report
from keras_defense.util import io_utils
from keras_defense.util.errors import UserError

# variant -> (kd-quantize method, clusters, adversarial); None: the float SavedModel.
VARIANTS = {
    "float": None,
    "float16": ("ptq_float16", 0, None),
    "int8_ptq": ("ptq_int8", 0, None),
    "int8_qat": ("qat_int8", 0, None),
    "int8_robust_qat": ("qat_int8", 0, "pgd"),
    "clustered16_int8": ("ptq_int8", 16, None),
}


@dataclasses.dataclass
class DeploymentConfig:
  """What the deployment table measures; see the module doc."""
  parents: Sequence[tuple[str, str]]  # (name, SavedModel path)
  run_dir: str
  report_dir: str
  variants: Sequence[str] = tuple(VARIANTS)
  dataset: str = "mnist"
  epsilons: Sequence[float] = (0.1, 0.3)
  clean_size: int = 10000
  robust_size: int = 1000
  square_queries: int = 5000
  twin_version: str = "standard"
  twin_attacks: Sequence[str] | None = None
  fine_tune_epochs: int = 1
  train_limit: int | None = None
  latency_repeats: int = 200
  batch_size: int = 500
  seed: int = 0
  command: str | None = None

  def validate(self) -> "DeploymentConfig":
    bad = [v for v in self.variants if v not in VARIANTS]
    if bad:
      raise UserError(f"`variants` must be among {', '.join(VARIANTS)}; got {bad}.")
    if not self.parents:
      raise UserError("`parents` must name at least one NAME=SAVEDMODEL.")
    for name, path in self.parents:
      if not (pathlib.Path(path) / "saved_model.pb").is_file():
        raise UserError(f"parent {name!r}: {path!r} is not a SavedModel directory.")
    for field in ("clean_size", "robust_size", "square_queries", "latency_repeats"):
      if getattr(self, field) < 1:
        raise UserError(f"`{field}` must be >= 1; got {getattr(self, field)!r}.")
    return self


def _artifact(config: DeploymentConfig, parent: str, variant: str, out: pathlib.Path
              ) -> tuple[str, str | None]:
  """(the row's model, its QAT twin SavedModel or None), made once and reused."""
  spec = VARIANTS[variant]
  if spec is None:
    return parent, None
  path = out / f"{variant}.tflite"
  record = compression.read_provenance(str(path))
  if record is not None and path.is_file():
    twin = record.get("qat_twin")  # absent in artifacts made before twins were kept
    return str(path), twin if twin and pathlib.Path(twin).is_dir() else None
  method, clusters, adversarial = spec
  result = compression.quantize(compression.QuantizeConfig(
      base_model_path=parent, export_path=str(path), dataset=config.dataset, method=method,
      clusters=clusters, epochs=config.fine_tune_epochs,
      adversarial=compression.fine_tuning_attack(adversarial) if adversarial else None,
      train_limit=config.train_limit, seed=config.seed, agreement_size=0, verbose=0,
      qat_twin_path=str(out / f"{variant}_twin") if method == "qat_int8" else None))
  return str(path), result.record.get("qat_twin")


def _evaluate(config: DeploymentConfig, model: str, parent: str, run_dir: pathlib.Path,
              *, white_box: bool, qat_twin: str | None = None,
              transfer_cache: pathlib.Path | None = None):
  rc = RobustnessConfig(
      model=model, run_dir=str(run_dir), dataset=config.dataset,
      epsilons=tuple(config.epsilons), n_examples=config.robust_size,
      version="custom" if (white_box and config.twin_attacks) else "standard",
      attacks=tuple(config.twin_attacks) if (white_box and config.twin_attacks) else None,
      output_key="logits" if model == parent else None, seed=config.seed,
      batch_size=config.batch_size, surrogate=None if white_box else parent,
      qat_twin=qat_twin, transfer_cache=str(transfer_cache) if transfer_cache else None,
      square_queries=config.square_queries,
      slice_size=max(1, config.robust_size))  # one slice, as auto_attack
  return evaluate.run(rc).to_dict()


def _robust(results: dict) -> dict:
  return {f"{p['eps']:g}": {"robust": p["n_robust"], "n": results["n_examples"],
                            "per_attack": {s["attack"]: s["broken"] for s in p["attacks"]}}
          for p in results["per_eps"]}


def run_row(config: DeploymentConfig, name: str, parent: str, variant: str,
            x: np.ndarray, y: np.ndarray, parent_pred: np.ndarray, twin: dict) -> dict:
  out = pathlib.Path(config.run_dir) / name / variant
  done = out / "row.json"
  if done.is_file():
    return io_utils.read_json(done)
  start = time.time()
  out.mkdir(parents=True, exist_ok=True)
  artifact, qat_twin = _artifact(config, parent, variant, out)
  is_float = artifact == parent
  sized = measurement.saved_model_variables(parent) if is_float else artifact
  if is_float:
    keras_model = export.load_model(parent)
    pred = parent_pred
    latency = measurement.latency_seconds(lambda b: keras_model(b, training=False), x[0],
                                          repeats=config.latency_repeats)
  else:
    lite = tflite.TFLiteModel(artifact, num_threads=1)
    pred = lite.predict_classes(x)
    latency = measurement.latency_seconds(lite, x[0], repeats=config.latency_repeats)
  # The parent's transfer examples are crafted once, then judged on each of its artifacts.
  results = twin if is_float else _evaluate(config, artifact, parent, out / "evaluate",
                                            white_box=False, qat_twin=qat_twin,
                                            transfer_cache=out.parent / "transfer_cache")
  row = {"parent": name, "parent_path": parent, "variant": variant, "artifact": artifact,
         "runtime": "TensorFlow (SavedModel)" if is_float else "LiteRT",
         "bytes": measurement.file_bytes(sized), "gzip_bytes": measurement.gzipped_bytes(sized),
         "latency_seconds": latency, "clean_correct": int((pred == y).sum()),
         "clean_n": int(len(y)), "agreement": float(np.mean(pred == parent_pred)),
         "attack": "white-box AutoAttack" if is_float else "black-box ensemble",
         "qat_twin": qat_twin,
         "attacks": results["attacks"], "robust": _robust(results),
         "twin_robust": _robust(twin),
         "provenance": compression.read_provenance(artifact) if not is_float else None,
         "seconds": time.time() - start}
  io_utils.write_json(done, row)
  return row


def run(config: DeploymentConfig, *, progress: Callable[[int, int, str], None] | None = None
        ) -> dict[str, Any]:
  """Runs (or resumes) every row, then writes the report; returns {rows, missing, artifacts}."""
  config.validate()
  progress = progress or (lambda done, total, desc: None)
  x, y = data.load_arrays(config.dataset, "test", limit=config.clean_size)
  rows, total = [], len(config.parents) * len(config.variants)
  for name, parent in config.parents:
    keras_model = export.load_model(parent)
    parent_pred = np.concatenate([np.argmax(keras_model(x[i:i + 1000], training=False), -1)
                                  for i in range(0, len(x), 1000)])
    twin = _evaluate(config, parent, parent, pathlib.Path(config.run_dir) / name / "twin",
                     white_box=True)
    for variant in config.variants:
      progress(len(rows), total, f"{name} {variant}")
      rows.append(run_row(config, name, parent, variant, x, y, parent_pred, twin))
  artifacts = deployment_report.write(config.report_dir, rows, config=dataclasses.asdict(config))
  progress(total, total, "report")
  return {"rows": rows, "artifacts": artifacts}
