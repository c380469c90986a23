"""kd-certify's flags: the method, smoothing's σ/n0/n/α; CertifyConfig.

kd-certify reuses --dataset, --data_dir, --manual_dir, --seed, --run_dir,
--batch_size and kd-evaluate's --norm, --n_examples, --signature,
--output_key, --allow_ops, its test data (--data, --image_size) and pixel
convention (--input_range, --mean, --std). Its --model is a model *path*,
its --epsilons take L2 radii > 1 and its --method is a certification method
(kd-quantize's is a quantization method): certify_flags() defines those
three, and kd-evaluate's --image_size, in the kd-certify process only.
"""

from __future__ import annotations

from absl import flags

from keras_defense.certify import runner as _runner
from keras_defense.flags import common
from keras_defense.flags import evaluate as _evaluate

FLAGS = flags.FLAGS

common.define_nonnegative("sigma", 0.25,
                          "kd-certify smoothing: the Gaussian noise's standard deviation in pixel "
                          "units.")
common.define_count("n0", 100, "kd-certify smoothing: samples to pick the top class "
                    "(Cohen et al.: 100).")
common.define_count("n", 100_000, "kd-certify smoothing: samples to bound its probability "
                    "(Cohen et al.: 100,000).")
flags.DEFINE_float("alpha", 0.001, "kd-certify smoothing: each certificate's failure "
                   "probability (Cohen et al.: 0.001).", lower_bound=0.0, upper_bound=1.0)


def certify_flags(fv=None) -> None:
  """Gives --model, --epsilons and --method kd-certify's meaning (called before parsing)."""
  fv = FLAGS if fv is None else fv
  flags.DEFINE_enum("method", "ibp", list(_runner.METHODS),
                    "kd-certify: ibp (interval bounds), crown_ibp (IBP intermediate bounds, a "
                    "CROWN pass for the margins), crown (CROWN everywhere; small networks) or "
                    "smoothing (randomized smoothing, L2, any model).",
                    flag_values=fv, allow_override=True)
  flags.DEFINE_string("model", None, "kd-certify: the model, a SavedModel directory or a "
                      ".keras/.h5 file (the bound methods need a tf_keras model).",
                      flag_values=fv, allow_override=True)
  flags.DEFINE_list("epsilons", ["0.1"], "kd-certify: radii of the --norm ball in pixel "
                    "units of [0, 1] images, fractions allowed (8/255); L-inf in (0, 1], "
                    "L2 > 0.", flag_values=fv, allow_override=True)
  flags.register_multi_flags_validator(
      ["epsilons", "norm"], _evaluate._check_evaluate_epsilons,  # pylint: disable=protected-access
      flag_values=fv)
  _evaluate.test_data_flags(fv)


def certify_config(command: str | None = None, fv=None) -> _runner.CertifyConfig:
  """The CertifyConfig the kd-certify flags describe (after certify_flags())."""
  fv = FLAGS if fv is None else fv
  label = "_".join(p for p in str(fv.model or "model").replace("\\", "/").split("/")[-2:] if p)
  return _runner.CertifyConfig(
      model=fv.model, run_dir=fv.run_dir or f"runs/certify_{label}_{fv.method}_{fv.norm}",
      dataset=_evaluate.test_dataset(fv), norm=fv.norm,
      epsilons=tuple(common.parse_epsilon(e) for e in fv.epsilons), method=fv.method,
      n_examples=fv.n_examples, batch_size=fv.batch_size, sigma=fv.sigma, n0=fv.n0, n=fv.n,
      alpha=fv.alpha, seed=fv.seed, signature=fv.signature, output_key=fv.output_key,
      data_dir=fv.data_dir, manual_dir=fv.manual_dir, command=command,
      allow_ops=tuple(fv.allow_ops), **_evaluate.pixel_fields(fv))
