"""Prediction on NIfTI volumes with a trained run: the networks' outputs on the input's grid
(labels, probabilities, pseudo-target, teacher), from the export or any checkpoint, CLI
behaviour."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from cmedl_jax import checkpoint
from cmedl_jax import inference
from cmedl_jax import method
from cmedl_jax import portable
from cmedl_jax import postprocess
from cmedl_jax import predict
from configs import tiny
from data_prep import nifti_io
from data_prep import prepare
from test_portable import assert_valid_onnx
from test_portable import onnxruntime_alone
from test_train import truncate_every_file


@pytest.fixture(scope='module')
def run_dir(tiny_run):
  """The session's tiny CMEDL run (tests/conftest.py): (data root, workdir)."""
  return tiny_run


def ct_test_case(root):
  return sorted((root / 'raw' / 'thorax_ct' / 'imagesTs').glob('*.nii.gz'))[0]


def lps_odd_input(root, out_dir):
  """A phantom CT stored LPS with an odd in-plane shape and anisotropic spacing."""
  src = nib.load(ct_test_case(root))
  data = np.asarray(src.dataobj)[3:44, 5:42, :]  # 41 x 37 voxels, 8 mm, 3 mm slices.
  affine = src.affine.copy()
  affine[:3, 3] += affine[:3, :3] @ np.array([3, 5, 0])
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
  img = nib.Nifti1Image(data[::-1, ::-1].copy(), affine @ flip)  # Same anatomy, axes LPS.
  img.header.set_xyzt_units('mm')
  out = out_dir / 'lps_odd_0000.nii.gz'
  nib.save(img, out)
  return out


def direct(predictor, image, affine, tree, name='student'):
  """Probabilities and pseudo-target of `image` computed here from the checkpoint's networks:
  prepare, apply, map back onto the input grid (as predict documents it)."""
  nets = method.build_networks(predictor.config, in_channels=1)
  prepared, geometry = prepare.prepare_volume(image, affine, predictor.spec, whole_fov=True)
  x = prepared[..., None]  # [Z, H, W, 1]
  p, stats = tree['params'], tree['batch_stats']
  fake = nets.translator.apply({'params': p['translator']}, x)
  inputs = fake if name == 'teacher' else x
  logits = getattr(nets, name).apply(
    {'params': p[name], 'batch_stats': stats[name]}, inputs, train=False
  )[0]
  probs = np.asarray(jax.nn.softmax(logits, -1))  # [Z, H, W, K]
  probs = np.stack(
    [
      prepare.invert_image(probs[..., k], geometry, fill_value=float(k == 0))
      for k in range(probs.shape[-1])
    ],
    -1,
  )
  fake = prepare.invert_image(np.asarray(fake[..., 0]), geometry, fill_value=-1.0)
  return probs, fake


