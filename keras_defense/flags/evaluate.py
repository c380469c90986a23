"""kd-evaluate's flags: the model path, its data and pixels, the norm, the ensemble."""

from __future__ import annotations

from absl import flags

from keras_defense import data as _data
from keras_defense.certify import bounds as _bounds
from keras_defense.data import test_images as _inputs
from keras_defense.evaluation import robustness_config as _rob
from keras_defense.flags import common
from keras_defense.util.errors import UserError

FLAGS = flags.FLAGS


def _define_normalisation(name: str, use: str, example: str = "") -> None:
  """--mean or --std: the model's per-channel input normalisation (``_check_mean_std``)."""
  flags.DEFINE_list(name, None, f"kd-evaluate: per-channel {name} (or one for all) the model "
                    f"{use}, in --input_range units{'; ' + example if example else ''}.")

# --- evaluation (kd-evaluate) -----------------------------------------------
# kd-evaluate reuses --dataset, --data_dir, --manual_dir, --seed, --run_dir,
# --batch_size, --deterministic and --epsilons. Its --model is a model *path*
# and its --attacks the ensemble's: evaluate_flags() redefines those two in the
# kd-evaluate process only, before parsing (kd-train's --model stays an
# architecture, kd-experiment's --attacks fgsm/bim); --compute_dtype gains
# "auto", and --epsilons keeps its validator for L-inf but takes L2 radii > 1
# (MNIST's usual L2 radius is 2).

flags.DEFINE_enum("norm", "linf", list(_rob.NORMS), "kd-evaluate threat model: L-inf or L2 ball.")
common.define_count("n_examples", 10000,
                    "kd-evaluate: the first n test images (RobustBench: 10,000).")
flags.DEFINE_enum("version", "standard", list(_rob.VERSIONS),
                  "kd-evaluate AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square), "
                  "plus, rand, or custom (--attacks).")
flags.DEFINE_string("signature", "serving_default",
                    "kd-evaluate: the SavedModel signature to call.")
flags.DEFINE_string("output_key", None,
                    "kd-evaluate: the signature output holding logits or probabilities "
                    "(needed when it has several, e.g. logits for saved_models/*).")
flags.DEFINE_list("allow_ops", [],
                  "kd-evaluate: ops a SavedModel may hold although they touch the outside "
                  "world (e.g. WriteFile,PrintV2), named one by one; by default a model "
                  "holding any is refused before it runs (models/scan.py, docs/RELIABILITY.md "
                  "'Running models you did not write').")
flags.DEFINE_string("data", None,
                    "kd-evaluate, kd-certify: your own test set instead of --dataset, a .npz "
                    "with arrays x (NHWC, uint8 0-255 or float32 0-1), y (int labels) and "
                    "optionally class_names.")
flags.DEFINE_enum("input_range", "0,1", ["0,1", "0,255"],
                  "kd-evaluate: the pixel range the model takes; attacks and --epsilons stay "
                  "in [0, 1] units and the scaling runs inside the attacked function.")
_define_normalisation("mean", "subtracts from its input", example=(
    "e.g. 0.5 with --std=0.5 for inputs in [-1, 1] (Keras applications' 'tf' "
    "preprocess_input)"))
flags.DEFINE_bool("merge", False,
                  "kd-evaluate: combine the finished shards of --run_dir (run with "
                  "--shard_index/--num_shards, the kd-sweep flags) into its results.json and "
                  "report.md, the ones one process would write; the shards' settings are used.")
common.define_count("slice_size", _rob.DEFAULT_SLICE_SIZE,
                    "kd-evaluate: images attacked together, each slice with its own seed; a "
                    "shard takes whole slices, so a shard count above n_examples/slice_size "
                    "is refused.")
_define_normalisation("std", "divides its input by after --mean")
flags.DEFINE_string("surrogate", None,
                    "kd-evaluate on a .tflite (no gradients): the differentiable twin (float "
                    "parent or QAT twin, any model kd-evaluate loads) whose PGD/APGD examples "
                    "are transferred; without it Square alone runs (evaluation/black_box.py).")
