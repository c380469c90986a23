"""``QuantizeConfig`` -> ``quantize()``: a float model in, a measured .tflite out (kd-quantize).

The stages, each optional but the conversion:

1. load the base model (``models.export.load_model``; its recorded dataset must
   be the config's, as kd-prune checks);
2. ``clusters`` >= 2: cluster its kernels (sparsity-preserving for a pruned
   model), fine-tune ``epochs`` epochs, strip (``clustering``);
3. ``method="qat_int8"``: fake-quantize (prune- or cluster-preserving when the
   model is pruned or clustered), calibrate its ranges on the representative
   images (``qat.calibrate_ranges``: PTQ's ranges), fine-tune ``epochs`` epochs,
   optionally on adversarial examples, PGD, FGSM-RS or TRADES (robust QAT);
4. convert (``conversion.convert``; a SavedModel untouched by 2-3 converts
   from its ``serving_default`` signature, anything else from the Keras model,
   a QAT model with its weight ranges set from the final weights);
   ``ptq_int8``/``qat_int8`` calibrate on ``representative_size`` images of the
   training split;
5. write ``export_path`` and its provenance ``<export_path>.json`` atomically,
   and measure: bytes raw and gzip against the parent's ``variables/``, top-1
   agreement with the parent on ``agreement_size`` test images (run on LiteRT);
6. ``qat_twin_path`` set (``qat_int8`` only): the fine-tuned fake-quantized
   Keras model, the QAT twin, as a SavedModel ``<qat_twin_path>/1`` (TF
   Serving layout; kd-evaluate ``--qat_twin`` runs the BPDA members through
   it), named in the provenance as ``qat_twin``.

Example:
  >>> result = quantize(QuantizeConfig(base_model_path="saved_models/mnist_m1_at_pgd/1",
  ...                                  dataset="mnist", method="ptq_int8",
  ...                                  export_path="/tmp/m.tflite"))
  >>> print(result.summary())
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import pathlib
import time

import numpy as np

from keras_defense import data
from keras_defense import training
from keras_defense.compression import clustering
from keras_defense.compression import conversion
from keras_defense.compression import measurement
from keras_defense.compression import qat
from keras_defense.models import export
from keras_defense.models import tflite
from keras_defense.util import io_utils
from keras_defense.util import provenance
from keras_defense.util.errors import UserError

METHODS = (*conversion.PTQ_METHODS, "qat_int8")
SIDECAR_SUFFIX = ".json"
# TFLite's PTQ guide suggests ~100-500 calibration samples.
DEFAULT_REPRESENTATIVE_SIZE = 500


@dataclasses.dataclass
class QuantizeConfig:
  """What kd-quantize does; ``validate()`` names a bad field."""
  base_model_path: str
  export_path: str
  dataset: str = "mnist"
  method: str = "ptq_int8"
  clusters: int = 0  # 0: no clustering; else centroids per kernel (>= 2)
  representative_size: int = DEFAULT_REPRESENTATIVE_SIZE
  int8_io: bool = False
  epochs: int = 2  # fine-tuning epochs of clustering and of QAT
  batch_size: int = 128
  learning_rate: float = 1e-4  # Adam, fine-tuning an already trained model
  train_limit: int | None = None
  # None, or robust QAT / clustering fine-tuning's attack (qat.fine_tuning_attack("pgd"|...)).
  adversarial: training.AdversarialSpec | None = None
  agreement_size: int = 1000  # test images for the agreement check (0: skip)
  qat_twin_path: str | None = None  # qat_int8: also export the QAT twin (SavedModel) here
  seed: int = 0
  data_dir: str | None = None
  manual_dir: str | None = None
  validation_size: int | None = None
  verbose: int = 2

  def validate(self) -> None:
    """Raises UserError naming the first bad field."""
    if self.method not in METHODS:
      raise UserError(f"`method` must be one of {', '.join(METHODS)}; got {self.method!r}.")
    if self.clusters != 0 and self.clusters < 2:
      raise UserError(f"`clusters` must be 0 (no clustering) or >= 2; got {self.clusters!r}.")
    if self.method in conversion.NEEDS_REPRESENTATIVE and self.representative_size < 1:
      raise UserError(f"`representative_size` must be >= 1 for {self.method}; "
                      f"got {self.representative_size!r}.")
    if self.int8_io and self.method not in conversion.NEEDS_REPRESENTATIVE:
      raise UserError(f"`int8_io` needs method ptq_int8 or qat_int8; got {self.method!r}.")
    if self.epochs < 0:
      raise UserError(f"`epochs` must be >= 0; got {self.epochs!r}.")
    if self.adversarial is not None:
      qat.check_attack(self.adversarial)
      if self.method != "qat_int8" and not self.clusters:
        raise UserError(f"`adversarial` fine-tunes, so it needs method qat_int8 or "
                        f"clusters >= 2; got method {self.method!r} without clustering.")
    if not str(self.export_path).endswith(".tflite"):
      raise UserError(f"`export_path` must end in .tflite; got {self.export_path!r}.")
    if self.qat_twin_path and self.method != "qat_int8":
      raise UserError(f"`qat_twin_path` needs method qat_int8 (only QAT makes a "
                      f"fake-quantized twin); got method {self.method!r}.")
    if self.agreement_size < 0:
      raise UserError(f"`agreement_size` must be >= 0; got {self.agreement_size!r}.")


@dataclasses.dataclass
class QuantizeResult:
  export_path: str
  provenance_path: str
  record: dict

  def summary(self) -> str:
    m = self.record["measurement"]
    parts = [f"{self.record['method']}{' + ' + str(self.record['clusters']) + ' clusters' if self.record['clusters'] else ''}",
             f"{m['tflite_bytes']:,} B ({m['bytes_ratio']:.3f}x float variables {m['float_variables_bytes']:,} B)",
             f"gzip {m['tflite_gzip_bytes']:,} B ({m['gzip_ratio']:.3f}x float variables)"]
    if m.get("agreement") is not None:
      parts.append(f"top-1 agreement {100 * m['agreement']:.2f}% on {m['agreement_images']} test images")
    return "; ".join(parts) + f"; {self.export_path}"


def _sha256(content: bytes) -> str:
  return hashlib.sha256(content).hexdigest()


def _litert_version() -> str:
  try:
    return importlib.metadata.version("ai-edge-litert")
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def quantize(config: QuantizeConfig) -> QuantizeResult:
  """Compresses ``config.base_model_path`` into ``config.export_path``; see the module doc.

  Raises:
    UserError: a bad config, a missing or foreign-dataset base model, data errors.
  """
  config.validate()
  start = time.time()
  base_record = export.check_model_dataset(config.base_model_path, config.dataset,
                                           what="base model")
  info = data.info(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
                   validation_size=config.validation_size)
  data_kwargs = {"data_dir": config.data_dir, "manual_dir": config.manual_dir,
                 "validation_size": config.validation_size}
  parent = export.load_model(config.base_model_path)
  model = parent
  x_check = None
  if config.agreement_size:  # the parent's logits before anything is fine-tuned
    x_check, _ = data.load_arrays(config.dataset, "test", limit=config.agreement_size,
                                  **data_kwargs)
    float_logits = parent.predict(x_check, batch_size=256, verbose=0)
  stages = []

  def train_batches():
    return data.load_split(config.dataset, "train", batch_size=config.batch_size, shuffle=True,
                           seed=config.seed, limit=config.train_limit, **data_kwargs)

  fine_tune = dict(epochs=config.epochs, learning_rate=config.learning_rate,
                   adversarial=config.adversarial, seed=config.seed, verbose=config.verbose)
  if config.clusters:
    sparse = qat.kernel_sparsity(model) >= qat.PRUNED_SPARSITY
    wrapped = clustering.cluster_model(model, number_of_clusters=config.clusters,
                                       preserve_sparsity=sparse)
    losses = qat.fine_tune(wrapped, train_batches(), **fine_tune)
    model = clustering.strip_clustering(wrapped)
    stages.append({"stage": "cluster", "number_of_clusters": config.clusters,
                   "preserve_sparsity": sparse, "epoch_losses": losses,
                   "unique_weights": clustering.unique_weight_counts(model)})
  representative = None
  if config.method in conversion.NEEDS_REPRESENTATIVE:
    representative, _ = data.load_arrays(config.dataset, "train",
                                         limit=config.representative_size, **data_kwargs)
  if config.method == "qat_int8":
    preserve = qat.preserve_for(model, clustered=bool(config.clusters))
    model = qat.quantize_for_training(model, preserve=preserve)
    calibrated = qat.calibrate_ranges(model, representative, batch_size=config.batch_size)
    losses = qat.fine_tune(model, train_batches(), **fine_tune)
    stages.append({"stage": "qat", "preserve": preserve, "epoch_losses": losses,
                   "ranges_calibrated": {"quantizers": calibrated,
                                         "images": int(len(representative))}})
  source = config.base_model_path if model is parent else model
  content = conversion.convert(source, config.method, representative=representative,
                               int8_io=config.int8_io)
  ops = tflite.check_builtin_ops(content, where="the converted model")

  export_path = pathlib.Path(config.export_path)
  blocker = io_utils.file_in_the_way(export_path.parent)
  if blocker is not None:
    raise UserError(f"`export_path` {str(export_path)!r} cannot be written: "
                    f"{str(blocker)!r} exists and is not a directory.")
  with io_utils.atomic_path(export_path) as tmp:
    pathlib.Path(tmp).write_bytes(content)

  variables = measurement.saved_model_variables(config.base_model_path)
  m = {"tflite_bytes": len(content), "tflite_gzip_bytes": measurement.gzipped_bytes(export_path),
       "float_variables_bytes": measurement.file_bytes(variables),
       "float_variables_gzip_bytes": measurement.gzipped_bytes(variables)}
  m["bytes_ratio"] = m["tflite_bytes"] / m["float_variables_bytes"]
  m["gzip_ratio"] = m["tflite_gzip_bytes"] / m["float_variables_bytes"]
  m["agreement"], m["agreement_images"] = None, 0
  if x_check is not None:
    m["agreement"] = measurement.agreement(float_logits, tflite.TFLiteModel(content)(x_check))
    m["agreement_images"] = int(len(x_check))

  record = provenance.model_provenance("quantize", info, base_model=config.base_model_path)
  twin = None
  if config.qat_twin_path:
    twin = str(export.export_saved_model(model, config.qat_twin_path, version=1,
                                         provenance=dict(record, qat_twin_of=str(export_path))))
  record["versions"]["ai_edge_litert"] = _litert_version()
  record.update({
      "method": config.method, "clusters": config.clusters, "int8_io": config.int8_io,
      "signature": export.SERVING_SIGNATURE, "ops": list(ops), "sha256": _sha256(content),
      "base_model_provenance": base_record,
      "representative": None if representative is None else {
          "split": "train", "size": int(len(representative)),
          "digest": conversion.representative_digest(representative)},
      "fine_tuning": None if not stages else {
          "epochs": config.epochs, "batch_size": config.batch_size,
          "learning_rate": config.learning_rate, "optimizer": "adam",
          "train_limit": config.train_limit, "seed": config.seed,
          "adversarial": (config.adversarial.identity() if config.adversarial else None)},
      "stages": stages, "measurement": m, "wall_seconds": time.time() - start,
      # Only when written: sidecars made before it read as before.
      **({"qat_twin": twin} if twin else {})})
  sidecar = str(export_path) + SIDECAR_SUFFIX
  io_utils.write_json(sidecar, record)
  return QuantizeResult(export_path=str(export_path), provenance_path=sidecar, record=record)


def read_provenance(tflite_path: str) -> dict | None:
  """The sidecar record kd-quantize wrote beside ``tflite_path`` (None if absent)."""
  p = pathlib.Path(str(tflite_path) + SIDECAR_SUFFIX)
  return io_utils.read_json(p) if p.is_file() else None
