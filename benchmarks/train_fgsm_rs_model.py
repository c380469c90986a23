"""Trains an adversarially trained MNIST model (FGSM with random start) for the AutoAttack benchmark.

"Fast is better than free" (Wong, Rice & Kolter, ICLR 2020), their MNIST
recipe on the project's C&W MNIST network (``keras_defense.models.architectures.build_model``):
per batch, delta ~ U(-eps, eps), one FGSM step of alpha = 1.25 * eps on delta,
delta clipped to the eps-ball and the [0, 1] box, then one optimiser step on
x + delta. eps 0.3, alpha 0.375, batch 100, Adam with a cyclic (triangular)
learning rate peaking at 5e-3 halfway, 10 epochs (their MNIST settings). The
FGSM step is taken with the model in inference mode (no dropout); the training
step with dropout.

FGSM-RS can overfit "catastrophically" (PGD accuracy collapses within an
epoch), so after every epoch PGD-20 accuracy on 1,000 held-out validation
images is measured (``keras_defense.attacks.pgd``) and the weights of the best
epoch are kept (their early stopping). At the end: clean accuracy on the 10,000
test images and PGD-20 robust accuracy at eps 0.3 on the first 1,000.

Plain tf_keras through ``keras_defense.util.compat``; the project's training code is
not used. The model is saved uncompiled, so ``kd.load_model`` accepts it.

Usage:
  python benchmarks/train_fgsm_rs_model.py --out /work/bench-out/fgsm_rs.keras [--epochs 10]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from benchmark_args import parse_trainer_args  # pylint: disable=g-bad-import-order
from benchmark_args import trainer_parser
from keras_defense import attacks
from keras_defense.util.compat import keras  # tf_keras (Keras 2)
from keras_defense.util.compat import tf
from keras_defense.data.datasets import load_arrays
from keras_defense.models.architectures import build_model

PGD_STEPS = 20


def pgd_accuracy(model, x, y, epsilon, *, steps=PGD_STEPS, seed=0) -> float:
  """Accuracy under L-inf PGD (random start, step 2.5 * eps / steps, Madry's rule)."""
  x_adv = attacks.pgd(model, x, y, epsilon, step_size=2.5 * epsilon / steps,
                      steps=steps, seed=seed)
  return float(np.mean(np.argmax(model.predict(x_adv, batch_size=1000, verbose=0), 1) == y))


def clean_accuracy(model, x, y) -> float:
  return float(np.mean(np.argmax(model.predict(x, batch_size=1000, verbose=0), 1) == y))


def main(argv=None) -> int:
  p = trainer_parser(__doc__)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--epsilon", type=float, default=0.3)
  p.add_argument("--alpha_factor", type=float, default=1.25, help="FGSM step / epsilon")
  p.add_argument("--lr_max", type=float, default=5e-3)
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_images", type=int, default=1000)
  args = parse_trainer_args(p, argv)
  x_train, y_train = load_arrays("mnist", "train")          # 55,000
  x_val, y_val = load_arrays("mnist", "validation", limit=args.eval_images)
  x_test, y_test = load_arrays("mnist", "test")

  model = build_model("cw_mnist", seed=args.seed)
  steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
  total = args.epochs * steps_per_epoch
  lr = lambda step: np.interp(step, [0, total // 2, total], [0.0, args.lr_max, 0.0])
  opt = keras.optimizers.Adam(learning_rate=args.lr_max)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  eps = tf.constant(args.epsilon)
  alpha = tf.constant(args.alpha_factor * args.epsilon)

  @tf.function
  def train_step(x, y):
    delta = tf.random.uniform(tf.shape(x), -eps, eps)
    delta = tf.clip_by_value(x + delta, 0.0, 1.0) - x
    with tf.GradientTape() as tape:
      tape.watch(delta)
      loss = loss_fn(y, model(x + delta, training=False))
    delta = tf.clip_by_value(delta + alpha * tf.sign(tape.gradient(loss, delta)), -eps, eps)
    x_adv = tf.clip_by_value(x + delta, 0.0, 1.0)
    with tf.GradientTape() as tape:
      logits = model(x_adv, training=True)
      loss = loss_fn(y, logits)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y), tf.float32))
    return loss, acc

  rng = np.random.default_rng(args.seed)
  best = (-1.0, None, -1)
  history = []
  start = time.perf_counter()
  step = 0
  for epoch in range(args.epochs):
    t0 = time.perf_counter()
    order = rng.permutation(len(x_train))
    losses, accs = [], []
    for b in range(steps_per_epoch):
      idx = order[b * args.batch_size:(b + 1) * args.batch_size]
      opt.learning_rate.assign(lr(step))
      loss, acc = train_step(tf.constant(x_train[idx]), tf.constant(y_train[idx]))
      losses.append(float(loss))
      accs.append(float(acc))
      step += 1
    val_clean = clean_accuracy(model, x_val, y_val)
    val_pgd = pgd_accuracy(model, x_val, y_val, args.epsilon)
    row = {"epoch": epoch + 1, "train_adv_loss": float(np.mean(losses)),
           "train_adv_acc": float(np.mean(accs)), "val_clean": val_clean,
           "val_pgd20": val_pgd, "seconds": round(time.perf_counter() - t0, 1)}
    history.append(row)
    print(json.dumps(row), flush=True)
    if val_pgd >= best[0]:
      best = (val_pgd, model.get_weights(), epoch + 1)
  train_seconds = time.perf_counter() - start
  model.set_weights(best[1])

  # Saved uncompiled, freshly built (no optimizer state): kd.load_model accepts it.
  inference = build_model("cw_mnist", seed=args.seed)
  inference.set_weights(model.get_weights())
  inference.save(args.out)
  n = args.eval_images
  result = {
      "out": args.out, "best_epoch": best[2], "epochs": args.epochs,
      "train_seconds": round(train_seconds, 1),
      "test_clean_accuracy_10000": clean_accuracy(inference, x_test, y_test),
      f"test_clean_accuracy_first_{n}": clean_accuracy(inference, x_test[:n], y_test[:n]),
      f"test_pgd20_accuracy_first_{n}": pgd_accuracy(inference, x_test[:n], y_test[:n],
                                                     args.epsilon),
      "epsilon": args.epsilon, "pgd": f"{PGD_STEPS} steps of 2.5*eps/{PGD_STEPS}, random start, seed 0",
      "history": history}
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
