"""Prediction on NIfTI volumes with a trained run: output on the input's grid, CLI behaviour."""

import os

import nibabel as nib
import numpy as np
import pytest

from cmedl_jax import predict
from cmedl_jax import train
from test_train import small_config
from test_train import write_phantoms


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny CMEDL run trained for 2 steps (with its inference export)."""
  root = tmp_path_factory.mktemp('predict')
  write_phantoms(root, n=3, seed=1, slices=4)
  workdir = root / 'run'
  config = small_config(root, num_steps=2, eval_every=2, checkpoint_every=2)
  config.data.val_fraction = 0.34
  train.train_and_evaluate(config, str(workdir))
  return root, workdir


def lps_odd_input(root):
  """A phantom CT stored LPS with an odd in-plane shape and anisotropic spacing."""
  path = root / 'raw' / 'thorax_ct' / 'imagesTs'
  src = nib.load(sorted(path.glob('*.nii.gz'))[0])
  data = np.asarray(src.dataobj)[3:44, 5:42, :]  # 41 x 37 voxels, 8 mm, 3 mm slices.
  affine = src.affine.copy()
  affine[:3, 3] += affine[:3, :3] @ np.array([3, 5, 0])
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
  img = nib.Nifti1Image(data[::-1, ::-1].copy(), affine @ flip)  # Same anatomy, axes LPS.
  img.header.set_xyzt_units('mm')
  out = root / 'lps_odd_0000.nii.gz'
  nib.save(img, out)
  return out


def test_prediction_overlays_an_lps_anisotropic_oddly_sized_input(run_dir, tmp_path):
  root, workdir = run_dir
  source = lps_odd_input(root)
  predictor = predict.Predictor(workdir=str(workdir), pseudo_target=True)
  result = predict.predict_files(predictor, [str(source)], str(tmp_path), probabilities=True,
                                 pseudo_target=True, progress=False)
  assert result['written'] == [str(tmp_path / 'lps_odd.nii.gz')] and not result['failed']
  ref, out = nib.load(source), nib.load(tmp_path / 'lps_odd.nii.gz')
  assert out.shape == ref.shape == (41, 37, 4)
  np.testing.assert_array_equal(out.affine, ref.affine)
  assert nib.aff2axcodes(out.affine) == ('L', 'P', 'S')
  assert out.get_data_dtype() == np.uint8
  labels = np.asarray(out.dataobj)
  assert set(np.unique(labels)) <= {0, 1}
  probs = nib.load(tmp_path / 'lps_odd_probabilities.nii.gz')
  assert probs.shape == (41, 37, 4, 2)
  p = np.asarray(probs.dataobj)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(p.argmax(-1), labels)  # Labels are the probabilities' argmax.
  fake = nib.load(tmp_path / 'lps_odd_pseudo_target.nii.gz')
  assert fake.shape == ref.shape
  np.testing.assert_array_equal(fake.affine, ref.affine)

  # The same volume stored RAS gives the same labels, flipped back.
  ras = nib.as_closest_canonical(ref)
  ras_pred = predictor.predict_array(np.asarray(ras.dataobj, np.float32), ras.affine)['labels']
  np.testing.assert_array_equal(ras_pred[::-1, ::-1], labels)


def test_teacher_prediction_is_the_teacher_on_the_translation(run_dir):
  """Predictor(teacher=True) segments with the run's teacher on G(x) (latest checkpoint),
  computed here directly from the checkpoint's networks."""
  import jax  # pylint: disable=g-import-not-at-top
  from cmedl_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  root, workdir = run_dir
  src = nib.load(sorted((root / 'raw' / 'thorax_ct' / 'imagesTs').glob('*.nii.gz'))[0])
  image = np.asarray(src.dataobj, np.float32)
  by_teacher = predict.Predictor(workdir=str(workdir), teacher=True)
  got = by_teacher.predict_array(image, src.affine)['probabilities']
  student = predict.Predictor(workdir=str(workdir)).predict_array(image, src.affine)
  assert not np.allclose(got, student['probabilities'], atol=1e-4)

  tree = predict._restore_tree(str(workdir / 'checkpoints' / '2'))  # pylint: disable=protected-access
  nets = ts.build_networks(by_teacher.config, in_channels=1)
  prepared, geometry = prepare.prepare_volume(image, src.affine, by_teacher.spec)
  x = prepared[..., None]  # [Z, H, W, 1]
  fake = nets.translator.apply({'params': tree['params']['translator']}, x)
  logits = nets.teacher.apply({'params': tree['params']['teacher'],
                               'batch_stats': tree['batch_stats']['teacher']}, fake,
                              train=False)[0]
  probs = np.asarray(jax.nn.softmax(logits, -1))  # [Z, H, W, K]
  want = np.stack([prepare.invert_image(probs[..., k], geometry, fill_value=float(k == 0))
                   for k in range(probs.shape[-1])], -1)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_cli_keeps_outputs_reports_bad_inputs_and_goes_on(run_dir, tmp_path, capsys):
  root, workdir = run_dir
  inputs = tmp_path / 'in'
  inputs.mkdir()
  good = sorted((root / 'raw' / 'thorax_ct' / 'imagesTs').glob('*.nii.gz'))[0]
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


def test_cli_without_a_run_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['--workdir', str(tmp_path), '--input', str(tmp_path), '--output',
                  str(tmp_path / 'o')])
  assert e.value.code == 2
  assert 'predict: error:' in capsys.readouterr().err
