"""What a robustness evaluation (``kd-evaluate``) evaluates: ``RobustnessConfig``.

Below both the runner (``robustness``) and its result types
(``robustness_result``), so each can name the config without knowing the other.
Field names match kd-evaluate's flags; ``identity()`` is what a run directory is
bound to.

Example:
  >>> config = RobustnessConfig(model="saved_models/mnist_m0/1", output_key="logits",
  ...                           run_dir="runs/eval_m0", epsilons=(0.3,)).validate()
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keras_defense.certify import bounds as _bounds
from keras_defense.models import pixels as pixels_lib
from keras_defense.util import config_checks
from keras_defense.util.errors import UserError

NORMS = ("linf", "l2")
VERSIONS = ("standard", "plus", "rand", "custom")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_BATCH_SIZE = 500
DEFAULT_SQUARE_QUERIES = 5000  # AutoAttack's
# Images per slice (robustness_state): 1,000 keeps every run of up to 1,000
# images (kd-experiment's AutoAttack) one slice, i.e. the calls auto_attack makes.
DEFAULT_SLICE_SIZE = 1000
# tf.distribute strategies kd-evaluate runs under (``replicas``); across
# machines it runs shards, not MultiWorkerMirroredStrategy.
STRATEGIES = ("default", "mirrored")


@dataclasses.dataclass
class RobustnessConfig(pixels_lib.PixelFields):
  """What ``kd-evaluate`` evaluates; field names match its flags.

  Attributes:
    model: a SavedModel directory or a .keras/.h5 file (tf_keras or Keras 3).
    run_dir: where state, results.json, report.md, TensorBoard and the grid go.
    dataset: tfds dataset, folder:PATH or npz:PATH (``inputs``), optionally
      @HxWxC; its test split is used.
    norm: "linf" or "l2".
    epsilons: radii > 0 in pixel units of [0, 1] images.
    n_examples: the first n test images (RobustBench: 10,000).
    version: AutoAttack version: standard, plus, rand or custom.
    attacks: the attacks of version="custom" (names as ``autoattack.plan``
      knows them); None otherwise.
    signature: the SavedModel signature to call.
    output_key: the signature's output holding logits or probabilities.
    allow_ops: ops the SavedModel may hold although they touch the outside
      world (``models.scan.DENYLIST``), each named explicitly; any other is
      refused before the model is loaded. Not part of the run's identity:
      it decides whether the model runs, not the numbers.
    seed: the attacks' seed.
    batch_size: images per attack call; None chooses it from the memory
      available (``attacks.memory``), once per run directory.
    slice_size: images attacked together, each slice with its own seed; a
      shard takes whole slices (``robustness_state``).
    shard_index, num_shards: this process attacks shard ``shard_index`` of
      ``num_shards`` into ``<run_dir>/shards/<i>-of-<n>/``.
    merge: combine the finished shards of ``run_dir`` into its results.
    compute_dtype: passed to the attacks.
    data_dir, manual_dir: see ``data.prepare``.
    command: the command line, recorded in the report.
    input_range, mean, std: the model's pixel convention
      (``pixels.PixelConvention``); attacks work in [0, 1] pixels and ε.
    surrogate: for a ``.tflite`` model (no gradients): the differentiable twin
      (any model kd-evaluate loads) whose APGD/PGD examples are transferred
      (``black_box``); None: Square alone.
    qat_twin: for a ``.tflite`` model: the tfmot quantization-aware (QAT)
      model it was converted from, as a SavedModel; adds the BPDA members
      (APGD through its fake quantization, straight-through gradients,
      judged on the interpreter). None: the surrogate when it is itself a QAT
      model (``black_box.qat_twin_path``), else no BPDA.
    square_queries: Square's query budget per image in the black-box ensemble.
    strategy: "default" (one device) or "mirrored": every model call of the
      attacks is split across the replicas of a ``tf.distribute``
      MirroredStrategy (``replicas``); ``batch_size`` stays the global batch.
      Not part of the run's identity: it changes where the numbers are
      computed (up to floating-point summation order), not what is computed.
    num_cpu_devices: with "mirrored" and no GPU, logical CPU devices
      (default 2).
    transfer_cache: for a ``.tflite`` model with a surrogate: a directory where
      the ``transfer-*`` examples are stored per image and reused by later
      runs on the same surrogate file and pixel convention, attack, norm, ε
      and seed (``evaluation.transfer_cache``); None: crafted every run. Not part of
      the run's identity: the examples are the same attack's on the same
      surrogate either way.
    certify: bound methods (``certify.bounds.METHODS``) whose certified
      accuracy is reported beside the robust accuracy (``evaluation.certified``:
      an image counts when any method proves it; n/a with the reason for a
      model the bounds cannot read); () for none. Not part of the run's
      identity: it adds a lower bound, it does not change the attacks.
  """
  model: str
  run_dir: str
  dataset: str = "mnist"
  norm: str = "linf"
  epsilons: tuple[float, ...] = (0.3,)
  n_examples: int = 10000
  version: str = "standard"
  attacks: tuple[str, ...] | None = None
  signature: str = "serving_default"
  output_key: str | None = None
  allow_ops: tuple[str, ...] = ()
  seed: int = 0
  batch_size: int | None = DEFAULT_BATCH_SIZE
  slice_size: int = DEFAULT_SLICE_SIZE
  shard_index: int = 0
  num_shards: int = 1
  merge: bool = False
  compute_dtype: str = "float32"  # "auto" may pick bfloat16, which costs strength
  data_dir: str | None = None
  manual_dir: str | None = None
  command: str | None = None
  surrogate: str | None = None
  square_queries: int = DEFAULT_SQUARE_QUERIES
  qat_twin: str | None = None
  strategy: str = "default"
  num_cpu_devices: int | None = None
  certify: tuple[str, ...] = ()
  transfer_cache: str | None = None

  def validate(self) -> "RobustnessConfig":
    """Checks every field; returns self.

    Raises:
      UserError: a field out of range, naming it.
    """
    need = config_checks.run_checker(self.model, self.run_dir)
    need(self.norm in NORMS, f"`norm` must be one of {', '.join(NORMS)}; got {self.norm!r}.")
    need(self.version in VERSIONS,
         f"`version` must be one of {', '.join(VERSIONS)}; got {self.version!r}.")
    config_checks.check_epsilons(self.norm, self.epsilons)
    need(isinstance(self.n_examples, int) and self.n_examples >= 1,
         f"`n_examples` must be an integer >= 1; got {self.n_examples!r}.")
    need(self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
         f"`batch_size` must be an integer >= 1 (or None: chosen from memory); got "
         f"{self.batch_size!r}.")
    need(isinstance(self.slice_size, int) and self.slice_size >= 1,
         f"`slice_size` must be an integer >= 1; got {self.slice_size!r}.")
    need(isinstance(self.num_shards, int) and self.num_shards >= 1,
         f"`num_shards` must be an integer >= 1; got {self.num_shards!r}.")
    need(isinstance(self.shard_index, int) and 0 <= self.shard_index < self.num_shards,
         f"`shard_index` must be in [0, num_shards={self.num_shards}); got "
         f"{self.shard_index!r}.")
    need(not (self.merge and self.num_shards > 1),
         f"`merge` combines the shards already run; pass it without `shard_index`/"
         f"`num_shards` (got num_shards={self.num_shards}).")
    need(self.compute_dtype in COMPUTE_DTYPES, f"`compute_dtype` must be one of "
         f"{', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}.")
    need(all(isinstance(op, str) and op for op in self.allow_ops),
         f"`allow_ops` must be op names such as WriteFile; got {list(self.allow_ops)!r}.")
    if self.version == "custom":
      need(bool(self.attacks), "version 'custom' needs `attacks` (e.g. apgd-ce,square).")
    else:
      need(not self.attacks, f"`attacks` only goes with version 'custom'; version "
           f"{self.version!r} has its own list. Got attacks={list(self.attacks or ())}.")
    need(isinstance(self.square_queries, int) and self.square_queries >= 1,
         f"`square_queries` must be an integer >= 1; got {self.square_queries!r}.")
    need(self.surrogate is None or str(self.model).endswith(".tflite"),
         f"`surrogate` is for a .tflite model (no gradients); {self.model!r} is attacked "
         f"white-box. Fix: drop --surrogate, or evaluate the .tflite.")
    need(self.strategy in STRATEGIES,
         f"`strategy` must be one of {', '.join(STRATEGIES)} for kd-evaluate; got "
         f"{self.strategy!r}." + (" Across machines, run shards instead: "
                                  "--shard_index/--num_shards, then --merge "
                                  "(docs/DISTRIBUTED.md)." if self.strategy == "multi_worker"
                                  else ""))
    need(self.num_cpu_devices is None or (
        self.strategy == "mirrored" and isinstance(self.num_cpu_devices, int)
        and self.num_cpu_devices >= 1),
         f"`num_cpu_devices` must be an integer >= 1 and only goes with strategy "
         f"'mirrored'; got {self.num_cpu_devices!r} with {self.strategy!r}.")
    need(self.strategy == "default" or not str(self.model).endswith(".tflite"),
         f"`strategy` {self.strategy!r} splits a model's batches across TensorFlow "
         f"devices; {self.model!r} runs on the LiteRT interpreter. Fix: "
         f"--strategy=default (shard the images with --shard_index/--num_shards).")
    need(self.strategy == "default" or self.compute_dtype != "bfloat16",
         f"`compute_dtype` 'bfloat16' clones the Keras model itself; under strategy "
         f"{self.strategy!r} the model is called split across replicas in float32. Fix: "
         f"--compute_dtype=float32 (or auto).")
    need(self.qat_twin is None or str(self.model).endswith(".tflite"),
         f"`qat_twin` is for a .tflite model (no gradients); {self.model!r} is attacked "
         f"white-box. Fix: drop --qat_twin, or evaluate the .tflite.")
    need(self.transfer_cache is None or self.surrogate is not None,
         f"`transfer_cache` stores the examples crafted on `surrogate`; no surrogate was "
         f"given for {self.model!r}. Fix: add --surrogate=PATH, or drop --transfer_cache.")
    _bounds.check_methods(self.certify, "certify")
    self.pixels().validate()
    return self

  def identity(self) -> dict[str, Any]:
    """The fields that decide the numbers (a run directory is bound to them)."""
    return {"model": str(self.model), "dataset": self.dataset, "norm": self.norm,
            "epsilons": sorted(float(e) for e in self.epsilons),
            "n_examples": self.n_examples, "version": self.version,
            "attacks": list(self.attacks) if self.attacks else None,
            "signature": self.signature, "output_key": self.output_key,
            "seed": self.seed, "batch_size": self.batch_size,
            "compute_dtype": self.compute_dtype,
            # Only when it splits the images: run directories made before it resume.
            **({"slice_size": self.slice_size} if self.n_examples > self.slice_size else {}),
            # Only when not [0, 1]: run directories made before these fields resume.
            **({} if self.pixels().is_identity else {"pixels": self.pixels().to_dict()}),
            **({"surrogate": self.surrogate, "square_queries": self.square_queries}
               if str(self.model).endswith(".tflite") else {}),
            # Only when given: run directories made before it resume.
            **({"qat_twin": self.qat_twin} if self.qat_twin else {})}
