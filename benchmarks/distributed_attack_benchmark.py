"""Distributed attack evaluation: BIM over N logical CPU devices vs one device.

Runs in its own process per device count (logical devices are fixed at TF
start-up). Prints wall seconds (best of --repeats, after one warm-up that
compiles) for ``attacks.bim`` + ``evaluation.score`` on one device and for
``distributed_attack.attack_and_score`` under a MirroredStrategy of
``--num_cpu_devices`` logical CPUs, crafting on M0 and scoring on M0.

  .venv/bin/python benchmarks/distributed_attack_benchmark.py --num_cpu_devices=2
"""

import time

from absl import app
from absl import flags

from keras_defense.training import distribution

flags.DEFINE_integer("num_cpu_devices", 2, "Logical CPU devices of the mirrored strategy.")
flags.DEFINE_string("model", "saved_models/mnist_m0/1", "SavedModel attacked.")
flags.DEFINE_integer("images", 2000, "MNIST test images.")
flags.DEFINE_integer("batch_size", 500, "Images per replica per step.")
flags.DEFINE_integer("steps", 10, "BIM steps.")
flags.DEFINE_integer("repeats", 2, "Timed runs (best is reported).")
FLAGS = flags.FLAGS


def _best(fn, repeats):
  fn()  # warm-up: tracing and compilation
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def main(argv):
  del argv
  strategy = distribution.make_strategy("mirrored", num_cpu_devices=FLAGS.num_cpu_devices)
  from keras_defense import attacks
  from keras_defense import data
  from keras_defense.evaluation import distributed_attack
  from keras_defense.evaluation import grid as evaluation
  from keras_defense.models import export  # pylint: disable=g-import-not-at-top
  model = export.load_model(FLAGS.model)
  x, y = data.load_arrays("mnist", "test")
  x, y = x[:FLAGS.images], y[:FLAGS.images]
  kw = dict(step_size=0.075, steps=FLAGS.steps)
  def single():  # the one-device path of evaluation.evaluate: craft, then score
    x_adv = attacks.bim(model, x, y, 0.3, batch_size=FLAGS.batch_size, **kw)
    return evaluation.score(model, x, x_adv, y, targeted=False,
                            batch_size=FLAGS.batch_size)[0]
  single_s, stats = _best(single, FLAGS.repeats)
  dist_s, res = _best(lambda: distributed_attack.attack_and_score(
      strategy, model, {"m0": model}, x, y, attack="bim", epsilon=0.3,
      batch_size=FLAGS.batch_size, **kw), FLAGS.repeats)
  print(f"devices={strategy.num_replicas_in_sync} images={len(x)} bim_steps={FLAGS.steps} "
        f"single_device_s={single_s:.2f} distributed_craft_and_score_s={dist_s:.2f} "
        f"successes single={stats['successes']}/{stats['n']} "
        f"distributed={res.successes['m0']}/{res.n['m0']}")


if __name__ == "__main__":
  app.run(main)