flags.DEFINE_string("qat_twin", None,
                    "kd-evaluate on a .tflite: the tfmot quantization-aware (QAT) SavedModel it "
                    "was converted from (kd-quantize --qat_twin_path writes it); adds the BPDA "
                    "members bpda-apgd-ce/bpda-apgd-t: APGD through the twin's fake "
                    "quantization with straight-through gradients, judged on the interpreter. "
                    "Default: --surrogate when it is itself a QAT model.")
flags.DEFINE_string("transfer_cache", None,
                    "kd-evaluate on a .tflite with --surrogate: a directory where the transfer "
                    "examples are stored per image and reused by later runs on the same "
                    "surrogate file and --mean/--std, attack, norm, ε and seed (several "
                    "artifacts of one parent craft them once; evaluation/transfer_cache.py). "
                    "Default: crafted every run.")
common.define_count("square_queries", _rob.DEFAULT_SQUARE_QUERIES,
                    "kd-evaluate on a .tflite: Square's queries per image (AutoAttack: 5000).")

flags.DEFINE_list("certify", ["ibp", "crown_ibp"],
                  "kd-evaluate: bound methods (ibp, crown_ibp, crown) whose certified accuracy "
                  "is reported beside the robust accuracy, so each ε reads certified <= robust "
                  "<= clean; an image counts as certified when any method proves it. On by "
                  "default: it is the only lower bound and costs a small fraction of the "
                  "attacks (M0-IBP, 100 images, ε 0.3, 2 cores: 0.7 s for IBP and CROWN-IBP, "
                  "71 s for APGD-CE + APGD-T); a model the bounds cannot read (a layer they do not support, a non-Keras SavedModel, "
                  "Keras 3, .tflite, --input_range/--mean/--std) shows n/a with the reason. "
                  "A certified image an attack broke stops the run with an error (a bug). "
                  "--certify= (empty) turns it off. kd-experiment --defense: the certified "
                  "column of the defenses comparison (from the saved models, at the report "
                  "stage).")


def evaluate_flags(fv=None) -> None:
  """Gives --model, --attacks and --compute_dtype kd-evaluate's meaning.

  Called by kd-evaluate before its flags are parsed (tests pass a copy of
  FLAGS); the other binaries keep the definitions above.
  """
  fv = FLAGS if fv is None else fv
  flags.DEFINE_string("model", None, "kd-evaluate: the model to evaluate, a SavedModel "
                      "directory, a .keras/.h5 file or a .tflite (black-box: see --surrogate).", flag_values=fv, allow_override=True)
  flags.DEFINE_list("attacks", None, "kd-evaluate --version=custom: the ensemble's attacks, "
                    "in order (e.g. apgd-ce,square).", flag_values=fv, allow_override=True)
  flags.DEFINE_enum("compute_dtype", "float32", ["auto", "float32", "bfloat16"],
                    "kd-evaluate attack arithmetic; auto times both once and picks the "
                    "faster (bfloat16 needs a Keras model file). Default float32: bfloat16 "
                    "APGD left 5.8 points more of an adversarially trained model robust "
                    "(benchmarks/README.md).", flag_values=fv, allow_override=True)
  flags.DEFINE_list("epsilons", fv["epsilons"].default, "kd-evaluate: radii of the --norm "
                    "ball in pixel units of [0, 1] images, fractions allowed (8/255); L-inf "
                    "in (0, 1], L2 > 0.", flag_values=fv, allow_override=True)
  flags.register_multi_flags_validator(["epsilons", "norm"], _check_evaluate_epsilons,
                                       flag_values=fv)
  test_data_flags(fv)


def test_data_flags(fv=None) -> None:
  """--image_size with kd-evaluate's meaning (any shape) and the --mean/--std check.

  Called by kd-evaluate and kd-certify before parsing (kd-train's --image_size
  takes the two C&W shapes only).
  """
  fv = FLAGS if fv is None else fv
  # Evaluation resizes to any shape; kd-train's two C&W shapes do not apply.
  flags.DEFINE_string("image_size", None, "kd-evaluate, kd-certify: convert and resize every "
                      "test image to HxWxC (any size, C 1 or 3), e.g. the model's 64x64x3 "
                      "(default: the images must already have the model's shape).",
                      flag_values=fv, allow_override=True)
  flags.register_validator("image_size", _check_image_size, flag_values=fv)
  flags.register_multi_flags_validator(["mean", "std"], _check_mean_std, flag_values=fv)


