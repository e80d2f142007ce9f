"""What the package and the test setup do to jax's environment before it starts."""

import os
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
