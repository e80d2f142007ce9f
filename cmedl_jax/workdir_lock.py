"""WORKDIR/train.lock: one training at a time in a workdir."""

import json
import os
import socket
import time

from absl import logging

from data_prep import files


class WorkdirLockedError(RuntimeError):
  """Another training holds the workdir."""


class WorkdirLock:
  """WORKDIR/train.lock, {"pid", "host"} of the training that holds the workdir.

  Created atomically (O_CREAT | O_EXCL); held for the whole training and removed at its end,
  also on an error. A lock of a pid that is not alive on this host (a killed training) is taken
  over with a warning; any other is an error naming its holder.
  """

  NAME = 'train.lock'

  def __init__(self, workdir):
    self.path = os.path.join(workdir, self.NAME)
    self.workdir = workdir
    self.held = False

  def _create(self):
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, 'w') as f:
      json.dump({'pid': os.getpid(), 'host': socket.gethostname()}, f)

  def _holder(self):
    """(pid, host) of the lock's holder; (None, None) for a lock cut short by a kill."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
      return int(holder['pid']), str(holder['host'])
    except (ValueError, KeyError, TypeError):
      return None, None

  def __enter__(self):
    for _ in range(3):  # The holder may release it between our tries.
      try:
        self._create()
        break
      except FileExistsError:
        try:
          pid, host = self._holder()
          age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
          continue
        cut_short = pid is None and age > 10
        if not (cut_short or (host == socket.gethostname() and not files.pid_alive(pid))):
          raise WorkdirLockedError(
            f'{self.workdir} is in use by the training of process {pid} on host {host} '
            f'({self.path}); wait for it to end, or delete the lock if it is not running'
          ) from None
        logging.warning(
          'Taking over %s of process %s on %s, which is not running.', self.path, pid, host
        )
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
    else:
      raise WorkdirLockedError(f'{self.workdir}: could not take {self.path}')
    self.held = True
    return self

  def __exit__(self, *exc):
    try:
      if self.held and self._holder() == (os.getpid(), socket.gethostname()):
        os.remove(self.path)
    except FileNotFoundError:  # Deleted by hand meanwhile.
      pass
    self.held = False
