"""What several test files share: a child killed with SIGKILL mid-run, fresh flags, a small CNN.

Imports no keras_defense module itself (a child process that must not load the package
uses ``small_cnn``).
"""

import copy
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def kill_9_script_when(script: str, args: Sequence, ready: Callable[[], object], *,
                       timeout: float) -> None:
  """Runs ``script`` in a child Python and SIGKILLs it as soon as ``ready()``.

  The child reads ``script`` from stdin, gets ``args`` (as strings) in
  ``sys.argv[1:]`` and runs from the repository root. Fails if it ends first
  (with the end of its stderr) or ``ready()`` takes over ``timeout`` seconds;
  the child is killed either way.
  """
  proc = subprocess.Popen([sys.executable, "-", *map(str, args)],
                          stdin=subprocess.PIPE, env=ENV, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  proc.stdin.write(script)
  proc.stdin.close()
  deadline = time.time() + timeout
  try:
    while not ready():
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() < deadline, f"not ready within {timeout} s"
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def fresh_flags(define: Callable | None = None):
  """A copy of ``kd_flags.FLAGS`` with nothing parsed, to parse a command line into.

  ``define(fv)`` is called on it first: a binary's own redefinitions, e.g.
  ``kd_flags.evaluate_flags``.
  """
  from keras_defense import flags as kd_flags  # pylint: disable=g-import-not-at-top
  fv = copy.deepcopy(kd_flags.FLAGS)
  fv.unparse_flags()
  if define is not None:
    define(fv)
  return fv


def without_timing(obj):
  """results.json minus its timing fields: exactly the keys ending in "seconds"."""
  if isinstance(obj, dict):
    return {k: without_timing(v) for k, v in obj.items() if not k.endswith("seconds")}
  if isinstance(obj, list):
    return [without_timing(v) for v in obj]
  return obj


def small_cnn(keras, x, y, *, batch_size: int):
  """The small MNIST CNN the evaluation tests attack, seeded and trained for 2 epochs.

  Conv2D(8, 3x3, stride 2, ReLU), Flatten, Dense(10) logits; ``keras`` is the
  tf_keras module of the caller (a child process may not load keras_defense).
  """
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.layers.Input((28, 28, 1)),
                            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(10)])
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0)
  return model
