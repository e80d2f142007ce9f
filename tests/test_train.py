"""The training program: resume after SIGTERM, SIGKILL and a kill during a checkpoint save is
bit-exact, NaN stops, checkpoints keep the latest K and the best, TensorBoard holds what the
README promises, config errors.

Tiny CMEDL trainings (configs/tiny.py, 32x32) on small phantom datasets (tests/tiny_runs.py);
the interrupted programs run as subprocesses (`python -m cmedl_jax.main`) sharing the session's
compilation cache with the in-process run they are compared with (the `tiny_run` fixture).
"""

import collections
import concurrent.futures
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import checkpoint
from cmedl_jax import curves
from cmedl_jax import inference
from cmedl_jax import input_pipeline
from cmedl_jax import method
from cmedl_jax import predict
from cmedl_jax import prepared_data
from cmedl_jax import sharding
from cmedl_jax import train
from cmedl_jax import train_state
from cmedl_jax import train_step as ts
from cmedl_jax import validation
from cmedl_jax import workdir_lock
from cmedl_jax.evaluation import metrics as seg_metrics
from configs import two_stage
from configs import tiny as configs_tiny
from data_prep import nifti_io
from data_prep import prepare
from tiny_runs import final_state
from tiny_runs import NUM_STEPS
from tiny_runs import read_images
from tiny_runs import ROOT
from tiny_runs import run_main
from tiny_runs import small_config
from tiny_runs import steps_saved


@pytest.mark.slow
def test_interrupted_runs_resume_bit_for_bit(tiny_run, tmp_path):
  data_root, straight = tiny_run
  # SIGTERM before step 2 runs: saves step 3 and exits cleanly.
  resumed = tmp_path / 'resumed'
  term = run_main(data_root, resumed, interrupt=('SIGTERM', 2))
  assert term.returncode == 0, term.stderr[-3000:]
  assert 'Received SIGTERM: saved step 3, exiting.' in term.stderr
  assert steps_saved(resumed) == [3]
  # The parameter table goes to a file, the console gets one line.
  assert '| student/' not in term.stderr and 'parameters (per network: ' in term.stderr
  assert '| student/' in (resumed / 'parameters.txt').read_text()
  # SIGKILL mid-run, while checkpoint 6 is being saved (steps 4-6 ran; last commit: 3): no
  # clean-up of any kind, checkpoint 6's files written, its commit not.
  during_save = run_main(data_root, resumed, interrupt=('SAVE', 6))
  assert during_save.returncode == -9, during_save.stderr[-3000:]
  assert 'Starting at step 3 of 8.' in during_save.stderr
  assert steps_saved(resumed) == [3]
  assert [d for d in os.listdir(resumed / 'checkpoints') if not d.isdigit()]  # The torso.
  assert not os.path.exists(resumed / 'export')
  # Resume to the end, from the last committed checkpoint.
  last = run_main(data_root, resumed)
  assert last.returncode == 0, last.stderr[-3000:]
  assert 'Starting at step 3 of 8.' in last.stderr
  assert steps_saved(resumed) == [3, 6, 8]
  # No torso left (orbax reuses its name, 6.orbax-checkpoint-tmp, when step 6 is saved again).
  assert sorted(os.listdir(resumed / 'checkpoints')) == ['3', '6', '8']

  a, b = final_state(straight), final_state(resumed)
  assert int(a['step']) == int(b['step']) == NUM_STEPS
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  history = [json.loads((d / 'validation.json').read_text()) for d in (straight, resumed)]
  assert [r['step'] for r in history[0]] == [4, 8]
  assert history[0] == history[1]
  assert os.path.isdir(resumed / 'export')


@pytest.mark.parametrize('name', ['SIGINT', 'SIGTERM'])
def test_ctrl_c_like_sigterm_asks_the_loop_to_save_and_stop(name):
  """Ctrl-C (SIGINT) is not a KeyboardInterrupt mid-step: the loop saves and exits, as for
  SIGTERM (whose whole path test_interrupted_runs_resume_bit_for_bit runs)."""
  sig = getattr(signal, name)
  before = signal.getsignal(sig)
  with train._StopFlag() as stop:  # pylint: disable=protected-access
    assert stop.any_process() is None
    os.kill(os.getpid(), sig)
    assert stop.any_process() == name
  assert signal.getsignal(sig) is before


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
  tiny_data, tmp_path, monkeypatch
):
  _inject_nan_at(monkeypatch, 4)  # The batch of the 5th step.
  config = small_config(tiny_data, checkpoint_every=2, log_every=1, eval_every=100)
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