def test_prediction_overlays_an_lps_anisotropic_oddly_sized_input(run_dir, tmp_path):
  root, workdir = run_dir
  source = lps_odd_input(root, tmp_path)
  predictor = inference.Predictor(workdir=str(workdir), pseudo_target=True)
  out_dir = tmp_path / 'out'
  result = predict.predict_files(
    predictor, [str(source)], str(out_dir), probabilities=True, pseudo_target=True, progress=False
  )
  assert result['written'] == [str(out_dir / 'lps_odd.nii.gz')] and not result['failed']
  ref, out = nib.load(source), nib.load(out_dir / 'lps_odd.nii.gz')
  assert out.shape == ref.shape == (41, 37, 6)
  np.testing.assert_array_equal(out.affine, ref.affine)
  assert nib.aff2axcodes(out.affine) == ('L', 'P', 'S')
  assert out.get_data_dtype() == np.uint8
  labels = np.asarray(out.dataobj)
  probs = nib.load(out_dir / 'lps_odd_probabilities.nii.gz')
  assert probs.shape == (41, 37, 6, 2)
  p = np.asarray(probs.dataobj)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(p.argmax(-1), labels)  # Labels are the probabilities' argmax.
  fake = nib.load(out_dir / 'lps_odd_pseudo_target.nii.gz')
  assert fake.shape == ref.shape
  np.testing.assert_array_equal(fake.affine, ref.affine)

  # Both equal the networks applied directly (the final checkpoint holds the exported student).
  tree = checkpoint.restore_tree(str(workdir / 'checkpoints' / '8'))
  want_p, want_fake = direct(predictor, np.asarray(ref.dataobj, np.float32), ref.affine, tree)
  np.testing.assert_allclose(p, want_p, atol=2e-5)
  np.testing.assert_allclose(np.asarray(fake.dataobj), want_fake, atol=2e-5)
  assert np.ptp(want_fake) > 0.1  # A real image, not a constant.

  # The same volume stored RAS gives the same probabilities, flipped back.
  ras = nib.as_closest_canonical(ref)
  ras_pred = predictor.predict_array(np.asarray(ras.dataobj, np.float32), ras.affine)
  np.testing.assert_allclose(ras_pred['probabilities'][::-1, ::-1], p, atol=1e-6)
  np.testing.assert_array_equal(ras_pred['labels'][::-1, ::-1], labels)


def test_teacher_prediction_is_the_teacher_on_the_translation(run_dir):
  """Predictor(teacher=True) segments with the run's teacher on G(x) (latest checkpoint),
  computed here directly from the checkpoint's networks."""
  root, workdir = run_dir
  src = nib.load(ct_test_case(root))
  image = np.asarray(src.dataobj, np.float32)
  by_teacher = inference.Predictor(workdir=str(workdir), teacher=True)
  got = by_teacher.predict_array(image, src.affine)['probabilities']
  student = inference.Predictor(workdir=str(workdir)).predict_array(image, src.affine)
  assert not np.allclose(got, student['probabilities'], atol=1e-4)
  tree = checkpoint.restore_tree(str(workdir / 'checkpoints' / '8'))
  want, _ = direct(by_teacher, image, src.affine, tree, name='teacher')
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_cli_predicts_from_the_export_any_checkpoint_and_the_teacher(run_dir, tmp_path):
  """--workdir (export), --checkpoint of the final step (the same student), --checkpoint of
  the best step (that state's student) and --teacher, each through the command line."""
  root, workdir = run_dir
  good = ct_test_case(root)
  best = sorted(os.listdir(workdir / 'best'))[0]
  runs = {
    'export': ['--workdir', str(workdir)],
    'final': ['--checkpoint', str(workdir / 'checkpoints' / '8')],
    'best': ['--checkpoint', str(workdir / 'best' / best)],
    'teacher': ['--workdir', str(workdir), '--teacher'],
  }
  probs = {}
  for name, args in runs.items():
    out = tmp_path / name
    assert (
      predict.main(args + ['--input', str(good), '--output', str(out), '--probabilities']) == 0
    ), name
    case = good.name.replace('_0000', '')
    assert sorted(os.listdir(out)) == sorted(
      [case, case.replace('.nii.gz', '_probabilities.nii.gz')]
    )
    probs[name] = np.asarray(
      nib.load(out / case.replace('.nii.gz', '_probabilities.nii.gz')).dataobj
    )
  np.testing.assert_array_equal(probs['final'], probs['export'])
  src = nib.load(good)
  image = np.asarray(src.dataobj, np.float32)
  for name, kwargs in (
    ('best', dict(checkpoint_path=str(workdir / 'best' / best))),
    ('teacher', dict(workdir=str(workdir), teacher=True)),
  ):
    want = inference.Predictor(**kwargs).predict_array(image, src.affine)['probabilities']
    np.testing.assert_allclose(probs[name], want, atol=1e-6, err_msg=name)
  assert not np.allclose(probs['teacher'], probs['export'], atol=1e-4)


