"""Every module of benchmarks/ imports, and each entry point runs at its smallest setting.

Each run is `python -m benchmarks.NAME ...` in a subprocess from the repository root, as a user
runs it; its exit status and one line of its output are checked, so a rename in the library (or
in a sibling benchmark) breaks a test, not the next person's benchmark run. Modules are found
with pkgutil: a new benchmark must be given its smallest run (SMALLEST_RUNS) or say why only its
--help is run (HELP_ONLY).
"""

import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys

import pytest

import benchmarks
from tiny_runs import ROOT

MODULES = sorted(name for _, name, _ in pkgutil.iter_modules(benchmarks.__path__))
NEEDS_TORCH = {'torch_reference'}  # An optional, benchmark-only dependency.
LIBRARY_ONLY = {'torch_reference'}  # No entry point: imported by train_step.py's torch worker.


# name -> (arguments, a line the output must hold (regex), slow: over ~20 s on 2 busy cores).
SMALLEST_RUNS = {
  'metrics': (['--repeats', '1'], r'^DSC [\d.]+  HD95 [\d.]+ mm  sDSC@2mm [\d.]+$', False),
  'models': (
    ['--networks', 'patchgan', '--batches', '1', '--repeats', '1'],
    r'^\| patchgan \| 1 \| \d+ \| [\d.]+ \| [\d.]+ \|$',
    False,
  ),
  'prediction': (
    ['--size', '32', '--slices', '2', '--batch', '2'],
    r'^RESULT \{"seconds": [\d.e-]+, "slices": 2\}$',
    True,
  ),
  'step_memory': (['--size', '32', '--batch', '1'], r'^RESULT \{"size": 32, "batch": 1, ', True),
}
# Run at tiny sizes by tests/test_gpu_script.py (`bash benchmarks/gpu.sh --tiny`, whose stages
# call them as `python -m benchmarks.NAME`): only `--help` runs here.
RUN_BY_GPU_SCRIPT = {'train_step', 'study_speed'}
# name -> why a run is too long for a test: only `--help` runs.
HELP_ONLY = {
  'input_pipeline': 'writes and prepares phantom cases at 256x256 (minutes)',
  'performance': 'the whole report; --quick still takes minutes',
  # Over a minute at its smallest size (its --no-peak run took 66 s on a quiet 2-core machine);
  # the multi-process training it times is tested by tests/test_multihost.py.
  'multihost': 'two 2-process runs (1x4, 2x2), over a minute at 32 px',
}


def _run(name, args, timeout):
  return subprocess.run(
    [sys.executable, '-m', f'benchmarks.{name}', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize('name', MODULES)
def test_every_module_imports(name):
  if name in NEEDS_TORCH and importlib.util.find_spec('torch') is None:
    pytest.skip('torch is not installed (an optional, benchmark-only dependency)')
  module = importlib.import_module(f'benchmarks.{name}')
  assert name in LIBRARY_ONLY or callable(getattr(module, 'main', None)), name


def test_every_entry_point_has_a_run_or_says_why_not():
  entry_points = set(MODULES) - LIBRARY_ONLY
  assert entry_points == set(SMALLEST_RUNS) | set(HELP_ONLY) | RUN_BY_GPU_SCRIPT, (
    'give each benchmark its smallest run (SMALLEST_RUNS) or a reason for --help (HELP_ONLY)'
  )
  assert not set(SMALLEST_RUNS) & set(HELP_ONLY)
  gpu_script = (ROOT / 'benchmarks' / 'gpu.sh').read_text()
  for name in RUN_BY_GPU_SCRIPT:
    assert f'-m benchmarks.{name} ' in gpu_script, name


@pytest.mark.parametrize('name', sorted(set(HELP_ONLY) | RUN_BY_GPU_SCRIPT))
def test_help(name):
  done = _run(name, ['--help'], timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith('usage: '), done.stdout[:500]


@pytest.mark.parametrize(
  'name',
  [
    pytest.param(name, marks=[pytest.mark.slow] if slow else [])
    for name, (_, _, slow) in sorted(SMALLEST_RUNS.items())
  ],
)
def test_smallest_run(name):
  args, line, _ = SMALLEST_RUNS[name]
  done = _run(name, args, timeout=900)
  assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
  assert re.search(line, done.stdout, re.M), (line, done.stdout[-3000:])
