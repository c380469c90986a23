"""What several test files share: a child killed with SIGKILL mid-run, the binaries run as
forks of one child that imported them, fresh flags, a small CNN.

Imports no keras_defense module itself (a child process that must not load the package
uses ``small_cnn``).
"""

import copy
import json
import os
import pathlib
import select
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


_SERVER = r'''
"""Imports the binaries once; then runs each requested case in a fork of itself.

A request is one JSON line on stdin; the replies, one JSON line each on fd 1, are
the case's pid once it started and its exit status once it ended.
"""
import json, logging, os, runpy, sys, traceback
replies = os.fdopen(os.dup(1), "w")
names, preload = json.loads(sys.argv[1])
for module in preload:
  __import__(module)  # what the scripts import: TensorFlow and the package
for name in names:
  if name.endswith(".py"):
    continue
  module = name.partition(":")[0]
  __import__(module)  # TensorFlow and the package: the cost every binary pays, paid once
  if ":" not in name:
    del sys.modules[module]  # python -m runs it as __main__, never imported by its name
for line in sys.stdin:
  c = json.loads(line)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:  # the case: ``python -m module *args`` (or ``python script.py *args``)
    code = 1
    try:
      for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                              (1, c["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                              (2, c["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
      module, _, function = c["module"].partition(":")
      sys.argv = [module.rpartition(".")[2] if function else module, *c["args"]]
      try:
        if function:  # a console script: sys.exit(module.function())
          sys.exit(getattr(sys.modules[module], function)())
        if module.endswith(".py"):  # python script.py: its folder first on sys.path
          sys.path[0] = os.path.dirname(os.path.abspath(module))
          runpy.run_path(module, run_name="__main__")
        else:
          runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
      except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None or isinstance(e.code, int):
          code = e.code or 0
        else:
          print(e.code, file=sys.stderr)
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)
  print(json.dumps({"pid": pid}), file=replies, flush=True)
  status = os.waitpid(pid, 0)[1]
  print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)
'''


def _module(name: str) -> str:
  return name if ":" in name or name.endswith(".py") else f"keras_defense.bin.{name}"


class BinaryServer:
  """``python -m keras_defense.bin.<name> *args``, each a fork of one child that imported them.

  The child imports the binaries (TensorFlow and the package) once; each case
  then runs in a fork of it that starts from that import exactly as ``python -m``
  would (nothing parsed, no TensorFlow op run yet), with its own stdin
  (/dev/null), stdout and stderr: what separate interpreters would do, for one
  TensorFlow import instead of one per case (~3-4 s each on the test machine).
  One case runs at a time. Use as a context manager. A name ``module:function``
  is a console script instead (``sys.exit(module.function())``, as the script
  pip writes runs it; e.g. ``tensorflow.python.tools.saved_model_cli:main``); a
  name ending in ``.py`` is a script (``python script.py``), whose imports the
  child takes from ``preload`` (module names it imports first). The child gets
  ``env`` (default ``ENV``) and runs in ``cwd`` (default the repository).
  """

  def __init__(self, names: Sequence[str], tmp_dir, *, timeout: float = 300,
               env: dict | None = None, cwd=REPO, preload: Sequence[str] = ()):
    self._dir = pathlib.Path(tmp_dir)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._timeout = timeout
    self._n = 0
    self._buf = b""
    self._case = None
    with open(self._dir / "server.err", "wb") as err:
      self._proc = subprocess.Popen(
          [sys.executable, "-c", _SERVER,
           json.dumps([[_module(name) for name in names], list(preload)])],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
          env=ENV if env is None else env, cwd=cwd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._case is not None:
      self.kill()
    # Nothing of the child's own is left to keep: no need to wait for its interpreter's exit.
    self._proc.kill()
    self._proc.wait()
    self._proc.stdin.close()
    self._proc.stdout.close()

  def _line(self, timeout: float | None) -> dict | None:
    """The next reply, or None if none arrives within ``timeout`` seconds."""
    deadline = None if timeout is None else time.time() + timeout
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buf:
      wait = None if deadline is None else max(0.0, deadline - time.time())
      if not select.select([fd], [], [], wait)[0]:
        return None
      chunk = os.read(fd, 4096)
      assert chunk, "the binary server died: " + (self._dir / "server.err").read_text()[-3000:]
      self._buf += chunk
    line, self._buf = self._buf.split(b"\n", 1)
    return json.loads(line)

  def start(self, name: str, args: Sequence) -> int:
    """Starts one case; returns its pid."""
    assert self._case is None, "one case at a time: wait() for the running one first"
    self._n += 1
    self._case = {"module": _module(name), "args": [str(a) for a in args],
                  "stdout": str(self._dir / f"{self._n}.out"),
                  "stderr": str(self._dir / f"{self._n}.err")}
    self._proc.stdin.write((json.dumps(self._case) + "\n").encode())
    self._proc.stdin.flush()
    reply = self._line(self._timeout)
    assert reply is not None, "the binary server did not start the case"
    self._case["pid"] = reply["pid"]
    return reply["pid"]

  def ended(self) -> bool:
    """Whether the running case has ended (then wait() returns at once)."""
    if "code" not in self._case:
      reply = self._line(0)
      if reply is not None:
        self._case["code"] = reply["code"]
    return "code" in self._case

  def wait(self) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) of the running case, once it ends (-9: SIGKILLed)."""
    if "code" not in self._case:
      reply = self._line(self._timeout)
      assert reply is not None, f"the case did not end within {self._timeout} s"
      self._case["code"] = reply["code"]
    case, self._case = self._case, None
    return (pathlib.Path(case["stdout"]).read_text(), pathlib.Path(case["stderr"]).read_text(),
            case["code"])

  def run(self, name: str, args: Sequence) -> tuple[str, str, int]:
    """Runs one case to its end: (stdout, stderr, exit code)."""
    self.start(name, args)
    return self.wait()

  def kill_9_when(self, name: str, args: Sequence, ready: Callable[[], object], *,
                  timeout: float, what: str) -> None:
    """Starts one case and SIGKILLs it as soon as ``ready()``; fails if it ends first."""
    self.start(name, args)
    deadline = time.time() + timeout
    try:
      while not ready():
        assert not self.ended(), f"the run finished before {what}: " + \
            pathlib.Path(self._case["stderr"]).read_text()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
    finally:
      self.kill()
      self.wait()

  def kill(self) -> None:
    """SIGKILLs the running case unless it has ended."""
    if not self.ended():
      os.kill(self._case["pid"], signal.SIGKILL)


def run_binaries(cases: Sequence[tuple[str, Sequence]], tmp_dir, *, timeout: float = 300):
  """Runs each ``(name, args)`` case in turn through one ``BinaryServer``.

  Returns:
    A list of ``(stdout, stderr, exit code)``, one per case, in order.
  """
  with BinaryServer(sorted({name for name, _ in cases}), tmp_dir, timeout=timeout) as server:
    return [server.run(name, args) for name, args in cases]