def _check_image_size(value) -> bool:
  try:
    _data.parse_image_size(value)
  except ValueError as e:
    raise flags.ValidationError(f"--image_size: {e}") from None
  return True


def _check_certify(value) -> bool:
  try:
    _bounds.check_methods(value or (), "--certify")
  except UserError as e:
    raise flags.ValidationError(str(e).replace("`--certify`", "--certify")) from None
  return True


flags.register_validator("certify", _check_certify)


def _floats(values) -> tuple[float, ...] | None:
  return None if values is None else tuple(float(v) for v in values)


def _check_mean_std(values: dict) -> bool:
  for name in ("mean", "std"):
    try:
      _floats(values[name])
    except ValueError:
      raise flags.ValidationError(f"--{name} must list numbers; got {values[name]}.") from None
  if values["std"] is not None and any(v <= 0 for v in _floats(values["std"])):
    raise flags.ValidationError(f"--std must be > 0 for every channel; got {values['std']}.")
  return True


def _check_evaluate_epsilons(values: dict) -> bool:
  if values["norm"] == "linf":
    return common.check_epsilons(values["epsilons"])
  eps = [common.parse_epsilon(v) for v in values["epsilons"]]
  if not eps or any(not e > 0 for e in eps):
    raise flags.ValidationError(f"--epsilons must list L2 radii > 0; got {values['epsilons']}.")
  return True


def test_dataset(fv) -> str:
  """The test set that --dataset/--data/--image_size name, as ``data.test_images`` names it.

  Shared by kd-evaluate and kd-certify (both after ``test_data_flags``).
  """
  if fv.data and fv["dataset"].present:
    raise UserError(f"pass --data (your arrays) or --dataset, not both; got "
                    f"--data={fv.data} and --dataset={fv.dataset}.")
  dataset = common.dataset_name(fv)
  if fv.data:  # the library names a .npz test set like a dataset: npz:PATH[@HxWxC]
    dataset = f"{_inputs.NPZ_PREFIX}{fv.data}" + (f"@{fv.image_size}" if fv.image_size else "")
  return dataset


def pixel_fields(fv) -> dict:
  """input_range, mean and std of the model's pixel convention, from their flags."""
  return {"input_range": tuple(float(v) for v in fv.input_range.split(",")),
          "mean": _floats(fv.mean), "std": _floats(fv.std)}


def evaluate_config(command: str | None = None, fv=None) -> _rob.RobustnessConfig:
  """The RobustnessConfig the kd-evaluate flags describe (after evaluate_flags())."""
  fv = FLAGS if fv is None else fv
  label = "_".join(p for p in str(fv.model or "model").replace("\\", "/").split("/")[-2:] if p)
  dataset = test_dataset(fv)
  return _rob.RobustnessConfig(
      model=fv.model, run_dir=fv.run_dir or f"runs/evaluate_{label}_{fv.norm}",
      dataset=dataset, norm=fv.norm,
      epsilons=tuple(common.parse_epsilon(e) for e in fv.epsilons), n_examples=fv.n_examples,
      version=fv.version, attacks=tuple(fv.attacks) if fv.attacks else None,
      signature=fv.signature, output_key=fv.output_key, allow_ops=tuple(fv.allow_ops),
      seed=fv.seed,
      # Not given: chosen from the memory available (attacks.memory).
      batch_size=fv.batch_size if fv["batch_size"].present else None,
      slice_size=fv.slice_size, shard_index=fv.shard_index, num_shards=fv.num_shards, compute_dtype=fv.compute_dtype, data_dir=fv.data_dir,
      manual_dir=fv.manual_dir, command=command,
      **pixel_fields(fv), surrogate=fv.surrogate, square_queries=fv.square_queries,
      qat_twin=fv.qat_twin, transfer_cache=fv.transfer_cache, strategy=fv.strategy,
      num_cpu_devices=fv.num_cpu_devices, certify=tuple(fv.certify or ()))
