"""benchmarks/gpu.sh, the prepared GPU lease script, at --tiny sizes on CPU: every default stage
(product, vs_torch, study) exits 0 and prints its figures, so that a lease is never lost to a
typo in it. torch is optional: without it vs_torch runs its JAX half and says so in one line.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICES = '--xla_force_host_platform_device_count'
_NUMBER = r'[0-9]+(\.[0-9]+)?'


@pytest.fixture(scope='module')
def tiny_lease(tmp_path_factory):
  """(exit status, {stage: its log}, figures.txt) of `bash benchmarks/gpu.sh OUT --tiny`."""
  root = tmp_path_factory.mktemp('gpu_script')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICES)]
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=' '.join(flags),  # One device, as on the GPU machine.
    GPU_WORK=str(root / 'work'),
    GPU_WHEELS=str(root / 'no_wheels'),  # Not the checkout's .whl (Python 3.12 wheels).
    PYTHON=sys.executable,
  )
  done = subprocess.run(
    ['bash', 'benchmarks/gpu.sh', str(root / 'out'), '--tiny'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  out = root / 'out'
  logs = {p.stem: p.read_text() for p in out.glob('*.log')}
  figures = (out / 'figures.txt').read_text() if (out / 'figures.txt').exists() else ''
  return done, logs, figures


@pytest.mark.slow
def test_every_stage_exits_0(tiny_lease):
  done, logs, _ = tiny_lease
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
  for stage in ('product', 'vs_torch', 'study'):
    assert re.search(rf'^== {stage}: exit 0 ', logs[stage], re.M), logs[stage][-3000:]


@pytest.mark.slow
def test_product_figures(tiny_lease):
  """Both runs (the demo config and the GPU-sized one): compile time, steps/s, validation and
  test DSC, peak device memory (n/a on CPU)."""
  _, _, figures = tiny_lease
  for run in ('demo', 'gpu'):
    for pattern in (
      rf'compile {_NUMBER} s \(first train-step call\)',
      rf'steps/s {_NUMBER} \(median of',
      rf'validation DSC {_NUMBER} at step 6',
      rf'test DSC per case tumor: {_NUMBER} ',
      rf'test DSC per tumor tumor: {_NUMBER} ',
      r'peak device memory n/a \(cpu: no memory_stats\)',
    ):
      assert re.search(rf'^FIG product {run}: {pattern}', figures, re.M), (pattern, figures)


@pytest.mark.slow
def test_vs_torch_figures(tiny_lease):
  """The JAX step at both precisions; the ratio where torch is installed, else one line."""
  _, _, figures = tiny_lease
  for precision in ('highest', 'default'):
    assert re.search(
      rf'^FIG vs_torch: jax step unet:cyclegan 32x32 batch 2 precision {precision} float32: '
      rf'{_NUMBER} ms on cpu',
      figures,
      re.M,
    ), figures
    ratio = re.search(
      rf'^FIG vs_torch: jax/torch unet:cyclegan 32x32 batch 2 precision {precision}: {_NUMBER} '
      r'\(jax .* on cpu, torch .* on cpu',
      figures,
      re.M,
    )
    assert bool(ratio) == (importlib.util.find_spec('torch') is not None), figures
  missing = 'FIG vs_torch: torch is not installed: the JAX half only, no jax/torch ratio'
  assert (missing in figures) == (importlib.util.find_spec('torch') is None), figures


@pytest.mark.slow
def test_study_figures(tiny_lease):
  """Runs per hour: one process, jax.vmap over 2 seeds, one on 1 core, 2 at once."""
  _, _, figures = tiny_lease
  for pattern in (
    rf'1 process: {_NUMBER}$',
    rf'jax.vmap x2 seeds \(1 process\): {_NUMBER} ',
    rf'1 process on 1 core: {_NUMBER}$',
    rf'2 processes at once: {_NUMBER} \(each {_NUMBER}, {_NUMBER};',
  ):
    assert re.search(rf'^FIG study: runs/hour {pattern}', figures, re.M), (pattern, figures)


def test_unknown_stage_fails_before_any_work(tmp_path):
  """A typo in a stage name is an error at once (exit 2), before the machine report."""
  done = subprocess.run(
    ['bash', 'benchmarks/gpu.sh', str(tmp_path / 'out'), '--tiny', 'prodcut'],
    cwd=ROOT,
    env=dict(os.environ, GPU_WORK=str(tmp_path / 'work')),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 2
  assert done.stderr.strip() == 'gpu.sh: unknown stage prodcut'
  assert not (tmp_path / 'out' / 'machine.txt').exists()
