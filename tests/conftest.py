"""Test setup, before jax starts: 8 forced CPU devices, one compilation cache, quiet TF; tests
marked `tensorflow` (the optional extra: augment_on='host') skipped, with the reason, where
TensorFlow is not installed (.ci/run installs it after the suite and runs them).

- XLA_FLAGS always gets `--xla_force_host_platform_device_count=8` (the multi-device tests need
  8 devices), whatever the user's own XLA_FLAGS hold; their other flags are kept.
- `--xla_backend_optimization_level=0` unless the user sets it: XLA's HLO passes are the same,
  LLVM does not optimise the generated code. The tests' programs are tiny and compiled once or
  twice each, so compiling dominates: measured on the tiny CMEDL step, compile 16.5 -> 8.2 s and
  the state initialisation 14.6 -> 2.7 s, for 0.11 -> 0.16 s per step.
- Not `--xla_cpu_use_fusion_emitters=false` (used here from 2026-12-04 to 12-08; it cut the tiny
  step's compile 13.2 -> 9.8 s): together with the LLVM level 0 above, XLA:CPU (jaxlib 0.10.2)
  miscompiled the joint step's gradient on 4 devices. Measured 2026-12-08 on an AMD EPYC (Zen 4,
  AVX-512): the tiny CMEDL step's gradient of the translator G for its identity term |G(t) - t|
  was 1% off on a 1 x 4 device mesh (9.8e-3 of the tensor's largest, every conv before the
  output conv), against 1e-6 on 1, 2 and 8 devices and on 4 devices with either flag alone or
  with neither; it failed tests/test_multihost.py on such machines (issue 41).
- The package's XLA:CPU flags (cmedl_jax/__init__.py) as users get them.
- One persistent compilation cache for the whole session (a fresh temporary folder, or the
  user's JAX_COMPILATION_CACHE_DIR), inherited through the environment by pytest-xdist workers
  and by the subprocesses the tests start, so one network compiled in one test is loaded, not
  compiled again, by the next test or process that builds the same program.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

_DEVICES = '--xla_force_host_platform_device_count'
_LLVM_LEVEL = '--xla_backend_optimization_level'
_flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICES)]
_flags.append(f'{_DEVICES}=8')
if not any(f.startswith(_LLVM_LEVEL) for f in _flags):
  _flags.append(f'{_LLVM_LEVEL}=0')
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='cmedl_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  _OWNER = os.getpid()
  atexit.register(lambda: os.getpid() == _OWNER and shutil.rmtree(_CACHE, ignore_errors=True))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The package's own XLA:CPU flags (cmedl_jax/__init__.py), before any test starts jax: the
# tests run what users run, and in-process and subprocess programs share cache entries.
import cmedl_jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
  """Small unpaired thorax CT and T2w phantom datasets (5 training + 1 test patients each),
  prepared at 32x32 (12 mm). Returns the root (tests/tiny_runs.py layout)."""
  from cmedl_jax import prepared_data  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('tiny_data')
  tiny_runs.write_phantoms(root, n=5, seed=0, slices=6)
  prepared_data.prepare_data(tiny_runs.small_config(root))
  return root


@pytest.fixture(scope='session')
def tiny_run(tiny_data, tmp_path_factory):
  """A finished tiny CMEDL run (U-Net + CycleGAN, tiny_runs.NUM_STEPS steps, checkpoints every
  3 steps with the latest 2 kept, validation and images every 4), trained in-process once per
  session. Returns (data root, workdir)."""
  from cmedl_jax import train  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp('tiny_run') / 'run'
  train.train_and_evaluate(tiny_runs.small_config(tiny_data, keep_checkpoints=2), str(workdir))
  return tiny_data, workdir


def pytest_collection_modifyitems(config, items):
  """Tests marked `tensorflow` skip, saying why, where TensorFlow is not installed."""
  del config
  if importlib.util.find_spec('tensorflow') is not None:
    return
  from cmedl_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  skip = pytest.mark.skip(
    reason=f'needs the optional TensorFlow, not installed: {input_pipeline.TENSORFLOW_INSTALL}'
  )
  for item in items:
    if item.get_closest_marker('tensorflow'):
      item.add_marker(skip)
