"""Times one adversarial-training step on the C&W MNIST net, for the flagfiles' estimates.

Runs the training wrapper of ``keras_defense.defenses.trainer`` (the step
``kd-train --adversarial=...`` fits) on real MNIST batches: a warm-up fit of 3
batches (tracing), then ``n`` timed steps; prints wall and process CPU time
per step, the load average, and the cost of the per-epoch PGD-10 check on
1,000 validation images. On a shared machine the CPU time is the better
guide: wall time then mostly measures the other processes.

Usage:
  python benchmarks/adversarial_training_step_time.py METHOD BATCH STEPS STEP_SIZE N
  e.g. pgd 128 40 0.01 20 | fgsm_rs 100 1 0.375 60 | trades 128 40 0.01 20 | none 128 1 0 60
"""

import sys
import time

from keras_defense import data
from keras_defense import models
from keras_defense import training
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.defenses import guards
from keras_defense.defenses import trainer


def main(argv):
  method, batch, steps, step_size, n = (argv[1], int(argv[2]), int(argv[3]),
                                        float(argv[4]), int(argv[5]))
  x, y = data.load_arrays("mnist", "train", limit=batch * (n + 3))
  model = models.build_model("cw_mnist", seed=0)
  optimizer = (keras.optimizers.Adam(1e-3) if method == "fgsm_rs"
               else keras.optimizers.SGD(0.01, momentum=0.9))
  if method == "none":
    fitted = training.compile_classifier(model, optimizer)
  else:
    fitted = trainer.DefenseTrainer(model, adversarial=method, epsilon=0.3,
                                    step_size=step_size, steps=steps)
    fitted.compile(optimizer=optimizer)

  def batches(a, b):
    return tf.data.Dataset.from_tensor_slices(
        (x[a * batch:b * batch], y[a * batch:b * batch])).batch(batch)

  fitted.fit(batches(0, 3), epochs=1, verbose=0)  # tracing
  wall, cpu = time.time(), time.process_time()
  fitted.fit(batches(3, 3 + n), epochs=1, verbose=0)
  wall, cpu = time.time() - wall, time.process_time() - cpu
  load = open("/proc/loadavg").read().split()[0]
  print(f"{method} batch={batch} steps={steps}: {n} training steps, wall {wall:.1f} s, "
        f"CPU {cpu:.1f} s -> per step wall {wall / n * 1000:.0f} ms, CPU "
        f"{cpu / n * 1000:.0f} ms; load average {load}", flush=True)
  xv, yv = data.load_arrays("mnist", "validation", limit=1000)
  guards.robust_accuracy(model, xv[:100], yv[:100], 0.3)  # tracing
  wall, cpu = time.time(), time.process_time()
  guards.robust_accuracy(model, xv, yv, 0.3)
  print(f"per-epoch PGD-10 check on 1,000 images: wall {time.time() - wall:.1f} s, "
        f"CPU {time.process_time() - cpu:.1f} s", flush=True)


if __name__ == "__main__":
  main(sys.argv)
