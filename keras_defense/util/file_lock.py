"""A lock file that lets processes sharing one directory build a thing once.

``hold(path)`` creates ``path`` with ``os.open(O_CREAT | O_EXCL)`` (atomic on
local file systems and on NFSv3+), writing the holder's host, pid and a random
nonce; the holder refreshes the file's mtime every ``heartbeat_seconds`` from
a daemon thread. Another process that finds the lock waits, polling, until it
is gone, or takes it over when it is stale:

* the holder ran on this host and its pid is dead (kill -9, a crash), or
* the lock's mtime is older than ``stale_seconds`` (a holder on another
  machine that died, or a recycled pid; the heartbeat keeps a live holder's
  lock fresh).

Taking over is itself exclusive: the taker first creates
``<path>.stale.<nonce>`` with O_EXCL, so of several waiters that saw the same
stale lock only one removes it (the nonce names that lock instance, so a
waiter that saw it late cannot remove a newer lock); all then race for the
lock again through O_EXCL. The caller re-checks, once it holds the lock,
whether another process finished the work meanwhile.

Example:
  with file_lock.hold(parent_dir / "lock"):
    if not done_file.exists():
      build()
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import socket
import threading
import time
from typing import Callable, Iterator

from absl import logging


def _read(path: pathlib.Path) -> dict | None:
  """The lock's content, or None if it is gone (or still being written)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:  # empty: created but not yet written (or its writer died): held, by someone unknown
    record = json.loads(text) if text else {}
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def is_stale(path: pathlib.Path, holder: dict, *, stale_seconds: float) -> bool:
  """True if the lock's holder is known dead, or its heartbeat stopped long ago."""
  if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
    if not _pid_alive(holder["pid"]):
      return True
  try:
    age = time.time() - path.stat().st_mtime
  except FileNotFoundError:
    return False
  return age > stale_seconds


def _try_create(path: pathlib.Path, me: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(json.dumps(me))
    f.flush()
    os.fsync(f.fileno())
  return True


def _instance(path: pathlib.Path, holder: dict) -> str | None:
  """What names one lock instance: its nonce (or, for an empty lock, its mtime)."""
  if holder.get("nonce"):
    return str(holder["nonce"])
  try:
    return f"mtime{path.stat().st_mtime_ns}"
  except FileNotFoundError:
    return None


def _take_over(path: pathlib.Path, holder: dict) -> None:
  """Removes a stale lock, unless another waiter is already doing so."""
  nonce = _instance(path, holder)
  if nonce is None:
    return
  marker = path.with_name(f"{path.name}.stale.{nonce}")
  if not _try_create(marker, {"by": os.getpid()}):
    return  # another waiter took over this lock instance
  if _instance(path, _read(path) or {}) == nonce:
    logging.warning("taking over the stale lock %s of %s pid %s", path, holder.get("host"),
                    holder.get("pid"))
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def hold(path: str | os.PathLike, *, stale_seconds: float = 600.0, poll_seconds: float = 0.5,
         heartbeat_seconds: float | None = None,
         on_wait: Callable[[dict], None] | None = None) -> Iterator[dict]:
  """Holds the lock file ``path`` for the ``with`` block; waits while another has it.

  Args:
    path: the lock file (its folder is created).
    stale_seconds: a lock whose mtime is older than this is taken over (> 0).
    poll_seconds: seconds between checks while waiting.
    heartbeat_seconds: seconds between mtime refreshes; default stale_seconds / 10.
    on_wait: called once with the holder's record when this process starts waiting.

  Yields:
    This holder's record (host, pid, nonce).

  Raises:
    ValueError: ``stale_seconds`` or ``poll_seconds`` not > 0.
  """
  if not stale_seconds > 0 or not poll_seconds > 0:
    raise ValueError(f"`stale_seconds` and `poll_seconds` must be > 0; got "
                     f"{stale_seconds} and {poll_seconds}.")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  me = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": secrets.token_hex(8),
        "since": time.time()}
  waiting = False
  while not _try_create(path, me):
    holder = _read(path)
    if holder is None:
      continue  # released just now: try again
    if is_stale(path, holder, stale_seconds=stale_seconds):
      _take_over(path, holder)
      continue
    if not waiting and on_wait is not None:
      on_wait(holder)
    waiting = True
    time.sleep(poll_seconds)
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(heartbeat_seconds or stale_seconds / 10):
      if (_read(path) or {}).get("nonce") == me["nonce"]:
        with contextlib.suppress(FileNotFoundError):
          os.utime(path)
  beat = threading.Thread(target=heartbeat, daemon=True, name=f"lock-heartbeat:{path.name}")
  beat.start()
  try:
    yield me
  finally:
    stop.set()
    beat.join()
    if (_read(path) or {}).get("nonce") == me["nonce"]:  # still ours: release
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    for marker in path.parent.glob(f"{path.name}.stale.*"):
      with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
