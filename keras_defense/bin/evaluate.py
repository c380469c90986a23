"""Worst-case robust accuracy of a model you bring (the AutoAttack protocol), resumable.

  kd-evaluate --model=saved_models/mnist_m0/1 --output_key=logits --dataset=mnist \
      --norm=linf --epsilons=0.3 --n_examples=1000 --run_dir=runs/evaluate_m0

--model is a SavedModel directory (--signature, --output_key) or a .keras/.h5
file. A rerun with the same --run_dir resumes after the last finished
(ε, attack). Results: <run_dir>/results.json, report.md,
worst_case_adversarials.png and tensorboard/.

Across machines: the same command with --shard_index=i --num_shards=n on each
(a Slurm array, a Kubernetes Indexed Job), then `kd-evaluate --merge
--run_dir=...` once all are done (docs/DISTRIBUTED.md).
"""

import sys

from absl import flags
import tqdm

from keras_defense import bin as kd_bin
from keras_defense import flags as kd_flags
from keras_defense.util import provenance
from keras_defense.pipelines import evaluate
from keras_defense.util.compat import tf
from keras_defense.util.errors import UserError


class _Progress:
  """A progress bar over the (ε, attack) steps, showing the running robust accuracy."""

  def __init__(self):
    self.bar = None

  def __call__(self, done, total, desc):
    if self.bar is None:
      self.bar = tqdm.tqdm(total=total, unit="attack", desc="kd-evaluate", dynamic_ncols=True,
                           file=sys.stderr, bar_format="{l_bar}{bar}| {n:.2f}/{total} "
                           "[{elapsed}<{remaining}{postfix}]")
    self.bar.n = done
    self.bar.set_postfix_str(desc)
    self.bar.refresh()
    if done >= total:
      self.bar.close()


def main(argv):
  del argv
  if flags.FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  command = provenance.command_line(sys.argv)
  if flags.FLAGS.merge:
    if not flags.FLAGS.run_dir:
      raise UserError("--merge needs the --run_dir the shards wrote into.")
    result = evaluate.merge(flags.FLAGS.run_dir, progress=_Progress(), command=command)
  else:
    config = kd_flags.evaluate_config(command)
    result = evaluate.run(config, progress=_Progress())
  print(result.summary())
  if result.shard:
    print(f"shard done: {result.config.run_dir}/shards/; when every shard is, run "
          f"kd-evaluate --merge --run_dir={result.config.run_dir}")
  else:
    print(f"report: {result.config.run_dir}/report.md")


def run_main():
  kd_flags.evaluate_flags()
  kd_bin.run(main)


if __name__ == "__main__":
  run_main()
