"""A plain eager C&W-L2 (one search step, fixed c), line by line after l2_attack.py.

The "straightforward implementation of the paper" that issue 4's fixed-budget
check compares keras_defense's C&W-L2 with: tanh space ``arctanh((2x - 1) *
0.999999)``, loss ``||x' - x0'||^2 + c * max(Z_y - max_{i!=y} Z_i + kappa, 0)``
(untargeted), tf_keras Adam (TF1 AdamOptimizer's formula, epsilon 1e-8), the
success of every iteration judged on the logits of that iteration's image
(before the update, as their ``sess.run`` does) and the smallest-L2 success
kept, C&W's early abort (every max_iterations // 10 iterations, per image).
Eager Python, one batch; nothing from keras_defense.attacks is used.

Usage:
  python benchmarks/cw_l2_reference.py [--model_path saved_models/mnist_m0/1]
      [--num_images 200] [--iterations 100] [--const 1] [--lr 0.01]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmark_args import model_parser  # pylint: disable=g-bad-import-order
from keras_defense import attacks
from keras_defense.models import export
from keras_defense.util.compat import keras
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays


def reference_l2(model, x, y, *, iterations, const, lr, abort_early=True):
  """Returns (x_adv, found) as numpy; x_adv = x where nothing was found."""
  x = tf.constant(x)
  w0 = tf.atanh((2.0 * x - 1.0) * 0.999999)
  x0 = (tf.tanh(w0) + 1.0) / 2.0          # their timg, in image space
  mod = tf.Variable(tf.zeros_like(x))
  opt = keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
  onehot = tf.one_hot(y, 10)
  n = x.shape[0]
  best_l2 = np.full(n, np.inf)
  best = x.numpy().copy()
  live = np.ones(n, bool)
  prev = np.full(n, np.inf)
  for i in range(iterations):
    with tf.GradientTape() as tape:
      new = (tf.tanh(w0 + mod) + 1.0) / 2.0
      logits = model(new, training=False)
      l2 = tf.reduce_sum(tf.square(new - x0), axis=[1, 2, 3])
      real = tf.reduce_sum(onehot * logits, 1)
      other = tf.reduce_max((1.0 - onehot) * logits - onehot * 10000.0, 1)
      per_image = l2 + const * tf.maximum(real - other, 0.0)
      loss = tf.reduce_sum(tf.where(live, per_image, 0.0))
    if abort_early and i % max(iterations // 10, 1) == 0:
      live &= ~(per_image.numpy() > prev * 0.9999)
      prev = np.where(live, per_image.numpy(), prev)
    ok = live & (np.argmax(logits.numpy(), 1) != y)
    better = ok & (l2.numpy() < best_l2)
    best_l2[better] = l2.numpy()[better]
    best[better] = new.numpy()[better]
    grad = tape.gradient(loss, mod)
    # Aborted images stop moving (their one-image batches stop running).
    grad = tf.where(tf.reshape(tf.constant(live), [-1, 1, 1, 1]), grad, 0.0)
    opt.apply_gradients([(grad, mod)])
  return best, best_l2 < np.inf


def main(argv=None) -> int:
  p = model_parser(__doc__, num_images=200)
  p.add_argument("--iterations", type=int, default=100)
  p.add_argument("--const", type=float, default=1.0)
  p.add_argument("--lr", type=float, default=0.01)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  model = export.load_model(args.model_path)
  x, y = load_arrays("mnist", "test", limit=args.num_images)
  rows = []
  for name, run in [
      ("reference (eager, after l2_attack.py)", lambda: reference_l2(
          model, x, y, iterations=args.iterations, const=args.const, lr=args.lr)[0]),
      ("keras_defense carlini_wagner_l2", lambda: attacks.carlini_wagner_l2(
          model, x, y, binary_search_steps=1, max_iterations=args.iterations,
          initial_const=args.const, learning_rate=args.lr))]:
    start = time.perf_counter()
    x_adv = run()
    seconds = time.perf_counter() - start
    ok = attacks.attack_success(model, x_adv, y, x_clean=x)
    l2 = attacks.perturbation_norms(x, x_adv).l2[ok.success]
    rows.append(f"| {name} | {ok.success.sum()}/{ok.n} = {100 * ok.rate:.1f}% | "
                f"{l2.mean():.2f} | {seconds:.1f} s |")
  print(f"\nmodel {args.model_path}; first {len(x)} test images; 1 search step, "
        f"{args.iterations} iterations, c = {args.const}, lr {args.lr}\n")
  print("| implementation | success | mean L2 | time |\n|---|---|---|---|")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