# Runs the portable network where this package cannot be imported: jax and numpy alone.
_WITHOUT_THE_PACKAGE = """
import sys
sys.modules['cmedl_jax'] = sys.modules['data_prep'] = None  # Any import of them fails.
import numpy as np
from jax import export
network = export.deserialize(open(sys.argv[1], 'rb').read())
np.save(sys.argv[3], np.asarray(network.call(np.load(sys.argv[2]))))
"""


def test_the_portable_network_runs_without_the_package_as_the_predictor(run_dir, tmp_path):
  """Issue 19: training writes RUN/portable (jax.export, and ONNX); a process that cannot
  import cmedl_jax reproduces the Predictor's probabilities on a phantom volume with each."""
  root, workdir = run_dir
  meta = json.loads((workdir / 'portable' / portable.PREPARATION).read_text())
  predictor = inference.Predictor(workdir=workdir)
  assert meta['spec'] == predictor.spec.to_dict()
  assert meta['input']['shape'] == ['b', '32*h', '32*w', '1']  # Any multiple of 32 pixels.
  image, affine = nifti_io.load_volume(ct_test_case(root), 'image')
  image = np.concatenate([image, image], 0)  # Two bodies side by side: 64 x 32 pixels.
  prepared, _ = prepare.prepare_volume(image, affine, predictor.spec, whole_fov=True)
  assert prepared.shape[1:] == (32, 64)
  want = predictor.predict_prepared(prepared)
  slices = inference.context_stack(prepared, meta['input']['context_slices'])
  np.save(tmp_path / 'slices.npy', slices)
  subprocess.run(
    [
      sys.executable,
      '-c',
      _WITHOUT_THE_PACKAGE,
      str(workdir / 'portable' / portable.NETWORK),
      str(tmp_path / 'slices.npy'),
      str(tmp_path / 'probabilities.npy'),
    ],
    cwd=tmp_path,
    env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
    check=True,
    timeout=300,
  )
  got = np.load(tmp_path / 'probabilities.npy')
  assert got.shape == want.shape == (*slices.shape[:3], meta['output']['shape'][-1])
  np.testing.assert_allclose(got, want, atol=1e-5)

  # The ONNX copy, with onnxruntime alone, on slices of the training size (32 x 32): valid ONNX
  # (checker, strict shape inference), loaded without warnings (issue 44).
  assert meta['onnx']['file'] == portable.ONNX and meta['onnx']['input_shape'] == ['B', 32, 32, 1]
  assert meta['onnx']['checker_full_check'] == meta['onnx']['strict_shape_inference'] == 'passed'
  assert_valid_onnx(workdir / 'portable' / portable.ONNX)
  prepared, _ = prepare.prepare_volume(image[: image.shape[0] // 2], affine, predictor.spec)
  want = predictor.predict_prepared(prepared)
  slices = inference.context_stack(prepared, 1)
  got, logged = onnxruntime_alone(workdir / 'portable' / portable.ONNX, slices, tmp_path)
  assert not logged  # E.g. '[W:onnxruntime:, graph.cc:128 MergeShapeInfo] Error merging ...'
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_prediction_covers_the_whole_field_of_view(run_dir):
  """An input twice as wide as the training crop (two bodies side by side): the Predictor
  segments all of it (the networks applied to the whole prepared field of view), where the
  training crop alone would leave the second body as certain background."""
  root, workdir = run_dir
  src = nib.load(ct_test_case(root))
  image = np.concatenate([np.asarray(src.dataobj, np.float32)] * 2, 0)  # [2X, Y, Z]
  predictor = inference.Predictor(workdir=workdir, postprocessing=False)
  got = predictor.predict_array(image, src.affine)['probabilities']
  tree = checkpoint.restore_tree(str(workdir / 'checkpoints' / '8'))
  np.testing.assert_allclose(got, direct(predictor, image, src.affine, tree)[0], atol=2e-5)
  cropped = inference.Predictor(workdir=workdir, postprocessing=False, whole_fov=False)
  cut = cropped.predict_array(image, src.affine)['probabilities']
  certain = np.all(cut[..., 0] == 1.0, axis=(1, 2))  # [2X]: columns left as background
  assert certain.sum() >= image.shape[0] // 4  # The crop cut a body's worth of columns ...
  assert np.ptp(got[certain, ..., 1]) > 1e-3  # ... which the whole field of view segments.


def test_the_portable_command_exports_any_checkpoint(run_dir, tmp_path):
  _, workdir = run_dir
  step = checkpoint.latest_checkpoint(workdir)
  assert portable.main(['--checkpoint', step, '--out', str(tmp_path / 'p')]) == 0
  written = sorted(os.listdir(tmp_path / 'p'))
  assert written == sorted([portable.NETWORK, portable.ONNX, portable.PREPARATION])


def test_predict_applies_the_post_processing_chosen_on_validation(run_dir, tmp_path):
  """Training stores its choice (postprocessing.json); the Predictor applies a stored choice,
  and leaves it out when asked."""
  root, workdir = run_dir
  stored = json.loads((workdir / postprocess.FILE).read_text())
  assert set(stored['min_volume_mm3']) == {'1'} and stored['volumes'] >= 1
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  postprocess.save(run, dict(stored, min_volume_mm3={'1': 1e12}))  # Removes every component.
  image, affine = nifti_io.load_volume(ct_test_case(root), 'image')
  raw = inference.Predictor(workdir=run, postprocessing=False).predict_array(image, affine)
  assert (raw['labels'] == 1).any()  # Something to remove.
  cleaned = inference.Predictor(workdir=run).predict_array(image, affine)
  assert not cleaned['labels'].any()
  np.testing.assert_array_equal(cleaned['probabilities'], raw['probabilities'])


def test_test_time_augmentation_averages_the_mirrorings_training_used(run_dir):
  root, workdir = run_dir
  plain = inference.Predictor(workdir=workdir)
  tta = inference.Predictor(workdir=workdir, tta=True)
  assert tta.mirror_axes == (2,)  # Training flipped left-right only (the default augment).
  image, affine = nifti_io.load_volume(ct_test_case(root), 'image')
  prepared, _ = prepare.prepare_volume(image, affine, plain.spec)
  mirrored = plain.predict_prepared(np.ascontiguousarray(prepared[:, :, ::-1]))[:, :, ::-1]
  want = (plain.predict_prepared(prepared) + mirrored) / 2
  np.testing.assert_allclose(tta.predict_prepared(prepared), want, atol=1e-6)


def test_mirror_axes_follow_the_training_augmentation():
  config = tiny.get_config('unet,cyclegan')
  config.data.augment.flip_ud = True
  assert inference.mirror_axes(config) == (2, 1)
  config.data.augment.flip = False
  config.data.augment.flip_ud = False
  assert inference.mirror_axes(config) == ()
  x = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
  scale = np.arange(1, 5, dtype=np.float32)[None, None, :, None]  # Not mirror-symmetric.
  got = inference.mirrored_mean(lambda y: y * scale, x, (2, 1))
  flips = [(), (2,), (1,), (2, 1)]
  want = sum(np.flip(np.flip(x, f) * scale, f) if f else x * scale for f in flips) / 4
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cli_keeps_outputs_reports_bad_inputs_and_goes_on(run_dir, tmp_path, capsys):
  root, workdir = run_dir
  inputs = tmp_path / 'in'
  inputs.mkdir()
  good = ct_test_case(root)
  (inputs / good.name).write_bytes(good.read_bytes())
  (inputs / 'broken_0000.nii.gz').write_bytes(b'not a nifti file')
  out = tmp_path / 'out'
  args = ['--workdir', str(workdir), '--input', str(inputs), '--output', str(out)]
  assert predict.main(args) == 1
  text = capsys.readouterr().out
  assert '1 written' in text and '1 failed' in text and 'broken_0000.nii.gz' in text
  written = out / good.name.replace('_0000', '')
  assert written.is_file()
  assert sorted(os.listdir(out)) == [written.name]  # No partial or temporary files.

  written.write_bytes(b'kept')
  assert predict.main(args) == 1
  assert written.read_bytes() == b'kept'  # Kept without --overwrite.
  assert predict.main(args + ['--overwrite']) == 1
  assert nib.load(written).shape == nib.load(good).shape


def test_cli_on_a_full_disk_is_a_one_line_error(run_dir, tmp_path, monkeypatch, capsys):
  """Issue 21 item 10e: a full disk used to print hundreds of lines of tracebacks."""
  root, workdir = run_dir

  def full(array, reference, path, dtype):
    raise OSError(errno.ENOSPC, 'No space left on device', path)

  monkeypatch.setattr(predict.nifti_io, 'save_nifti_like', full)
  args = ['--workdir', str(workdir), '--input', str(ct_test_case(root)), '--output']
  with pytest.raises(SystemExit) as e:
    predict.main(args + [str(tmp_path / 'out')])
  assert e.value.code == 1
  err = capsys.readouterr().err  # After the progress bar.
  assert err.splitlines()[-1].startswith('predict: error: no space left on device writing ')
  assert 'Traceback' not in err
  assert not os.listdir(tmp_path / 'out')


def test_cli_without_a_run_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(
      ['--workdir', str(tmp_path), '--input', str(tmp_path), '--output', str(tmp_path / 'o')]
    )
  assert e.value.code == 2
  assert 'predict: error:' in capsys.readouterr().err


def test_a_killed_prediction_s_temporaries_are_deleted_at_the_next_start(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top

  dead = subprocess.Popen(['true'])
  dead.wait()
  names = {
    f'.tmp{dead.pid}_case.nii.gz': 120,
    f'.tmp{dead.pid}_b_probabilities.nii.gz': 120,
    f'.tmp{os.getppid()}_c.nii.gz': 120,
    f'.tmp{dead.pid}_d.nii.gz': 0,
    '.tmpnotours.nii.gz': 120,
    f'.tmp{dead.pid}_e.txt': 120,
  }
  for name, age in names.items():
    (tmp_path / name).write_bytes(b'x')
    t = os.path.getmtime(tmp_path / name) - age
    os.utime(tmp_path / name, (t, t))
  result = predict.predict_files(None, [], str(tmp_path), progress=False)
  assert result == {'written': [], 'skipped': [], 'failed': [], 'warned': []}
  assert sorted(os.listdir(tmp_path)) == sorted(
    [
      f'.tmp{os.getppid()}_c.nii.gz',
      f'.tmp{dead.pid}_d.nii.gz',
      '.tmpnotours.nii.gz',
      f'.tmp{dead.pid}_e.txt',
    ]
  )


def test_cli_output_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / 'out.nii.gz').write_bytes(b'a file')
  with pytest.raises(SystemExit) as e:
    predict.main(
      [
        '--workdir',
        str(tmp_path),
        '--input',
        str(tmp_path),
        '--output',
        str(tmp_path / 'out.nii.gz'),
      ]
    )
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('predict: error: --output ') and 'not a folder' in err
  assert err.count('\n') == 1


def test_two_inputs_of_one_case_are_an_error_naming_both(tmp_path, capsys):
  for name in ('case_0000.nii.gz', 'case.nii', 'other.nii.gz'):
    (tmp_path / name).write_bytes(b'x')
  with pytest.raises(SystemExit) as e:
    predict.main(
      ['--workdir', str(tmp_path), '--input', str(tmp_path), '--output', str(tmp_path / 'out')]
    )
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert str(tmp_path / 'case_0000.nii.gz') in err and str(tmp_path / 'case.nii') in err
  with pytest.raises(ValueError, match="both case 'case'"):
    predict.predict_files(
      None,
      [str(tmp_path / 'case.nii'), str(tmp_path / 'case_0000.nii.gz')],
      str(tmp_path / 'out'),
      progress=False,
    )
  assert not os.path.exists(tmp_path / 'out')


def test_an_mri_given_to_a_ct_model_is_named_in_a_warning(run_dir, tmp_path, capsys):
  """Issue 21 item 4: an MRI predicted by a CT model gave all background without a word."""
  root, workdir = run_dir
  mri = sorted((root / 'raw' / 'thorax_t2w' / 'imagesTs').glob('*.nii.gz'))[0]
  predictor = inference.Predictor(workdir=str(workdir))
  result = predict.predict_files(
    predictor, [str(mri), str(ct_test_case(root))], str(tmp_path), progress=False
  )
  assert [p for p, _ in result['warned']] == [str(mri)]  # The CT case raises no doubt.
  assert len(result['written']) == 2
  err = capsys.readouterr().err
  assert f'warning: {mri}: ' in err and 'is this CT?' in err


def _damaged_copy(workdir, tmp_path, how):
  """A copy of the run whose step 8 is damaged `how`; returns the step's path."""
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  step = run / 'checkpoints' / '8'
  if how == 'truncated':
    truncate_every_file(step)
  else:  # The tree's metadata overwritten with other (valid) JSON.
    (step / 'default' / '_METADATA').write_text('{}')
  return step


@pytest.mark.parametrize('how', ['truncated', 'overwritten'])
def test_cli_on_a_damaged_checkpoint_is_a_one_line_error_naming_it(run_dir, tmp_path, capsys, how):
  """Issue 21 item 7: --checkpoint of a damaged step gave a 142-line traceback."""
  root, workdir = run_dir
  step = _damaged_copy(workdir, tmp_path, how)
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    predict.main(
      ['--checkpoint', str(step), '--input', str(ct_test_case(root)), '--output', str(out)]
    )
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f'predict: error: {step}: does not restore (') and err.count('\n') == 1
  assert not os.path.exists(out)


def test_load_variables_reads_the_networks_only(run_dir, tmp_path):
  """checkpoint.load_variables (predict --checkpoint) restores params and batch_stats, equal to
  those of the whole state, and not the optimiser state: a step whose optimiser state is
  damaged still gives its networks."""
  _, workdir = run_dir
  step = workdir / 'checkpoints' / '8'
  full = checkpoint.restore_tree(str(step))
  got = checkpoint.load_variables(str(step))
  assert set(got) == {'params', 'batch_stats'}
  for name in got:
    leaves, tree = jax.tree.flatten(got[name])
    want_leaves, want_tree = jax.tree.flatten(full[name])
    assert tree == want_tree, name
    for a, b in zip(leaves, want_leaves):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype

  # A state whose optimiser state is large: orbax writes its 8 MB into a data file of its own
  # (the largest; the networks' 300 bytes are elsewhere). That file truncated, the whole state
  # no longer restores (the code before gave an error here); its networks do.
  rng = np.random.default_rng(0)
  state = {
    'step': np.array(1, np.int32),
    'params': {'student': {'w': rng.random((64,), np.float32)}},
    'batch_stats': {'student': {'mean': rng.random((8,), np.float32)}},
    'opt_state': {'mu': rng.random((2_000_000,), np.float32)},
  }
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1)
  ckpts.save(1, state)
  ckpts.wait()
  ckpts.close()
  files = [os.path.join(r, n) for r, _, ns in os.walk(tmp_path / 'checkpoints' / '1') for n in ns]
  largest = max(files, key=os.path.getsize)
  assert os.path.getsize(largest) > 4e6
  os.truncate(largest, os.path.getsize(largest) // 2)
  got = checkpoint.load_variables(str(tmp_path / 'checkpoints' / '1'))
  np.testing.assert_array_equal(got['params']['student']['w'], state['params']['student']['w'])
  np.testing.assert_array_equal(
    got['batch_stats']['student']['mean'], state['batch_stats']['student']['mean']
  )
