"""kd-experiment --deployment_parent's flags: the deployment table (pipelines/deployment.py)."""

from __future__ import annotations

from absl import flags

from keras_defense.flags import common
from keras_defense.util.errors import UserError

FLAGS = flags.FLAGS

# kd-experiment runs the deployment table instead of the M0/M1/M2 reproduction when
# --deployment_parent is given; it reuses --dataset, --run_dir, --report_dir, --seed,
# --batch_size, --train_limit and --autoattack_epsilons/--autoattack_size.
flags.DEFINE_multi_string(
    "deployment_parent", [],
    "kd-experiment: a parent row group of the deployment table, NAME=SAVEDMODEL "
    "(e.g. M1-AT=saved_models/mnist_m1_at_pgd/1); repeat per parent.")
flags.DEFINE_list("deployment_variants",
                  ["float", "float16", "int8_ptq", "int8_qat", "int8_robust_qat",
                   "clustered16_int8"],
                  "kd-experiment --deployment_parent: the variants of each parent.")
common.define_count("deployment_clean_size", 10000,
                    "Deployment table: test images for clean accuracy and agreement.")
common.define_count("deployment_square_queries", 5000,
                    "Deployment table: Square's queries per image on the interpreter.")
flags.DEFINE_list("deployment_twin_attacks", None,
                  "Deployment table: the float rows' white-box attacks (AutoAttack version "
                  "custom); default AutoAttack standard.")
common.define_nonnegative("deployment_epochs", 1,
                          "Deployment table: fine-tuning epochs of QAT, robust QAT, clustering.")


def deployment_config(command: str | None = None, fv=None):
  """The DeploymentConfig the flags describe."""
  fv = FLAGS if fv is None else fv
  from keras_defense.pipelines import deployment  # pylint: disable=g-import-not-at-top
  parents = []
  for text in fv.deployment_parent:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--deployment_parent must be NAME=SAVEDMODEL; got {text!r}.")
    parents.append((name, path))
  return deployment.DeploymentConfig(
      parents=parents, run_dir=fv.run_dir or "runs/mnist_deployment",
      report_dir=fv.report_dir or fv.run_dir or "runs/mnist_deployment",
      variants=tuple(fv.deployment_variants), dataset=common.dataset_name(fv),
      epsilons=tuple(common.parse_epsilon(e) for e in fv.autoattack_epsilons),
      clean_size=fv.deployment_clean_size, robust_size=fv.autoattack_size,
      square_queries=fv.deployment_square_queries,
      twin_attacks=tuple(fv.deployment_twin_attacks) if fv.deployment_twin_attacks else None,
      fine_tune_epochs=fv.deployment_epochs, train_limit=fv.train_limit, seed=fv.seed,
      batch_size=fv.batch_size, command=command)
