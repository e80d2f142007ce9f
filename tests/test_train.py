"""The training program: resume after SIGTERM and SIGKILL is bit-exact, NaN stops, config errors.

Runs tiny CMEDL trainings (configs/tiny.py, 32x32) on small phantom datasets; the programs run
as subprocesses (`python -m cmedl_jax.main`) sharing one persistent compilation cache.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cmedl_jax import checkpoint
from cmedl_jax import input_pipeline
from cmedl_jax import predict
from cmedl_jax import train
from configs import tiny
from configs import two_stage
from data_prep import phantoms

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """Small unpaired thorax CT and T2w phantom datasets, prepared at 32x32 (12 mm)."""
  root = tmp_path_factory.mktemp('train_data')
  write_phantoms(root, n=5, seed=0, slices=6)
  train.prepare_data(small_config(root))
  return root


def write_phantoms(root, n, seed, slices):
  """ROOT/raw/thorax_ct and ROOT/raw/thorax_t2w: n training + 1 test case, 48x48 at 8 mm."""
  for kind in ('thorax_ct', 'thorax_t2w'):
    phantoms.write_dataset(kind, n, seed, root / 'raw' / kind, n_test=1, size=48, spacing=8.0,
                           slices=slices)


def overrides(root, **train_fields):
  """(field, value) pairs of the tiny config that point it at `root` and set train fields."""
  fields = {'data.spacing_mm': 12.0, 'data.source.raw_dir': root / 'raw' / 'thorax_ct',
            'data.source.prepared_dir': root / 'prepared' / 'thorax_ct',
            'data.target.raw_dir': root / 'raw' / 'thorax_t2w',
            'data.target.prepared_dir': root / 'prepared' / 'thorax_t2w',
            'train.num_steps': NUM_STEPS, 'train.checkpoint_every': 3, 'train.eval_every': 4,
            'train.image_every': 4, 'train.log_every': 2}
  fields.update({f'train.{k}': v for k, v in train_fields.items()})
  return fields


def small_config(root, **train_fields):
  config = tiny.get_config('unet,cyclegan')
  for field, value in overrides(root, **train_fields).items():
    *parents, leaf = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value if not isinstance(value, pathlib.Path) else str(value)
  return config


# A `python -m cmedl_jax.main` that sends itself SIGNAL when the training loop asks for the
# batch of step STEP (after STEP steps have run): a hard kill or an interrupt mid-run.
_INTERRUPTING_MAIN = '''
import os, signal, sys
from absl import app
from cmedl_jax import input_pipeline, main
sig, at_step = getattr(signal, sys.argv.pop(1)), int(sys.argv.pop(1))
create = input_pipeline.create_train_iterator
def create_interrupting(*args, **kwargs):
  it, step = create(*args, **kwargs), kwargs['start_step']
  class Interrupting:
    def __next__(self):
      nonlocal step
      if step == at_step:
        os.kill(os.getpid(), sig)
      step += 1
      return next(it)
    def close(self):
      it.close()
  return Interrupting()
input_pipeline.create_train_iterator = create_interrupting
app.run(main.main)
'''


def run_main(root, workdir, cache, interrupt=None, extra=()):
  """Runs the trainer in a subprocess; interrupt=(signal name, step). Returns CompletedProcess."""
  args = [f'--config={ROOT / "configs" / "tiny.py"}:unet,cyclegan', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in overrides(root).items()] + list(extra)
  program = ['-m', 'cmedl_jax.main']
  if interrupt:
    program = ['-c', _INTERRUPTING_MAIN, interrupt[0], str(interrupt[1])]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, *program, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def final_state(workdir):
  return checkpoint.restore_state(os.path.join(workdir, 'checkpoints'), None)


def steps_saved(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@pytest.mark.slow
def test_interrupted_runs_resume_bit_for_bit(data_root, tmp_path):
  cache = tmp_path / 'jax_cache'
  straight = run_main(data_root, tmp_path / 'straight', cache)
  assert straight.returncode == 0, straight.stderr[-3000:]

  # SIGTERM before step 2 runs: saves step 2 and exits cleanly.
  resumed = tmp_path / 'resumed'
  term = run_main(data_root, resumed, cache, interrupt=('SIGTERM', 2))
  assert term.returncode == 0, term.stderr[-3000:]
  assert 'Received SIGTERM: saved step 3, exiting.' in term.stderr
  assert steps_saved(resumed) == [3]
  # SIGKILL before step 5 runs (last checkpoint: 3): no clean-up of any kind.
  kill = run_main(data_root, resumed, cache, interrupt=('SIGKILL', 5))
  assert kill.returncode == -9, kill.stderr[-3000:]
  assert 'Starting at step 3 of 8.' in kill.stderr
  assert not os.path.exists(resumed / 'export')
  # Resume to the end.
  last = run_main(data_root, resumed, cache)
  assert last.returncode == 0, last.stderr[-3000:]
  assert re.search(r'Starting at step [35] of 8\.', last.stderr)

  a, b = final_state(tmp_path / 'straight'), final_state(resumed)
  assert int(a['step']) == int(b['step']) == NUM_STEPS
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  history = [json.loads((d / 'validation.json').read_text())
             for d in (tmp_path / 'straight', resumed)]
  assert [r['step'] for r in history[0]] == [4, 8]
  assert history[0] == history[1]
  assert os.path.isdir(resumed / 'export')


def _inject_nan_at(monkeypatch, bad_step):
  create = input_pipeline.create_train_iterator

  def create_with_nan(*args, **kwargs):
    it, step = create(*args, **kwargs), kwargs['start_step']

    class WithNaN:
      def __next__(self):
        nonlocal step
        src, tgt = next(it)
        if step == bad_step:
          src = dict(src, image=src['image'] * np.nan)
        step += 1
        return src, tgt

      def close(self):
        it.close()
    return WithNaN()
  monkeypatch.setattr(input_pipeline, 'create_train_iterator', create_with_nan)


@pytest.mark.slow
def test_nan_in_batch_stops_naming_loss_and_step_and_keeps_last_checkpoint(
    data_root, tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, 4)  # The batch of the 5th step.
  config = small_config(data_root, checkpoint_every=2, log_every=1, eval_every=100)
  with pytest.raises(train.NonFiniteLossError, match=r'loss/\w+ is nan at step 5; stopping'):
    train.train_and_evaluate(config, str(tmp_path))
  assert steps_saved(tmp_path) == [2, 4]
  state = final_state(tmp_path)
  assert int(state['step']) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(OSError, match=r"workdir '.*file/run' is not writable"):
    train.check_workdir(str(blocker / 'run'))


def test_prepared_data_of_another_spec_is_an_error(data_root):
  config = small_config(data_root)
  config.data.image_size = 48
  with pytest.raises(ValueError, match=r'prepared_dir elsewhere or delete it'):
    train.prepare_data(config)


def test_mistyped_config_field_is_an_error(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'cmedl_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_stepz=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'num_stepz' in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


@pytest.mark.parametrize('given, expected', [
    ('', '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
    ('--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_experimental_ynn_fusion_type='),
])
def test_main_uses_xla_cpu_convolutions_unless_told_otherwise(given, expected):
  code = 'import os; import cmedl_jax.main; print(os.environ["XLA_FLAGS"])'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=2 {given}'.strip())
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  flags = result.stdout.split()
  assert flags[0] == '--xla_force_host_platform_device_count=2'
  assert flags[1:] == [expected]


@pytest.mark.slow
def test_two_stage_training_end_to_end(data_root, tmp_path):
  """Stage 1 (translator_only, with image summaries) trains and checkpoints; stage 2 starts
  from its translator and keeps it frozen while teacher and student train."""
  stage1 = small_config(data_root, num_steps=2, image_every=1, checkpoint_every=2)
  two_stage.apply_stage(stage1, 'stage1')
  train.train_and_evaluate(stage1, str(tmp_path / 'stage1'))
  saved = predict._restore_tree(str(tmp_path / 'stage1' / 'checkpoints' / '2'))  # pylint: disable=protected-access
  assert 'student' not in saved['params']
  stage2 = small_config(data_root, num_steps=2, checkpoint_every=2)
  two_stage.apply_stage(stage2, 'stage2')
  stage2.method.translator_init = str(tmp_path / 'stage1')
  result = train.train_and_evaluate(stage2, str(tmp_path / 'stage2'))
  assert np.isfinite(result['val_dsc'])
  final = predict._restore_tree(str(tmp_path / 'stage2' / 'checkpoints' / '2'))  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(saved['params']['translator']),
                  jax.tree.leaves(final['params']['translator'])):
    np.testing.assert_array_equal(a, b)