def test_prepared_data_of_another_spec_is_an_error(tiny_data):
  config = small_config(tiny_data)
  config.data.image_size = 48
  with pytest.raises(ValueError, match=r'prepared_dir elsewhere or delete it'):
    prepared_data.prepare_data(config)


def test_trainings_started_together_prepare_the_data_once(tiny_data, tmp_path, monkeypatch):
  """Two trainings on the same unprepared data (python -m cmedl_jax.study --jobs 2) prepare each
  side once: the second waits for the first (a lock beside the prepared folder), then uses
  what it made."""
  config = small_config(tiny_data)
  for side in ('source', 'target'):
    config.data[side].prepared_dir = str(tmp_path / 'prepared' / side)
  calls = []
  real = prepare.prepare_dataset

  def slow_prepare(*args, **kwargs):
    calls.append(args[1])
    time.sleep(0.5)  # Long enough for the other thread to arrive meanwhile.
    return real(*args, **kwargs)

  monkeypatch.setattr(prepare, 'prepare_dataset', slow_prepare)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda _: prepared_data.prepare_data(config), range(2)))
  assert sorted(calls) == sorted(config.data[s].prepared_dir for s in ('source', 'target'))
  assert all(prepare.is_prepared(config.data[s].prepared_dir) for s in ('source', 'target'))


def test_prepared_data_of_another_raw_folder_is_an_error(tiny_data, tmp_path):
  """A prepared folder is reused only for the raw folder it was made from (a copy elsewhere,
  perhaps other patients, is not silently taken for it)."""
  config = small_config(tiny_data)
  other = tmp_path / 'copy_of_ct'
  shutil.copytree(config.data.source.raw_dir, other)
  config.data.source.raw_dir = str(other)
  with pytest.raises(
    ValueError,
    match=r'was prepared from .*thorax_ct, but data.source.raw_dir '
    r'is .*copy_of_ct; point data.source.prepared_dir elsewhere',
  ):
    prepared_data.prepare_data(config)


