"""How often FAB's new point is adversarial: does fusing its forward pass pay?

A FAB iteration computes the boundary's gradient at ``x1`` (one forward and
backward pass), the new point ``x1_new``, and one more forward pass to ask
whether ``x1_new`` is misclassified; if it is, ``x1`` is pulled back towards
the clean image (``beta``). Fusing that forward pass into the next iteration's
gradient (which computes the logits at ``x1_new`` anyway) saves it only where
no pull-back follows: a pulled-back row needs a second gradient, at the
pulled-back point. With p the fraction of live rows whose ``x1_new`` is
adversarial and r = forward / gradient cost, fusing pays iff p < r (r = 0.35
to 0.45 on the C&W MNIST net on this CPU: 5,300-6,700 gradients/s against
14,000-16,000 forward passes/s, ``framework_ceilings.py``).

This counts p per model over a full FAB-T run (9 targets x 100 iterations, the
AutoAttack defaults) by overriding ``FabAttack._adversarial``, the one forward
pass in question; nothing else changes.

Usage:
  .venv/bin/python benchmarks/fab_adv_fraction.py --models saved_models/mnist_m0_at_pgd/1 \\
      saved_models/mnist_m0/1 --num_images 250 --epsilon 0.3
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from keras_defense.models import export
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays

# The module, not the function ``keras_defense.attacks.fab`` that shadows it.
fab_lib = importlib.import_module("keras_defense.attacks.fab")

ADVERSARIAL = tf.Variable(0, dtype=tf.int64)
LIVE = tf.Variable(0, dtype=tf.int64)


class CountingFab(fab_lib.FabAttack):
  """FabAttack that counts, over all iterations, live rows and adversarial new points."""

  def _adversarial(self, u, y, live):
    out = super()._adversarial(u, y, live)
    ADVERSARIAL.assign_add(tf.reduce_sum(tf.cast(out, tf.int64)))
    LIVE.assign_add(tf.reduce_sum(tf.cast(live, tf.int64)))
    return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", required=True, help="SavedModel dirs or .keras files")
  p.add_argument("--num_images", type=int, default=250)
  p.add_argument("--epsilon", type=float, default=0.3)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  fab_lib.FabAttack = CountingFab   # fab() builds its compiled attack from this name
  x, y = load_arrays("mnist", "test", limit=args.num_images)
  print("| model | live row-iterations | adversarial x1_new | p | FAB-T seconds |")
  print("|---|---|---|---|---|")
  for path in args.models:
    model = export.load_model(path)
    ADVERSARIAL.assign(0)
    LIVE.assign(0)
    start = time.perf_counter()
    fab_lib.fab(model, x, y, args.epsilon)
    seconds = time.perf_counter() - start
    live, adv = int(LIVE.numpy()), int(ADVERSARIAL.numpy())
    print(f"| {path} | {live:,} | {adv:,} | {adv / max(live, 1):.3f} | {seconds:.1f} |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
