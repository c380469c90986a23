"""Compression of a trained classifier into what ships: quantization, clustering, TFLite.

A package of its own, one layer between ``defenses`` and ``training``
(``.importlinter``): compression is not a defense (it is what a user does to
any model, defended or not, before deploying it) and it needs nothing from the
defenses, while defenses and pipelines may use it (a future registry entry, the
deployment table). Robust QAT's adversarial batches come from ``training.attack``,
the inner maximisation adversarial training runs.
The TFLite *runtime* side, a flatbuffer as a model, lives in
``models.tflite`` so that every layer can evaluate one.

- ``conversion``: PTQ (dynamic, int8 with a representative set, float16) and
  QAT-model conversion, one signature only;
- ``qat``: tfmot quantization-aware training (plain, prune-preserving,
  cluster-preserving), optionally on PGD examples;
- ``clustering``: tfmot weight clustering and strip;
- ``measurement``: bytes raw/gzip, top-1 agreement, LiteRT latency;
- ``quantization``: ``QuantizeConfig`` -> ``quantize()`` (kd-quantize), the
  .tflite and its provenance sidecar ``<out>.tflite.json``.

Example:
  >>> from keras_defense import compression
  >>> result = compression.quantize(compression.QuantizeConfig(
  ...     base_model_path="saved_models/mnist_m1_at_pgd/1", dataset="mnist",
  ...     method="ptq_int8", export_path="/tmp/m.tflite"))
"""

from keras_defense.compression.clustering import cluster_model
from keras_defense.compression.clustering import strip_clustering
from keras_defense.compression.clustering import unique_weight_counts
from keras_defense.compression.conversion import convert
from keras_defense.compression.conversion import CONVERSIONS
from keras_defense.compression.conversion import PTQ_METHODS
from keras_defense.compression.conversion import representative_digest
from keras_defense.compression.qat import calibrate_ranges
from keras_defense.compression.qat import fine_tune
from keras_defense.compression.qat import fine_tuning_attack
from keras_defense.compression.qat import kernel_sparsity
from keras_defense.compression.qat import quantize_for_training
from keras_defense.compression.qat import set_weight_ranges
from keras_defense.compression.quantization import METHODS
from keras_defense.compression.quantization import quantize
from keras_defense.compression.quantization import QuantizeConfig
from keras_defense.compression.quantization import QuantizeResult
from keras_defense.compression.quantization import read_provenance
