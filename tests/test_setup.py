"""What the package and the test setup do to jax's environment before it starts."""

import os
import shutil
import subprocess
import sys

import pytest

from tiny_runs import ROOT

# A jitted 3x3 convolution checked against scipy, then the flags jax started with.
_CONV = """
import os, sys
import {module}
import jax, jax.numpy as jnp, numpy as np, scipy.signal
x = np.random.default_rng(0).standard_normal((1, 9, 9, 1)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((3, 3, 1, 1)).astype(np.float32)
y = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
    a, b, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
want = scipy.signal.correlate2d(x[0, ..., 0], w[..., 0, 0], mode='same')
np.testing.assert_allclose(np.asarray(y)[0, ..., 0], want, rtol=1e-5, atol=1e-5)
print(os.environ['XLA_FLAGS'])
print(jax.device_count())
"""


def run_python(code, xla_flags, cwd=ROOT):
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=str(ROOT))
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.split('\n')


@pytest.mark.parametrize('module', ['cmedl_jax', 'cmedl_jax.main'])
@pytest.mark.parametrize(
  'given, expected',
  [
    ('', '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_experimental_ynn_fusion_type='),
  ],
)
def test_importing_the_package_uses_xla_cpu_convolutions_unless_told_otherwise(
  module, given, expected
):
  """`import cmedl_jax` (or the trainer) before jax starts: jitted convolutions run with the
  package's XLA:CPU flag; a user's own setting of that flag is kept."""
  flags, devices = run_python(
    _CONV.format(module=module), f'--xla_force_host_platform_device_count=2 {given}'.strip()
  )[:2]
  assert flags.split() == ['--xla_force_host_platform_device_count=2', expected]
  assert devices == '2'


def test_tests_get_8_devices_whatever_the_users_xla_flags():
  """tests/conftest.py: a user's XLA_FLAGS (another device count, other flags) keep the 8
  devices the multi-device tests need, and the user's other flags."""
  code = 'import conftest\n' + _CONV.format(module='jax')
  flags, devices = run_python(
    code,
    '--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false',
    cwd=ROOT / 'tests',
  )[:2]
  assert devices == '8'
  assert '--xla_cpu_enable_fast_math=false' in flags.split()
  assert '--xla_force_host_platform_device_count=2' not in flags


COMMANDS = ('cmedl-train', 'cmedl-predict', 'cmedl-evaluate', 'cmedl-prepare', 'cmedl-phantoms')


def test_pip_install_puts_the_five_commands_on_path(tmp_path):
  """`pip install .` (here from a copy of the sources, without dependencies and offline, into a
  folder) installs the packages and the five commands, each of which answers --help."""
  src = tmp_path / 'src'
  for name in ('cmedl_jax', 'data_prep', 'configs'):
    shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'requirements.txt'):
    shutil.copy(ROOT / name, src / name)
  target = tmp_path / 'installed'
  subprocess.run(
    [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation']
    + ['--no-index', '--target', str(target), str(src)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  assert {'cmedl_jax', 'data_prep', 'configs'} <= set(os.listdir(target))
  env = dict(os.environ, PYTHONPATH=str(target))
  for command in COMMANDS:
    result = subprocess.run(
      [str(target / 'bin' / command), '--help'],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    # absl's --help (cmedl-train) exits 1 after the usage, argparse's 0.
    assert result.returncode == (command == 'cmedl-train'), (command, result.stderr[-2000:])
    assert 'usage' in result.stdout.lower() or '--workdir' in result.stdout, command
    if command == 'cmedl-train':  # Importing the package keeps TensorFlow's notices away.
      assert 'oneDNN' not in result.stderr, result.stderr[-2000:]
