"""The environment a run trains in, recorded in WORKDIR/environment.json.

Same config, seed, code, package versions, XLA flags and machine type give bit-identical
results; a different CPU type, device count or package version gives results that agree only
statistically (floating-point reduction orders and kernels differ). A resumed run that finds a
different environment says so.
"""

import importlib.metadata
import json
import os
import platform
import subprocess

from absl import logging
import jax

from data_prep import files

FILE = 'environment.json'
PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'numpy',
  'scipy',
  'nibabel',
  'tensorflow-cpu',
  'tensorflow',
  'ml-collections',
  'clu',
)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model():
  """The CPU's model name (Linux /proc/cpuinfo), else platform.processor()."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def _git(*args, strip=True):
  try:
    out = subprocess.run(
      ['git', '-C', _REPO, *args], capture_output=True, text=True, timeout=10, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if strip else out.stdout


def machine():
  """'ARCH N CPU cores (HOST)' of this machine."""
  return f'{platform.machine()} {os.cpu_count()} CPU cores ({platform.node()})'


def commit(short=True):
  """The checked-out commit of this repository (abbreviated: `short`); None outside git."""
  return _git('rev-parse', *(['--short'] if short else []), 'HEAD') or None


def changed_files(*paths):
  """Files under `paths` (of this repository) that differ from the commit, untracked ones
  included, sorted; None outside git."""
  out = _git('status', '--porcelain', '--', *paths, strip=False)
  if out is None:
    return None
  return sorted(line[3:] for line in out.splitlines() if line.strip())


def describe():
  """{python, cpu, packages, devices, xla_flags, git} of this process."""
  devices = jax.devices()
  commit = _git('rev-parse', 'HEAD')
  return {
    'python': platform.python_version(),
    'machine': platform.machine(),
    'cpu': _cpu_model(),
    'packages': {p: v for p in PACKAGES if (v := _version(p)) is not None},
    'devices': {
      'platform': devices[0].platform,
      'kind': devices[0].device_kind,
      'count': len(devices),
      'processes': jax.process_count(),
    },
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'git': None
    if commit is None
    else {'commit': commit, 'dirty': bool(_git('status', '--porcelain', '--untracked-files=no'))},
  }


def differences(old, new, prefix=''):
  """['field: old -> new', ...] between two describe() records."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


def record(workdir, write=True):
  """Describes this environment; warns when WORKDIR/environment.json (a run being resumed)
  holds another one; writes the new record (process 0 only: `write`). Returns the warnings."""
  path = os.path.join(workdir, FILE)
  current = describe()
  changes = []
  if os.path.isfile(path):
    with open(path) as f:
      changes = differences(json.load(f).get('current', {}), current)
  if changes:
    logging.warning(
      'Resuming %s in another environment (results will agree with an '
      'uninterrupted run only statistically): %s',
      workdir,
      '; '.join(changes),
    )
  if write:
    history = []
    if os.path.isfile(path):
      with open(path) as f:
        history = json.load(f).get('history', [])
    if not history or changes:
      history.append(current)
    files.write_json(path, {'current': current, 'history': history}, indent=2, sort_keys=True)
  return changes
