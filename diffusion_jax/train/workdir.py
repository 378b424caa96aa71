"""The run's `--workdir`: checked before anything is written to it, and held by one run at a time.

A second run on the same workdir would overwrite the first one's checkpoints and metrics (or wait for minutes on
Orbax and crash), so a run holds an exclusive lock on `WORKDIR/.lock` while it works. The lock is `flock(2)`: the
kernel drops it when its process dies, even by SIGKILL, so a crashed run never leaves the workdir locked; the file
stays, naming the last holder. On NFS (v4, or v3 with lockd) Linux emulates flock with whole-file POSIX locks seen by
every client, so it also works for multi-host runs on a shared file system, where only process 0 takes it. File
systems without locks (some FUSE mounts, e.g. gcsfuse; Lustre mounted without `-o flock`) make taking it fail,
and the run stops saying so rather than run unprotected.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirError(ConfigError):
  """A `--workdir` the run cannot use; one line for the user."""


def has_checkpoint(workdir: str) -> bool:
  """Whether `WORKDIR/checkpoints` holds a committed step (Orbax names those by number; unfinished ones are not)."""
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except OSError:
    return False
  return any(name.isdigit() and os.path.isdir(os.path.join(directory, name)) for name in names)


def _blocking_file(path: str) -> str | None:
  """The first existing component of `path` (itself included) that is not a folder."""
  path = os.path.abspath(path)
  parts = path.split(os.sep)
  for i in range(2, len(parts) + 1):
    prefix = os.sep.join(parts[:i])
    if not os.path.exists(prefix):
      return None
    if not os.path.isdir(prefix):
      return prefix
  return None


def prepare(workdir: str, *, need_checkpoint: bool) -> None:
  """Checks `workdir` and creates it; raises WorkdirError.

  `need_checkpoint` (`--mode eval` and `sample`, which read a trained run): a workdir without a committed
  checkpoint is an error, raised before anything is created in it, so a mistyped path leaves no folder behind.
  """
  blocking = _blocking_file(workdir)
  if blocking is not None:
    where = "is a file" if blocking == os.path.abspath(workdir) else f"is inside {blocking}, which is a file"
    raise WorkdirError(f"--workdir {workdir} {where}; give a folder")
  if need_checkpoint:
    if not has_checkpoint(workdir):
      raise WorkdirError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first (--mode train) or "
                         "point --workdir at a run")
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror}") from None


class WorkdirLock:
  """An exclusive, process-lifetime lock on `WORKDIR/.lock`, which names its holder (pid, host, start time)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    try:
      # O_CLOEXEC: a child that execs (grain's spawned workers) must not inherit, and so hold, the lock.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir {self.workdir} is not writable: {e.strerror}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"--workdir {self.workdir} is in use by another run ({holder}); wait for it to finish "
                           "or give another --workdir") from None
      raise WorkdirError(f"cannot lock --workdir {self.workdir} ({e.strerror}): its file system does not support "
                         "locks; give a workdir on one that does") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor drops the flock; the file stays, naming the last holder
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds the workdir's lock on process 0 for the duration; every process raises if process 0 could not take it."""
  lock, error = WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    # The other processes must stop too, or they would wait in the run's first collective for process 0 forever.
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = WorkdirError(f"--workdir {workdir}: process 0 could not lock it (see its error)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    lock.release()


def sampled_once(path: str, meta: dict, make, *, step: int, is_main: bool, what: str) -> dict[str, np.ndarray]:
  """Arrays a run draws from its own model before its first step (reflow pairs, DreamBooth's class images), kept in
  the .npz `path` with `meta` (JSON-able settings) so a resumed run reads them back rather than redraw them from a
  model that has since trained. A file made with other settings, or missing once the run is past step 0, is one
  ConfigError; `make()` -> {name: array} runs only when the file is absent at step 0."""
  if os.path.exists(path):
    logging.info("reading %s from %s", what, path)
    with np.load(path, allow_pickle=False) as f:
      found = json.loads(str(f["meta"]))
      if found != meta:
        changed = sorted(k for k in set(meta) | set(found) if found.get(k) != meta.get(k))
        raise ConfigError(f"{path} holds {what} made with other settings ({', '.join(changed)}); delete it or use a "
                          "new workdir")
      return {k: f[k] for k in f.files if k != "meta"}
  if step:
    raise ConfigError(f"{path} is missing although this run is at step {step}: the {what} come from the model as it "
                      "was at step 0; restore the file or use a new workdir")
  arrays = make()
  if is_main:
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)  # a run killed while writing leaves no half file behind
  return arrays