def test_mistyped_config_field_is_an_error(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cmedl_jax.main',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path}',
      '--config.train.num_stepz=3',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert 'num_stepz' in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


@pytest.mark.slow
def test_two_stage_training_end_to_end(tiny_data, tmp_path):
  """Stage 1 (translator_only, with image summaries) trains and checkpoints; stage 2 starts
  from its translator and keeps it frozen while teacher and student train."""
  stage1 = small_config(tiny_data, num_steps=2, image_every=1, checkpoint_every=2)
  two_stage.apply_stage(stage1, 'stage1')
  train.train_and_evaluate(stage1, str(tmp_path / 'stage1'))
  saved = checkpoint.restore_tree(str(tmp_path / 'stage1' / 'checkpoints' / '2'))
  assert 'student' not in saved['params']
  stage2 = small_config(tiny_data, num_steps=2, checkpoint_every=2)
  two_stage.apply_stage(stage2, 'stage2')
  stage2.method.translator_init = str(tmp_path / 'stage1')
  result = train.train_and_evaluate(stage2, str(tmp_path / 'stage2'))
  assert np.isfinite(result['val_dsc'])
  final = checkpoint.restore_tree(str(tmp_path / 'stage2' / 'checkpoints' / '2'))
  for a, b in zip(
    jax.tree.leaves(saved['params']['translator']), jax.tree.leaves(final['params']['translator'])
  ):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoints_keep_the_latest_k_and_the_best(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  dsc = {1: 0.2, 2: 0.6, 3: 0.4, 4: 0.1, 5: 0.5}
  for step, value in dsc.items():
    state = {'w': np.full((3,), step, np.float32)}
    ckpts.save(step, state)
    ckpts.save_if_best(step, state, {'val_dsc': value})
  ckpts.save_if_best(2, {'w': np.zeros((3,), np.float32)}, {'val_dsc': 0.6})  # Kept as is.
  ckpts.wait()
  assert ckpts.latest_step() == 5
  ckpts.close()
  assert steps_saved(tmp_path) == [4, 5]
  assert steps_saved(tmp_path, 'best') == [2]
  np.testing.assert_array_equal(final_state(tmp_path, 'best')['w'], [2, 2, 2])
  np.testing.assert_array_equal(final_state(tmp_path)['w'], [5, 5, 5])


def test_a_run_keeps_its_latest_checkpoints_best_and_export(tiny_run):
  _, workdir = tiny_run
  assert steps_saved(workdir) == [6, 8]  # Saved at 3, 6 and 8; the latest 2 kept.
  history = json.loads((workdir / 'validation.json').read_text())
  best = steps_saved(workdir, 'best')
  assert len(best) == 1
  assert {r['step']: r['val_dsc'] for r in history}[best[0]] == max(r['val_dsc'] for r in history)
  assert int(final_state(workdir, 'best')['step']) == best[0]
  # The export is the final state's test-time network (the student).
  exported = checkpoint.load_variables(str(workdir / 'export'))
  final = final_state(workdir)
  assert set(exported['params']) == {'student'}
  for a, b in zip(
    jax.tree.leaves(exported),
    jax.tree.leaves(
      {
        'params': {'student': final['params']['student']},
        'batch_stats': {'student': final['batch_stats']['student']},
      }
    ),
  ):
    np.testing.assert_array_equal(a, b)


def truncate_every_file(directory):
  """Cuts every file under `directory` to half its size (a checkpoint damaged on disk)."""
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _same_arrays(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(
  tiny_run, tmp_path, caplog
):
  """Issue 21 item 7: a truncated latest checkpoint gave a 156-line traceback on resume."""
  data_root, finished = tiny_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / 'export')  # Not finished: its export is still to be written.
  truncate_every_file(workdir / 'checkpoints' / '8')
  with caplog.at_level('INFO'):
    result = train.train_and_evaluate(small_config(data_root, keep_checkpoints=2), str(workdir))
  assert result['step'] == NUM_STEPS
  warned = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert len(warned) == 1 and '\n' not in warned[0], warned
  assert f'{workdir / "checkpoints" / "8"} does not restore, skipped (' in warned[0]
  assert 'Starting at step 6 of 8.' in caplog.text
  # The damaged step is kept aside; step 8 is trained again from 6, as the uninterrupted run did.
  assert steps_saved(workdir) == [6, 8]
  assert os.listdir(workdir / 'checkpoints' / 'damaged') == ['8']
  _same_arrays(final_state(workdir), final_state(finished))
  assert os.path.isdir(workdir / 'export')
  history = [json.loads((d / 'validation.json').read_text()) for d in (finished, workdir)]
  assert history[0] == history[1]


def test_a_run_whose_checkpoints_all_fail_to_restore_is_a_one_line_error(tiny_run, tmp_path):
  data_root, finished = tiny_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  for step in ('6', '8'):
    truncate_every_file(workdir / 'checkpoints' / step)
  with pytest.raises(checkpoint.ConfigError, match=r'checkpoints: no checkpoint restores') as e:
    train.train_and_evaluate(small_config(data_root, keep_checkpoints=2), str(workdir))
  assert '\n' not in str(e.value)
  assert 'step 8: ' in str(e.value) and 'step 6: ' in str(e.value)
  assert steps_saved(workdir) == [6, 8]  # Nothing moved: perhaps a fault of this machine.


# ------------------------------------------------------------------------------ TensorBoard


# The validation of a CMEDL run with CycleGAN: the student's, the teacher's on G(x), the cycle.
VALIDATION_KEYS = (
  'val_dsc',
  'val_sdsc',
  'val_hd95',
  'val_teacher_dsc',
  'val_teacher_sdsc',
  'val_teacher_hd95',
  'val_cycle_l1',
)


def test_tensorboard_holds_losses_norms_rates_validation_and_images(tiny_run):
  """What the README promises under Logging, read back from the run's event files."""
  _, workdir = tiny_run
  scalars = curves.read_scalars(str(workdir))
  logged = [2, 4, 6, 8]  # train.log_every = 2.
  generator_side = (
    ts.TRANSLATION_TERMS + ts.CYCLEGAN_TERMS + ts.TEACHER_TERMS + ts.STUDENT_TERMS + ('hint',)
  )
  terms = generator_side + ts.DISCRIMINATOR_TERMS + (ts.TOTAL_TERM,)
  groups = ('translator', 'discriminator', 'teacher', 'student')
  for tag in (
    [f'loss/{t}' for t in terms]
    + [f'grad_norm/{g}' for g in groups]
    + [f'lr/{g}' for g in groups]
    + ['perf/steps_per_sec', 'perf/data_wait_fraction']
  ):
    assert tag in scalars, tag
    np.testing.assert_array_equal(scalars[tag][0], logged, err_msg=tag)
    assert np.isfinite(scalars[tag][1]).all(), tag
  config = small_config(tiny_run[0])
  for g in groups:
    want = [float(train_state.learning_rates(config, s)[g]) for s in logged]
    np.testing.assert_allclose(scalars[f'lr/{g}'][1], want, rtol=1e-6, err_msg=g)
  np.testing.assert_allclose(
    scalars['loss/total_generator_side'][1],
    sum(scalars[f'loss/{t}'][1] for t in generator_side),
    rtol=1e-5,
  )
  history = json.loads((workdir / 'validation.json').read_text())
  for key in VALIDATION_KEYS:
    np.testing.assert_array_equal(scalars[key][0], [4, 8])
    np.testing.assert_allclose(scalars[key][1], [r[key] for r in history], rtol=1e-6)
  images = {tag: sorted(by_step) for tag, by_step in read_images(workdir).items()}
  for tag in (
    'source',
    'label',
    'pseudo_target',
    'cycle_source',
    'prediction/inference',
    'prediction/teacher_on_pseudo_target',
  ):
    assert images.get(tag) == [4, 8], (tag, images)


def test_validation_records_hold_the_teacher_and_the_cycle_error(tiny_run):
  """Every validation.json record holds the teacher's metrics on G(x) (finite DSC and surface
  DSC; HD95 as the student's: finite or NaN, never inf) and a positive cycle error."""
  _, workdir = tiny_run
  history = json.loads((workdir / 'validation.json').read_text())
  assert [r['step'] for r in history] == [4, 8]
  for record in history:
    assert set(VALIDATION_KEYS) <= set(record), record
    assert np.isfinite([record['val_teacher_dsc'], record['val_teacher_sdsc']]).all(), record
    assert not np.isinf(record['val_teacher_hd95']) and not np.isinf(record['val_hd95'])
    assert 0 <= record['val_teacher_dsc'] <= 1 and 0 <= record['val_teacher_sdsc'] <= 1
    assert 0 < record['val_cycle_l1'] < 2, record  # Intensities in [-1, 1].


_State = collections.namedtuple('_State', 'params batch_stats')


def _direct_teacher_and_cycle(config, tree, volume, mesh):
  """Per-class metrics of the teacher on G(x) (method.infer_logits over the volume with
  inference.predict_volume) and |F(G(x)) - x| per slice, computed here from a restored state."""
  nets = method.build_networks(config, config.data.context_slices)
  p, s = tree['params'], tree['batch_stats']
  teacher = jax.jit(
    lambda x: jax.nn.softmax(
      method.infer_logits(p, s, x, nets=nets, test_time=method.TEACHER_ON_TRANSLATION), -1
    )
  )
  pred, _ = inference.predict_volume(
    teacher, volume['image'], config.eval.batch_size, config.data.context_slices, mesh
  )
  classes = {k: k for k in range(1, config.data.num_classes)}
  case = seg_metrics.evaluate_case(
    pred, volume['label'], volume['spacing_mm'], classes, tolerance_mm=config.eval.tolerance_mm
  )
  x = inference.context_stack(volume['image'], config.data.context_slices)
  fake = nets.translator.apply({'params': p['translator']}, x)
  cycle = nets.translator_inv.apply({'params': p['translator_inv']}, fake)
  return case, np.abs(np.asarray(cycle, np.float32) - x).mean((1, 2, 3))  # [Z], per slice.


def _mean_finite(values):
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float('nan')


def test_validation_of_the_teacher_is_the_teacher_applied_directly(tiny_run):
  """validation.validate's teacher metrics and cycle error on one validation volume, and the run's
  last validation record over all of them, equal the final state's teacher on G(x) and F(G(x))
  computed directly."""
  _, workdir = tiny_run
  config = checkpoint.load_config(str(workdir))
  tree = checkpoint.restore_tree(str(workdir / 'checkpoints' / str(NUM_STEPS)))
  mesh = sharding.make_mesh()
  volumes = validation.validation_volumes(config)
  direct = [_direct_teacher_and_cycle(config, tree, v, mesh) for v in volumes]
  nets = method.build_networks(config, config.data.context_slices)
  programs = train._Programs(config, nets, mesh, state_sharding=None)
  tree = sharding.from_host(tree, sharding.replicated(mesh))  # As the trainer holds it.
  state = _State(tree['params'], tree['batch_stats'])
  got = validation.validate(config, state, programs, volumes[:1], mesh)
  last = json.loads((workdir / 'validation.json').read_text())[-1]
  assert last['step'] == NUM_STEPS
  for key, metric in (('dsc', 'dice'), ('sdsc', 'surface_dice'), ('hd95', 'hd95')):
    one = _mean_finite([m[metric] for m in direct[0][0].values()])
    every = _mean_finite([m[metric] for case, _ in direct for m in case.values()])
    np.testing.assert_allclose(got[f'val_teacher_{key}'], one, rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(last[f'val_teacher_{key}'], every, rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(got['val_cycle_l1'], direct[0][1].mean(), rtol=1e-5)
  every_slice = np.concatenate([c for _, c in direct])
  np.testing.assert_allclose(last['val_cycle_l1'], every_slice.mean(), rtol=1e-5)


def _everywhere(label):
  """A stand-in network: (state, slices [B,H,W,C]) -> probability 1 of `label` ([B,H,W,2])."""
  return lambda st, x: jax.nn.one_hot(jnp.full(x.shape[:3], label), 2)


@pytest.mark.parametrize(
  'name, keys',
  [
    ('cmedl', VALIDATION_KEYS),
    ('pmri_teacher', VALIDATION_KEYS),  # The test-time network is the teacher: one program.
    ('two_channel', ('val_dsc', 'val_sdsc', 'val_hd95', 'val_cycle_l1')),
    ('student_only', ('val_dsc', 'val_sdsc', 'val_hd95')),
  ],
)
def test_validation_reports_the_networks_the_method_has(tmp_path, name, keys):
  """The validation keys of each method, from its programs (networks replaced by stand-ins:
  the test-time network segments everything, a separate teacher nothing)."""
  config = small_config(tmp_path)
  config.method.name = name
  mesh = sharding.make_mesh()
  programs = train._Programs(config, method.build_networks(config, 1), mesh, None)
  assert (programs.teacher_probabilities is programs.probabilities) == (name == 'pmri_teacher')
  programs.probabilities = _everywhere(1)
  if programs.teacher_probabilities is not None:
    programs.teacher_probabilities = _everywhere(0) if name == 'cmedl' else programs.probabilities
  if programs.cycle_error is not None:
    programs.cycle_error = lambda st, x: jnp.full((x.shape[0], 1), 0.25)
  label = np.zeros((3, 8, 8), np.uint8)
  label[1, 2:6, 2:6] = 1
  volume = {'image': np.zeros((3, 8, 8), np.float32), 'label': label, 'spacing_mm': (1.0,) * 3}
  val = validation.validate(config, None, programs, [volume], mesh)
  assert sorted(val) == sorted(keys)
  assert val['val_dsc'] == pytest.approx(2 * 16 / (16 + 3 * 64))
  if name == 'cmedl':
    assert val['val_teacher_dsc'] == 0.0 and np.isnan(val['val_teacher_hd95'])
  if name == 'pmri_teacher':
    assert all(val[f'val_teacher_{k}'] == val[f'val_{k}'] for k in ('dsc', 'sdsc', 'hd95'))
  if 'val_cycle_l1' in keys:
    assert val['val_cycle_l1'] == pytest.approx(0.25)


def test_resume_with_a_changed_network_is_an_error_before_any_write(tmp_path):
  config = small_config(tmp_path)
  checkpoint.save_config(str(tmp_path), config)
  before = (tmp_path / 'config.json').read_bytes()
  changed = small_config(tmp_path)
  changed.model.student.base_width = 8
  changed.train.log_every = 5  # Cadence may change on resume; not named.
  with pytest.raises(ValueError, match=r'model\.student\.base_width') as e:
    train.train_and_evaluate(changed, str(tmp_path))
  assert str(tmp_path) in str(e.value) and 'log_every' not in str(e.value)
  assert '\n' not in str(e.value)
  assert (tmp_path / 'config.json').read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_resume_may_change_logging_eval_and_checkpoint_cadence(tmp_path):
  config = small_config(tmp_path)
  checkpoint.save_config(str(tmp_path), config)
  config.train.update(
    log_every=5, image_every=7, eval_every=9, checkpoint_every=11, keep_checkpoints=1
  )
  config.eval.batch_size = 4
  config.data.prefetch = 1
  checkpoint.save_config(str(tmp_path), config)
  assert checkpoint.load_config(str(tmp_path)).train.log_every == 5


def test_resume_of_a_run_saved_before_a_config_field_existed_warns(tmp_path, caplog):
  """A field added to configs/default.py later (its default keeps the old behaviour) does not
  make older runs un-resumable; it is named in a warning. A field the run had is still checked."""
  config = small_config(tmp_path)
  checkpoint.save_config(str(tmp_path), config)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['model']['remat']
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  with caplog.at_level('WARNING'):
    checkpoint.check_resume_config(str(tmp_path), config)
  assert 'model.remat' in caplog.text
  config.model.remat = True
  config.optim.lr = 1e-3
  with pytest.raises(ValueError, match=r'changed: optim\.lr;'):
    checkpoint.check_resume_config(str(tmp_path), config)


def test_a_run_saved_before_a_config_field_existed_loads_with_the_behaviour_of_then(tmp_path):
  """load_config (predict, export, inference) fills the fields a saved config lacks with
  checkpoint.LEGACY_DEFAULTS, the behaviour before each existed, not configs/default.py's
  defaults; the fields it has are kept."""
  config = small_config(tmp_path)
  config.method.hint_warmup = 0.5
  checkpoint.save_config(str(tmp_path), config)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['method']['teacher_bn'], stored['model']['remat'], stored['loss']['seg_to_translator']
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  loaded = checkpoint.load_config(str(tmp_path))
  assert config.method.teacher_bn == 'separate'  # Today's default, not the run's behaviour.
  assert loaded.method.teacher_bn == 'joint' == method.switch(loaded, 'teacher_bn')
  assert loaded.model.remat is False and loaded.loss.seg_to_translator == 1.0
  assert loaded.method.hint_warmup == 0.5  # Saved: kept.
  # Each legacy field is one of today's config, and the tables agree on the switches' choices.
  for dotted, value in checkpoint.LEGACY_DEFAULTS.items():
    *sections, field = dotted.split('.')
    node = config
    for section in sections:
      node = node[section]
    assert field in node, dotted
    if sections == ['method'] and field in method.CHOICES:
      assert value in method.CHOICES[field], dotted


@pytest.mark.parametrize(
  'field, value',
  [
    ('optim.lr', 0.0),
    ('optim.lr', -1e-3),
    ('train.num_steps', 0),
    ('train.global_batch_size', 6),
    ('train.log_every', 0),
    ('data.image_size', 0),
    ('eval.batch_size', 0),
    ('data.context_slices', 2),
    ('data.image_size', 11),
    ('method.name', 'cmdel'),
  ],
)
def test_config_errors_name_the_field_before_any_work(tmp_path, field, value):
  config = small_config(tmp_path / 'nothing_here')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=rf'^{field}[ =]') as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_a_target_tfds_dir_that_is_no_tfds_dataset_is_a_config_error(tmp_path):
  config = small_config(tmp_path / 'nothing_here')
  config.data.target.tfds_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r'^data.target.tfds_dir must be a TFDS dataset folder'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_self_distillation_refuses_target_images(tmp_path):
  """self_distill's teacher segments the source itself; target labels or a joint batch norm
  with target images would give it the target modality: a config error."""
  config = small_config(tmp_path / 'nothing_here')
  config.method.name = 'self_distill'
  config.data.target_labels = True
  with pytest.raises(ValueError, match=r'^method.name self_distill: its teacher sees no target'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_paired_teacher_needs_paired_data(tmp_path):
  """paired_teacher's teacher reads the co-registered target slice: without data.paired, or
  with a second pass over the target images (joint batch norm, target labels), it is a config
  error before anything is written."""
  config = small_config(tmp_path / 'nothing_here')
  config.method.name = 'paired_teacher'
  with pytest.raises(ValueError, match=r'^method.name paired_teacher: .* set data.paired=True'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  config.data.paired, config.method.teacher_bn = True, 'joint'  # Would pass t twice.
  with pytest.raises(ValueError, match=r'^method.name paired_teacher: its teacher reads the real'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def _export_tree(value):
  return {'student': {'w': np.full((3,), value, np.float32)}}


def test_a_killed_re_export_keeps_the_previous_export(tmp_path, monkeypatch):
  checkpoint.export_inference(str(tmp_path), _export_tree(1.0), {})
  save = checkpoint.ocp.StandardCheckpointer.save

  def save_then_die(self, path, *args, **kwargs):  # New files written, never put in place.
    save(self, path, *args, **kwargs)
    self.wait_until_finished()
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.export_inference(str(tmp_path), _export_tree(2.0), {})
  monkeypatch.undo()
  exported = checkpoint.load_variables(str(tmp_path / 'export'))
  np.testing.assert_array_equal(exported['params']['student']['w'], 1.0)
  # The next export replaces it whole and leaves no sibling behind.
  checkpoint.export_inference(str(tmp_path), {'teacher': {'b': np.zeros(2, np.float32)}}, {})
  exported = checkpoint.load_variables(str(tmp_path / 'export'))
  assert set(exported['params']) == {'teacher'}
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_a_kill_between_the_export_renames_is_recovered(tmp_path, monkeypatch):
  checkpoint.export_inference(str(tmp_path), _export_tree(1.0), {})
  rename = os.rename

  def die_putting_the_new_one_in_place(src, dst):
    if os.path.basename(dst) == 'export' and not os.path.exists(dst):
      raise KeyboardInterrupt
    rename(src, dst)

  monkeypatch.setattr(os, 'rename', die_putting_the_new_one_in_place)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.export_inference(str(tmp_path), _export_tree(2.0), {})
  monkeypatch.undo()
  assert not os.path.exists(tmp_path / 'export')  # Old moved aside, new not yet in place.
  # Readers (predict) find the previous export; the next training start puts it back.
  found = checkpoint.export_dir(str(tmp_path))
  np.testing.assert_array_equal(checkpoint.load_variables(found)['params']['student']['w'], 1.0)
  checkpoint.clean_export_leftovers(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['export']
  np.testing.assert_array_equal(
    checkpoint.load_variables(str(tmp_path / 'export'))['params']['student']['w'], 1.0
  )


def _write_lock(workdir, pid, host=None):
  workdir.mkdir(exist_ok=True)
  (workdir / 'train.lock').write_text(
    json.dumps({'pid': pid, 'host': host or socket.gethostname()})
  )


def test_a_workdir_held_by_a_running_training_is_an_error(tmp_path):
  holder = subprocess.Popen(['sleep', '60'])
  try:
    _write_lock(tmp_path / 'run', holder.pid)
    with pytest.raises(RuntimeError, match=rf'in use by the training of process {holder.pid} '):
      train.train_and_evaluate(small_config(tmp_path), str(tmp_path / 'run'))
    assert json.loads((tmp_path / 'run' / 'train.lock').read_text())['pid'] == holder.pid
    assert sorted(os.listdir(tmp_path / 'run')) == ['train.lock']  # Nothing else written.
  finally:
    holder.kill()
    holder.wait()


def test_the_lock_of_a_dead_training_is_taken_over_and_released_on_error(tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()
  _write_lock(tmp_path / 'run', dead.pid)
  taken = []
  lock_enter = workdir_lock.WorkdirLock.__enter__

  def enter(self):
    lock_enter(self)
    taken.append(json.loads(open(self.path).read()))
    return self

  with pytest.MonkeyPatch.context() as m:
    m.setattr(workdir_lock.WorkdirLock, '__enter__', enter)
    with pytest.raises(nifti_io.DataError, match='dataset folder does not exist'):
      train.train_and_evaluate(small_config(tmp_path), str(tmp_path / 'run'))  # No data.
  assert taken == [{'pid': os.getpid(), 'host': socket.gethostname()}]
  assert f'of process {dead.pid} on' in caplog.text
  assert not os.path.exists(tmp_path / 'run' / 'train.lock')


def test_a_prepared_dir_without_its_manifest_is_a_clear_error(tmp_path):
  config = small_config(tmp_path)
  os.makedirs(config.data.source.prepared_dir)
  with pytest.raises(
    ValueError,
    match=r'not a complete prepared dataset .*delete it .*'
    r'data\.source\.prepared_dir',
  ) as e:
    prepared_data.prepare_data(config)
  assert 'overwrite' not in str(e.value)


def test_the_trainer_reports_a_config_error_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'cmedl_jax.main',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path / "run"}',
      '--config.train.num_steps=0',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == 'error: train.num_steps must be an int >= 1, got 0'
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_the_trainer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
  """Issue 21 item 10e: a full disk (here orbax's wrapped error) used to print 738 lines."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from cmedl_jax import main as trainer  # pylint: disable=g-import-not-at-top

  def full(config, workdir):
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', f'{workdir}/checkpoints/4')
    except OSError as e:
      raise ValueError('checkpoint save failed') from e

  monkeypatch.setattr(train, 'train_and_evaluate', full)
  flags.FLAGS(['main', f'--config={ROOT}/configs/tiny.py', f'--workdir={tmp_path}'])
  try:
    with pytest.raises(SystemExit) as e:
      trainer.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  message = str(e.value.code)
  assert message.startswith(f'error: no space left on device writing {tmp_path}/checkpoints/4; ')
  assert '\n' not in message


def test_config_check_accepts_the_tiny_config_down_to_its_smallest_size(tmp_path):
  config = small_config(tmp_path)
  train.check_config(config)
  config.data.image_size = 12  # The tiny discriminator's smallest input (3 * 2**2).
  train.check_config(config)


def test_a_killed_training_s_temporaries_are_deleted_at_the_next_start(tmp_path):
  dead = subprocess.Popen(['true'])
  dead.wait()
  run = tmp_path / 'run'
  run.mkdir()
  # Atomic writes' temporaries: .tmp<pid>_<name> (data_prep.files.temporary_path).
  names = {
    f'.tmp{dead.pid}_validation.json': 120,
    f'.write_probe_{dead.pid}': 120,
    f'.write_probe_0_{dead.pid}': 120,  # check_workdir's name: process index, pid.
    f'.tmp{os.getppid()}_config.json': 120,
    f'.tmp{dead.pid}_preparation.json': 0,
    '.tmp_notes.json': 120,
  }
  for name, age in names.items():
    (run / name).write_text('{')
    t = os.path.getmtime(run / name) - age
    os.utime(run / name, (t, t))
  with pytest.raises(nifti_io.DataError, match='dataset folder does not exist'):
    train.train_and_evaluate(small_config(tmp_path), str(run))  # No data.
  assert sorted(os.listdir(run)) == sorted(
    [
      'config.json',
      'environment.json',
      f'.tmp{os.getppid()}_config.json',
      f'.tmp{dead.pid}_preparation.json',
      '.tmp_notes.json',
    ]
  )


def test_the_workdir_lock_is_released_and_another_one_is_left_alone(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / 'train.lock').read_text())['pid'] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'process {os.getpid()} '):
      workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
  assert not os.path.exists(tmp_path / 'train.lock')
  with workdir_lock.WorkdirLock(str(tmp_path)):
    os.remove(tmp_path / 'train.lock')  # Deleted by hand, then taken by another training.
    _write_lock(tmp_path, os.getppid())
  assert json.loads((tmp_path / 'train.lock').read_text())['pid'] == os.getppid()


def test_a_finished_run_draws_its_curves_and_says_how_its_networks_learned(tiny_data, tmp_path):
  """Issue 43: `python -m cmedl_jax.main` ends with WORKDIR/curves.png (+ .md) and one console
  line with the student's and the teacher's validation DSC at the first and last validation."""
  workdir = tmp_path / 'run'
  done = run_main(tiny_data, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (workdir / 'curves.png').stat().st_size > 0
  assert '| val_teacher_dsc |' in (workdir / 'curves.md').read_text()
  history = json.loads((workdir / 'validation.json').read_text())
  first, last = history[0], history[-1]
  assert (
    f'Validation DSC (steps {first["step"]} -> {last["step"]}): '
    f'student {first["val_dsc"]:.2f} -> {last["val_dsc"]:.2f}, '
    f'teacher on pseudo-target {first["val_teacher_dsc"]:.2f} -> {last["val_teacher_dsc"]:.2f}; '
    f'curves: {workdir}/curves.png.'
  ) in done.stderr


def test_paired_teacher_is_validated_on_the_co_registered_target_volumes():
  """validate() runs the teacher of a paired method on each volume's 'paired' target volume and
  the test-time student on the source volume itself."""
  config = configs_tiny.get_config('unet')
  config.method.name = 'paired_teacher'
  config.data.paired = True
  rng = np.random.default_rng(0)
  label = np.zeros((4, 32, 32), np.uint8)
  label[1:3, 8:20, 10:22] = 1
  source = {'case_id': 'a', 'image': rng.uniform(-1, 1, label.shape).astype(np.float32)}
  target = {'case_id': 'a', 'image': np.where(label > 0, 1.0, -1.0).astype(np.float32)}
  volume = dict(source, label=label, spacing_mm=(2.0, 1.0, 1.0), paired=dict(target, label=label))
  volume['paired']['spacing_mm'] = volume['spacing_mm']

  def bright_is_foreground(state, slices):  # Right on the target volume only.
    del state
    fg = (slices[..., 0] > 0.5).astype(jnp.float32)
    return jnp.stack([1 - fg, fg], -1)

  def background(state, slices):
    del state
    return jnp.stack([jnp.ones(slices.shape[:3]), jnp.zeros(slices.shape[:3])], -1)

  programs = collections.namedtuple('P', 'probabilities teacher_probabilities cycle_error')(
    background, bright_is_foreground, None
  )
  val = validation.validate(config, None, programs, [volume], sharding.make_mesh(jax.devices()[:1]))
  assert val['val_teacher_dsc'] == 1.0 and val['val_teacher_hd95'] == 0.0
  assert val['val_dsc'] == 0.0
  without_pair = {k: v for k, v in volume.items() if k != 'paired'}
  assert (
    validation.validate(
      config, None, programs, [without_pair], sharding.make_mesh(jax.devices()[:1])
    )['val_teacher_dsc']
    < 0.5
  )
