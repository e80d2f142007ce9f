"""General file helpers: atomic writes, their clean-up, a full disk in one line.

Atomic writes: every file is written to `.tmp<pid>_<name>` beside it, then renamed into place,
so a reader never sees half a file; `remove_stale_temporaries` deletes those a kill left.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import time
from typing import Optional

import numpy as np


def temporary_path(path) -> str:
  """Where an atomic write of `path` writes first: `.tmp<pid>_<name>` in the same folder."""
  directory, name = os.path.split(os.path.abspath(os.fspath(path)))
  return os.path.join(directory, f'.tmp{os.getpid()}_{name}')


TEMPORARY_PATTERN = r'\.tmp(?P<pid>\d+)_.+'  # Names `temporary_path` gives (for clean-ups).


def atomic_write(path, data) -> None:
  """Writes str (UTF-8) or bytes to `path` via `temporary_path(path)`; creates the folder."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_path(path)
  try:
    if isinstance(data, str):
      with open(tmp, 'w', encoding='utf-8', newline='') as f:
        f.write(data)
    else:
      with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ('No space left on device', 'Disk quota exceeded')


def disk_full(error: BaseException) -> Optional[str]:
  """A one-line message if `error`, or an error it came from, is a full disk (or quota): the
  CLIs print it instead of a traceback. None for any other error."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      where = f' writing {error.filename}' if error.filename else ''
      return f'no space left on device{where}; {_AFTER_DISK_FULL}'
    text = str(error)
    if any(t in text for t in _DISK_FULL_TEXTS):
      return f'no space left on device ({text.splitlines()[0][:160]}); {_AFTER_DISK_FULL}'
    error = error.__cause__ or error.__context__
  return None


_AFTER_DISK_FULL = (
  'free some space and run the same command again (files are written atomically: what was '
  'finished, and the last checkpoint, are whole)'
)


def write_json(path, obj, indent=1, sort_keys=False) -> None:
  """Writes `obj` as JSON, atomically (`json.dumps` options as given)."""
  atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def save_npy(path, array) -> None:
  """Writes a .npy file atomically."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  atomic_write(path, buffer.getvalue())


def pid_alive(pid: int) -> bool:
  """Whether process `pid` runs on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def remove_stale_temporaries(
  directory,
  pattern: str = TEMPORARY_PATTERN,
  min_age_s: float = 60.0,
  no_pid_min_age_s: float = 86400.0,
) -> list:
  """Deletes the temporaries an interrupted writer left in `directory`; returns their paths.

  Only entries whose whole name matches the regex `pattern` go, and only stale ones: older
  than `min_age_s` (mtime) and, when the pattern has a group "pid", of a pid not alive on this
  host; names without a pid only when older than `no_pid_min_age_s`. Files or folders.
  """
  try:
    names = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []
  removed, now = [], time.time()
  for name in names:
    m = re.fullmatch(pattern, name)
    if not m:
      continue
    path = os.path.join(directory, name)
    pid = m.groupdict().get('pid')
    try:
      age = now - os.lstat(path).st_mtime
    except FileNotFoundError:
      continue
    if age < (no_pid_min_age_s if pid is None else min_age_s):
      continue
    if pid is not None and (int(pid) == os.getpid() or pid_alive(int(pid))):
      continue
    logging.warning('deleting %s (left by an interrupted run)', path)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
    removed.append(path)
  return removed
