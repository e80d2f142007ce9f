"""Tests for data_prep.prepare: geometry round trips, orientation invariance, bad input."""

import errno
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from cmedl_jax import prepared_data
from data_prep import geometry as geo
from data_prep import prepare as P
from tests.fixtures import synthetic as S
from data_prep import files
from data_prep.nifti_io import DataError


def oblique(affine, degrees=7.0):
  """Rotates the affine's axes about z by a few degrees (still closest to the same axes)."""
  t = np.deg2rad(degrees)
  rot = np.eye(4)
  rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
  return rot @ affine


def small_spec(**kw):
  base = dict(modality='ct', spacing_mm=(1.0, 1.0), size=(32, 32))
  base.update(kw)
  return P.PrepSpec(**base)


def toy_dataset(root, n_train=4, n_test=2, layout='nnunet', lps=False, **kw):
  cases = {}
  for k in range(n_train + n_test):
    image, label, affine = S.toy_case(seed=k)
    if lps:
      image, _ = S.to_lps(image, affine)
      label, affine = S.to_lps(label, affine)
    cases[f'case_{k:03d}'] = (image, label, affine)
  ids = sorted(cases)
  return S.write_dataset(
    str(root),
    {c: cases[c] for c in ids[:n_train]},
    {c: cases[c] for c in ids[n_train:]},
    layout=layout,
    **kw,
  )


# ----------------------------------------------------------------------------- geometry


def test_round_trip_lps_anisotropic_oblique_is_exact(tmp_path):
  image, label, affine = S.toy_case(shape=(24, 20, 6), spacing=(0.9, 1.3, 4.0), seed=3)
  image, _ = S.to_lps(image, affine)
  label, affine = S.to_lps(label, affine)
  affine = oblique(affine)
  assert nib.aff2axcodes(affine) == ('L', 'P', 'S')
  # Through files, so the geometry also survives NIfTI and JSON.
  raw = S.write_dataset(str(tmp_path / 'raw'), {'c0': (image, label, affine)})
  spec = small_spec(spacing_mm=(0.75, 0.75), size=(48, 48))
  P.prepare_dataset(raw, tmp_path / 'prep', spec, val_fraction=0.0, progress=False)
  manifest = P.read_manifest(tmp_path / 'prep')
  (record,) = manifest['splits']['train']
  prepared_labels = np.load(tmp_path / 'prep' / 'train' / 'labels.npy')
  geometry = P.Geometry.from_dict(json.loads(json.dumps(record['geometry'])))
  back = P.invert_labels(prepared_labels, geometry)
  on_disk = nib.load(os.path.join(raw, 'labelsTr', 'c0.nii.gz'))
  np.testing.assert_array_equal(back, np.asarray(on_disk.dataobj))
  np.testing.assert_array_equal(np.array(geometry.original_affine), on_disk.affine)
  assert back.shape == label.shape and label.sum() > 0


def test_ras_and_lps_prepare_to_same_arrays():
  image, label, affine = S.toy_case(shape=(24, 20, 6), spacing=(1.1, 0.8, 3.0), seed=1)
  lps_image, lps_affine = S.to_lps(image, affine)
  lps_label, _ = S.to_lps(label, affine)
  spec = small_spec(interpolation='cubic')
  a, ga = P.prepare_volume(image, affine, spec)
  b, gb = P.prepare_volume(lps_image, lps_affine, spec)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(P.prepare_label(label, ga), P.prepare_label(lps_label, gb))
  np.testing.assert_allclose(np.array(ga.affine), np.array(gb.affine), atol=1e-9)
  assert P.prepare_label(label, ga).sum() > 0


def test_ras_and_lps_datasets_prepare_identically(tmp_path):
  spec = small_spec()
  for name, lps in (('ras', False), ('lps', True)):
    toy_dataset(tmp_path / f'raw_{name}', n_train=2, n_test=0, lps=lps)
    P.prepare_dataset(
      tmp_path / f'raw_{name}', tmp_path / name, spec, val_fraction=0.0, progress=False
    )
  for f in ('images.npy', 'labels.npy', 'has_foreground.npy'):
    np.testing.assert_array_equal(
      np.load(tmp_path / 'ras' / 'train' / f), np.load(tmp_path / 'lps' / 'train' / f)
    )


def test_prepared_affine_points_at_the_source_voxels():
  """World position of each prepared voxel (geometry.affine) lies in an original voxel with the
  same label (independent of how the resampler is written)."""
  image, label, affine = S.toy_case(shape=(24, 20, 6), spacing=(0.9, 1.3, 4.0), seed=2)
  image, _ = S.to_lps(image, affine)
  label, affine = S.to_lps(label, affine)
  affine = oblique(affine, 5.0)
  spec = small_spec(spacing_mm=(0.7, 0.6), size=(40, 40))
  _, g = P.prepare_volume(image, affine, spec)
  prepared = P.prepare_label(label, g)
  zhw = np.stack(np.meshgrid(*[np.arange(n) for n in prepared.shape], indexing='ij'), -1)
  world = zhw.reshape(-1, 3) @ np.array(g.affine)[:3, :3].T + np.array(g.affine)[:3, 3]
  ijk = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  idx = np.rint(ijk).astype(int)
  inside = np.all((idx >= 0) & (idx < np.array(label.shape)), axis=1)
  assert inside.mean() > 0.3
  expected = label[tuple(idx[inside].T)]
  got = prepared.reshape(-1)[inside]
  # The prepared grid is finer than the original, so voxel centres coincide up to half a voxel;
  # ties at exact boundaries are excluded by checking distances to the nearest centre.
  frac = np.abs(ijk[inside] - idx[inside]).max(axis=1)
  clear = frac < 0.45
  np.testing.assert_array_equal(got[clear], expected[clear])
  assert (prepared.reshape(-1)[~inside] == 0).all()


def test_linear_resampling_of_a_ramp_matches_world_coordinates():
  shape, spacing = (30, 24, 3), (1.7, 1.2, 5.0)
  affine = np.diag(list(spacing) + [1.0])
  affine[:3, 3] = (-20.0, -15.0, 0.0)
  ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  world = ijk @ affine[:3, :3].T + affine[:3, 3]
  ramp = (10.0 * world[..., 0] - 5.0 * world[..., 1]).astype(np.float32)  # HU, inside window
  lps, lps_affine = S.to_lps(ramp, affine)
  spec = small_spec(spacing_mm=(1.0, 1.0), size=(32, 48), ct_window_hu=(-1000.0, 1000.0))
  prepared, g = P.prepare_volume(lps, lps_affine, spec)
  zhw = np.stack(np.meshgrid(*[np.arange(n) for n in prepared.shape], indexing='ij'), -1)
  w = zhw @ np.array(g.affine)[:3, :3].T + np.array(g.affine)[:3, 3]
  expected = (10.0 * w[..., 0] - 5.0 * w[..., 1] + 1000.0) / 2000.0 * 2.0 - 1.0
  # Interior points only (edges are extended, not extrapolated).
  i = (w - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
  interior = np.all((i >= 0) & (i <= np.array(shape) - 1), axis=-1)
  assert interior.mean() > 0.4
  np.testing.assert_allclose(prepared[interior], expected[interior], atol=2e-5)
  assert (prepared[~interior] >= -1.0).all()


def test_invert_image_returns_original_intensities_for_identity_spacing():
  image, label, affine = S.toy_case(shape=(24, 20, 4), spacing=(1.0, 1.0, 3.0), seed=4)
  lps, lps_affine = S.to_lps(image, affine)
  spec = small_spec(size=(28, 28))  # same spacing: prepared = reoriented + padded
  prepared, g = P.prepare_volume(lps, lps_affine, spec)
  back = P.invert_image(prepared, g)
  expected = P.normalize_intensity(lps, spec.ct_window_hu)
  np.testing.assert_allclose(back, expected, atol=1e-6)
  probs = np.stack([prepared, -prepared], -1)
  back2 = P.invert_image(probs, g)
  assert back2.shape == lps.shape + (2,)
  np.testing.assert_allclose(back2[..., 1], -expected, atol=1e-6)


def test_intensity_normalisation_ct_and_mri():
  rng = np.random.default_rng(0)
  hu = rng.uniform(-1500, 1500, size=(8, 8, 2)).astype(np.float32)
  out = P.normalize_intensity(hu, (-1000.0, 500.0))
  expected = (np.clip(hu, -1000, 500) + 1000) / 1500 * 2 - 1
  np.testing.assert_allclose(out, expected, atol=1e-6)
  affine = np.eye(4)
  mri = rng.gamma(2.0, 100.0, size=(16, 16, 3)).astype(np.float32)
  spec = P.PrepSpec(modality='mri', spacing_mm=1.0, size=16, mri_percentiles=(1.0, 99.0))
  prepared, _ = P.prepare_volume(mri, affine, spec)
  lo, hi = np.percentile(mri, [1.0, 99.0])
  ref = (np.clip(mri, lo, hi) - lo) / (hi - lo) * 2 - 1
  ref_zyx = ref[::-1, ::-1].transpose(2, 1, 0)  # RAS -> canonical [Z, P, L]
  np.testing.assert_allclose(prepared, ref_zyx, atol=1e-5)
  assert prepared.min() == -1.0 and prepared.max() == pytest.approx(1.0, abs=1e-6)


def test_crop_is_centred_on_the_body():
  shape = (80, 60, 2)
  image = np.full(shape, -1000, np.int16)
  image[50:70, 10:30] = 40  # body off-centre, towards +x (R) and -y (P)
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  spec = small_spec(size=(24, 24))
  prepared, g = P.prepare_volume(image, affine, spec)
  body = prepared[0] > -0.5
  rows, cols = np.nonzero(body)
  assert body.sum() == 20 * 20  # the whole body fits in the window
  assert abs(rows.mean() - 11.5) <= 1 and abs(cols.mean() - 11.5) <= 1


def test_whole_field_of_view_keeps_every_voxel():
  """prepare_volume(whole_fov=True) (prediction) grows the size to cover the resampled image,
  rounded up to WHOLE_FOV_MULTIPLE; the training crop of the same spec cuts it."""
  image, label, affine = S.toy_case()  # 24 x 20 voxels of 1.5 mm
  spec = small_spec(spacing_mm=(1.5, 1.5), size=(16, 16))
  cropped, g_crop = P.prepare_volume(image, affine, spec)
  whole, g_whole = P.prepare_volume(image, affine, spec, whole_fov=True)
  assert cropped.shape == (6, 16, 16) and whole.shape == (6, 32, 32)
  assert geo.outside_window(g_crop).any() and not geo.outside_window(g_whole).any()
  assert P.prepare_label(label, g_whole).sum() == label.sum()
  np.testing.assert_array_equal(P.invert_labels(P.prepare_label(label, g_whole), g_whole), label)


def test_a_crop_that_cuts_training_data_is_warned_and_recorded(tmp_path, caplog):
  """The summary (and manifest) count the cases whose body or labels the crop cut, the largest
  fraction of a body and the labelled voxels it took; preparation warns. At the original
  spacing the prepared volume is an exact crop, so what was taken is the difference of the
  counts. A crop of air only is recorded per case but not warned about."""
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0)
  spec = small_spec(spacing_mm=(1.5, 1.5), size=(8, 8))
  with caplog.at_level('WARNING'):
    cut = P.prepare_dataset(raw, tmp_path / 'a', spec, val_fraction=0.0, progress=False)
  kept_labels = np.load(tmp_path / 'a' / 'train' / 'labels.npy').sum()
  kept_body = (np.load(tmp_path / 'a' / 'train' / 'images.npy') > -2 / 3).reshape(3, -1).sum(1)
  cases = [S.toy_case(seed=k) for k in range(3)]
  body = np.array([(image > -500).sum() for image, _, _ in cases])  # -500 HU = -2/3 prepared
  # (The toy bodies are solid ellipses: the 3x3 opening that removes speckles keeps them.)
  assert cut['cropped']['cases'] == 3 and cut['cropped']['size'] == [8, 8]
  assert cut['cropped']['label_voxels'] == sum(c[1].sum() for c in cases) - kept_labels > 0
  assert cut['cropped']['max_body_fraction'] == pytest.approx(max(1 - kept_body / body), abs=1e-3)
  assert 'warning: the 8x8 crop cut into the body of 3 of 3 cases' in P.format_summary(cut)
  assert 'the 8x8 crop cut into the body of 3 of 3 cases' in caplog.text
  # 24 x 20 voxels, the body 18 x 14 of them: an 18 x 20 (H x W) crop cuts air only.
  air = P.prepare_dataset(
    raw,
    tmp_path / 'b',
    small_spec(spacing_mm=(1.5, 1.5), size=(18, 20)),
    val_fraction=0.0,
    progress=False,
  )
  records = P.read_manifest(tmp_path / 'b')['splits']['train']
  assert all(r['cut_away']['fov_fraction'] > 0 == r['cut_away']['body_fraction'] for r in records)
  assert air['cropped']['cases'] == 0 and 'crop cut' not in P.format_summary(air)


# ----------------------------------------------------------------------------- labels


def test_label_maps_both_directions_and_errors():
  declared = {0: 'background', 1: 'liver', 2: 'spleen', 3: 'kidney_left', 4: 'kidney_right'}
  lut, names = P.resolve_label_map(declared, {'liver': 1, 'Spleen': 2, '3': 3, 4: 3})
  assert lut == {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
  assert names == ['background', 'liver', 'spleen', 'kidney_left+kidney_right']
  lut, names = P.resolve_label_map({0: 'bg', 2: 'tumor'}, None)
  assert lut == {0: 0, 2: 1} and names == ['bg', 'tumor']
  lut, _ = P.resolve_label_map(declared, {'liver': 1})  # unlisted organs -> background
  assert lut[2] == lut[3] == 0
  with pytest.raises(DataError, match='tumour'):
    P.resolve_label_map(declared, {'tumour': 1})
  with pytest.raises(DataError, match='7'):
    P.resolve_label_map(declared, {7: 1})
  label = np.array([[0, 1], [4, 2]])
  np.testing.assert_array_equal(
    P.apply_label_map(label, {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}), [[0, 1], [3, 2]]
  )


def test_msd_layout_with_string_int_labels(tmp_path):
  raw = toy_dataset(
    tmp_path / 'raw', n_train=3, n_test=1, layout='msd', labels={'background': 0, 'tumor': 1}
  )
  meta = json.load(open(os.path.join(raw, 'dataset.json')))
  assert meta['labels'] == {'0': 'background', '1': 'tumor'}
  # A macOS resource-fork file as found in MSD tarballs is ignored.
  open(os.path.join(raw, 'imagesTs', '._junk.nii.gz'), 'wb').close()
  summary = P.prepare_dataset(
    raw,
    tmp_path / 'prep',
    small_spec(label_map={'tumor': 1}),
    val_fraction=0.34,
    seed=1,
    progress=False,
  )
  assert summary['cases'] == {'train': 2, 'validation': 1, 'test': 1}
  assert summary['class_names'] == ['background', 'tumor']
  assert summary['foreground_slices']['train'] > 0


# ----------------------------------------------------------------------------- dataset


def test_prepare_dataset_layout_splits_and_manifest(tmp_path):
  raw = toy_dataset(tmp_path / 'raw', n_train=5, n_test=2, test_labels=True)
  spec = small_spec(label_map={'tumor': 1})
  s1 = P.prepare_dataset(raw, tmp_path / 'a', spec, val_fraction=0.4, seed=3, progress=False)
  s2 = P.prepare_dataset(raw, tmp_path / 'b', spec, val_fraction=0.4, seed=3, progress=False)
  m1, m2 = P.read_manifest(tmp_path / 'a'), P.read_manifest(tmp_path / 'b')
  ids = lambda m, s: [c['case_id'] for c in m['splits'][s]]
  assert ids(m1, 'validation') == ids(m2, 'validation') and len(ids(m1, 'validation')) == 2
  assert sorted(ids(m1, 'train') + ids(m1, 'validation')) == [f'case_{k:03d}' for k in range(5)]
  assert ids(m1, 'test') == ['case_005', 'case_006']
  assert all(c['has_label'] for c in m1['splits']['test'])
  assert s1['slices']['train'] == 3 * 6 and s1['cases'] == s2['cases']
  imgs = np.load(tmp_path / 'a' / 'train' / 'images.npy', mmap_mode='r')
  labs = np.load(tmp_path / 'a' / 'train' / 'labels.npy')
  fg = np.load(tmp_path / 'a' / 'train' / 'has_foreground.npy')
  assert imgs.shape == (18, 32, 32) and imgs.dtype == np.float32 and labs.dtype == np.uint8
  assert -1.0 <= imgs.min() and imgs.max() <= 1.0
  np.testing.assert_array_equal(fg, labs.reshape(18, -1).max(1) > 0)
  np.testing.assert_array_equal(
    np.load(tmp_path / 'a' / 'train' / 'slice_index.npy'), np.tile(np.arange(6), 3)
  )
  # The seed matters: ten seeds give several different validation sets.
  all_ids = [f'case_{k:03d}' for k in range(5)]
  assert P.assign_splits(all_ids, 0.4, seed=3)['validation'] == ids(m1, 'validation')
  assert len({tuple(P.assign_splits(all_ids, 0.4, seed=s)['validation']) for s in range(10)}) > 2
  assert P.is_prepared(tmp_path / 'a') and not P.is_prepared(tmp_path / 'nope')
  # Test cases without labelsTs: no labels.
  raw2 = toy_dataset(tmp_path / 'raw2', n_train=2, n_test=1)
  P.prepare_dataset(raw2, tmp_path / 'c', spec, val_fraction=0.0, progress=False)
  assert not P.read_manifest(tmp_path / 'c')['splits']['test'][0]['has_label']


def test_cli_prints_summary_and_fails_cleanly(tmp_path, capsys):
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0)
  rc = P.main(
    [
      '--dataset',
      raw,
      '--out',
      str(tmp_path / 'out'),
      '--modality',
      'ct',
      '--spacing',
      '1.0',
      '--size',
      '32',
      '--label-map',
      'tumor=1',
      '--no-progress',
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0 and 'train' in out and 'classes (2)' in out
  assert P.read_manifest(tmp_path / 'out')['spec']['size'] == [32, 32]
  rc = P.main(
    [
      '--dataset',
      str(tmp_path / 'missing'),
      '--out',
      str(tmp_path / 'o2'),
      '--modality',
      'ct',
      '--no-progress',
    ]
  )
  assert rc == 1 and 'missing' in capsys.readouterr().err


def test_spec_from_config_reads_the_data_section():
  from configs import default, equal_teacher  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.lock()
  for side, modality in (('source', 'ct'), ('target', 'mri')):
    assert prepared_data.spec_from_config(config, side) == P.PrepSpec(
      modality=modality,
      spacing_mm=(1.5, 1.5),
      size=(256, 256),
      ct_window_hu=(-1000, 500),
      mri_percentiles=(0.5, 99.5),
      label_map={'tumor': 1},
      interpolation='linear',
    )
  spec = prepared_data.spec_from_config(equal_teacher.get_config(), 'target')
  assert spec.modality == 'mri' and spec.label_map == {
    'liver': 1,
    'spleen': 2,
    'kidney_left': 3,
    'kidney_right': 4,
  }


def test_each_side_may_have_its_own_label_map():
  """Issue 21 item 14: MSD Task06_Lung names its label "cancer", an MRI set "tumor"; one shared
  data.label_map could not map both to class 1."""
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.lock()
  config.data.source.label_map = 'cancer=1'  # As --config.data.source.label_map=cancer=1.
  config.data.target.label_map = {'tumor': 1, 2: 0}  # As ...="{'tumor': 1, 2: 0}".
  assert prepared_data.spec_from_config(config, 'source').label_map == {'cancer': 1}
  assert prepared_data.spec_from_config(config, 'target').label_map == {'tumor': 1, '2': 0}
  config.data.target.label_map = None  # Unset: the shared one.
  assert prepared_data.spec_from_config(config, 'target').label_map == {'tumor': 1}
  for bad, problem in (
    ('cancer', "expects NAME=CLASS (CLASS an integer), got 'cancer'"),
    ({'cancer': 'one'}, "must be a dict {name or value: class} or 'NAME=CLASS,...'"),
  ):
    config.data.source.label_map = bad
    with pytest.raises(P.DataError, match=re.escape(f'data.source.label_map: {problem}')):
      prepared_data.spec_from_config(config, 'source')


def test_cli_label_map_takes_names_and_values(tmp_path, capsys):
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0)
  args = ['--dataset', raw, '--modality', 'ct', '--size', '32', '--no-progress']
  for i, label_map in enumerate(['tumor=1', '1=1']):
    assert P.main(args + ['--out', str(tmp_path / f'out{i}'), '--label-map', label_map]) == 0
    assert 'classes (2): background, tumor' in capsys.readouterr().out
  assert P.main(args + ['--out', str(tmp_path / 'o'), '--label-map', 'tumor']) == 2
  assert capsys.readouterr().err == (
    "error: --label-map: expects NAME=CLASS (CLASS an integer), got 'tumor'\n"
  )


# ----------------------------------------------------------------------------- bad input


def _write_nifti(path, array, affine=None):
  S.save_nifti(str(path), array, np.eye(4) if affine is None else affine)


BAD_CASES = {
  'image without label': (
    lambda d: os.remove(d / 'labelsTr' / 'case_001.nii.gz'),
    'labelsTr/case_001.nii.gz',
    'does not exist',
  ),
  'shape mismatch': (
    lambda d: _write_nifti(d / 'labelsTr' / 'case_001.nii.gz', np.zeros((24, 20, 5), np.uint8)),
    'labelsTr/case_001.nii.gz',
    'shape',
  ),
  'affine mismatch': (
    lambda d: _write_nifti(
      d / 'labelsTr' / 'case_001.nii.gz',
      np.zeros((24, 20, 6), np.uint8),
      np.diag([1.5, 1.5, 4.0, 1.0]),
    ),
    'labelsTr/case_001.nii.gz',
    'affine',
  ),
  '2D volume': (
    lambda d: _write_nifti(d / 'imagesTr' / 'case_001_0000.nii.gz', np.zeros((24, 20), np.int16)),
    'imagesTr/case_001_0000.nii.gz',
    '3D',
  ),
  '4D volume': (
    lambda d: _write_nifti(
      d / 'imagesTr' / 'case_001_0000.nii.gz', np.zeros((24, 20, 6, 2), np.int16)
    ),
    'imagesTr/case_001_0000.nii.gz',
    '3D',
  ),
  'NaN voxels': (
    lambda d: _write_nifti(
      d / 'imagesTr' / 'case_001_0000.nii.gz',
      np.where(np.arange(24 * 20 * 6).reshape(24, 20, 6) == 7, np.nan, 0.0).astype(np.float32),
      S.toy_case(seed=1)[2],
    ),
    'imagesTr/case_001_0000.nii.gz',
    'NaN',
  ),
  'undeclared label': (
    lambda d: _write_nifti(
      d / 'labelsTr' / 'case_001.nii.gz', np.full((24, 20, 6), 3, np.uint8), S.toy_case(seed=1)[2]
    ),
    'labelsTr/case_001.nii.gz',
    'not declared',
  ),
  'corrupt file': (
    lambda d: open(d / 'imagesTr' / 'case_001_0000.nii.gz', 'wb').write(b'junk'),
    'imagesTr/case_001_0000.nii.gz',
    'cannot read',
  ),
  'truncated gzip': (
    lambda d: _truncate(d / 'imagesTr' / 'case_001_0000.nii.gz'),
    'imagesTr/case_001_0000.nii.gz',
    'cannot read',
  ),
}


def _truncate(path):
  """Cuts a file to half its length (a copy or download that stopped midway)."""
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize('kind', sorted(BAD_CASES))
def test_bad_case_is_named_and_skip_bad_skips_it(tmp_path, kind):
  corrupt, file_part, problem = BAD_CASES[kind]
  raw = tmp_path / 'raw'
  toy_dataset(raw, n_train=3, n_test=0)
  corrupt(raw)
  with pytest.raises(DataError, match=problem) as err:
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  assert file_part in str(err.value)
  assert not os.path.exists(tmp_path / 'out')
  assert [p for p in os.listdir(tmp_path) if p != 'raw'] == []  # no partial folder left
  summary = P.prepare_dataset(
    raw, tmp_path / 'out', small_spec(), skip_bad=True, val_fraction=0.0, progress=False
  )
  assert [s['case_id'] for s in summary['skipped']] == ['case_001']
  assert file_part in summary['skipped'][0]['file']
  assert summary['cases']['train'] == 2
  assert 'case_001' in P.format_summary(summary)


@pytest.mark.parametrize(
  'kind,problem',
  [
    ('missing folder', 'does not exist'),
    ('missing json', 'missing dataset.json'),
    ('malformed json', 'malformed JSON'),
    ('no labels key', "'labels'"),
    ('empty dataset', 'empty dataset'),
  ],
)
def test_bad_dataset_folder(tmp_path, kind, problem):
  raw = tmp_path / 'raw'
  if kind != 'missing folder':
    toy_dataset(raw, n_train=1, n_test=0)
  if kind == 'missing json':
    os.remove(raw / 'dataset.json')
  elif kind == 'malformed json':
    (raw / 'dataset.json').write_text('{"labels": {"background": 0,')
  elif kind == 'no labels key':
    (raw / 'dataset.json').write_text('{"channel_names": {"0": "CT"}}')
  elif kind == 'empty dataset':
    os.remove(raw / 'imagesTr' / 'case_000_0000.nii.gz')
  with pytest.raises(DataError, match=problem) as err:
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  assert str(raw) in str(err.value)
  assert not os.path.exists(tmp_path / 'out')


def test_all_cases_bad_with_skip_bad_is_an_empty_dataset(tmp_path):
  raw = tmp_path / 'raw'
  toy_dataset(raw, n_train=1, n_test=0)
  os.remove(raw / 'labelsTr' / 'case_000.nii.gz')
  with pytest.raises(DataError, match='no usable cases'):
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), skip_bad=True, progress=False)
  assert os.listdir(tmp_path) == ['raw']


def test_failure_midway_leaves_no_partial_dataset_and_keeps_old_one(tmp_path, monkeypatch):
  raw = toy_dataset(tmp_path / 'raw', n_train=4, n_test=0)
  spec = small_spec()
  real = P.prepare_case
  calls = []

  def flaky(case, *args):
    calls.append(case.case_id)
    if len(calls) == 3:
      raise RuntimeError('disk full (simulated)')
    return real(case, *args)

  monkeypatch.setattr(P, 'prepare_case', flaky)
  with pytest.raises(RuntimeError, match='simulated'):
    P.prepare_dataset(raw, tmp_path / 'out', spec, progress=False)
  assert sorted(os.listdir(tmp_path)) == ['raw'] and not P.is_prepared(tmp_path / 'out')
  monkeypatch.setattr(P, 'prepare_case', real)
  P.prepare_dataset(raw, tmp_path / 'out', spec, val_fraction=0.0, progress=False)
  before = np.load(tmp_path / 'out' / 'train' / 'images.npy')
  with pytest.raises(FileExistsError):
    P.prepare_dataset(raw, tmp_path / 'out', spec, progress=False)
  calls.clear()
  monkeypatch.setattr(P, 'prepare_case', flaky)
  with pytest.raises(RuntimeError):
    P.prepare_dataset(raw, tmp_path / 'out', spec, overwrite=True, progress=False)
  assert sorted(os.listdir(tmp_path)) == ['out', 'raw'] and P.is_prepared(tmp_path / 'out')
  np.testing.assert_array_equal(np.load(tmp_path / 'out' / 'train' / 'images.npy'), before)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_builders_offline_match_prepared_arrays(tmp_path, monkeypatch):
  import socket
  import tensorflow_datasets as tfds
  from data_prep import tfds_builder

  def no_network(*args, **kwargs):
    raise OSError('network access attempted during the TFDS build')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=1)
  P.prepare_dataset(raw, tmp_path / 'prep', small_spec(), val_fraction=0.34, progress=False)
  builders = tfds_builder.build(tmp_path / 'prep')
  assert set(builders) == {'prepared_slices', 'prepared_volumes'}
  assert str(builders['prepared_slices'].data_dir).startswith(str(tmp_path / 'prep' / 'tfds'))
  manifest = P.read_manifest(tmp_path / 'prep')
  slices = tfds.builder_from_directory(builders['prepared_slices'].data_dir)
  source = slices.as_data_source('train')  # ArrayRecord random access
  images = np.load(tmp_path / 'prep' / 'train' / 'images.npy')
  labels = np.load(tmp_path / 'prep' / 'train' / 'labels.npy')
  assert len(source) == len(images) == 12
  for i in (0, 5, 11):
    ex = source[i]
    case = manifest['splits']['train'][i // 6]
    assert ex['case_id'].decode() == case['case_id'] and ex['slice_index'] == i % 6
    np.testing.assert_array_equal(ex['image'], images[i])
    np.testing.assert_array_equal(ex['label'], labels[i])
    assert bool(ex['has_foreground']) == bool(labels[i].any())
  vols = tfds.builder_from_directory(builders['prepared_volumes'].data_dir)
  assert set(vols.info.splits) == {'validation', 'test'}
  (vol,) = list(vols.as_data_source('validation'))
  geometry = P.Geometry.from_dict(json.loads(vol['geometry']))
  case = manifest['splits']['validation'][0]
  original = nib.load(case['label_file'])
  np.testing.assert_array_equal(
    P.invert_labels(vol['label'], geometry), np.asarray(original.dataobj)
  )


def _dead_pid():
  import subprocess  # pylint: disable=g-import-not-at-top

  p = subprocess.Popen(['true'])
  p.wait()
  return p.pid


def _aged(path, seconds):
  os.makedirs(path)
  t = os.path.getmtime(path) - seconds
  os.utime(path, (t, t))
  return path.name


def test_a_killed_preparation_s_folders_are_deleted_at_the_next_start(tmp_path):
  dead, live = _dead_pid(), os.getppid()
  stale = [
    _aged(tmp_path / f'.out.partial-{dead}-0123abcd', 120),
    _aged(tmp_path / f'.out.old-{dead}-4567abcd', 120),
    _aged(tmp_path / '.out.partial-89abcdef', 2 * 86400),
  ]  # Before names held a pid.
  kept = [
    _aged(tmp_path / f'.out.partial-{live}-0123abcd', 120),  # Still running.
    _aged(tmp_path / f'.out.partial-{dead}-1111abcd', 0),  # Too new to judge.
    _aged(tmp_path / '.out.partial-22222222', 3600),
    _aged(tmp_path / f'.other.partial-{dead}-0123abcd', 120),  # Another dataset's.
    _aged(tmp_path / 'out.partial-not-ours', 120),
  ]
  with pytest.raises(DataError, match='dataset folder does not exist'):
    P.prepare_dataset(tmp_path / 'raw', tmp_path / 'out', small_spec(), progress=False)
  assert sorted(os.listdir(tmp_path)) == sorted(kept)
  assert not set(stale) & set(os.listdir(tmp_path))


@pytest.mark.parametrize(
  'flags, problem',
  [
    (['--spacing', '0'], 'spacing must be > 0'),
    (['--spacing', '1', '-2'], 'spacing must be > 0'),
    (['--size', '0'], 'size must be >= 1'),
    (['--spacing', '1', '1', '1'], '--spacing takes 1 or 2'),
  ],
)
def test_cli_bad_spacing_or_size_is_a_one_line_error(tmp_path, capsys, flags, problem):
  raw = toy_dataset(tmp_path / 'raw', n_train=1, n_test=0)
  rc = P.main(
    ['--dataset', raw, '--out', str(tmp_path / 'out'), '--modality', 'ct', '--no-progress', *flags]
  )
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith('error: ') and problem in err and err.count('\n') == 1
  assert not os.path.exists(tmp_path / 'out')


def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_dataset(
  tmp_path, monkeypatch, capsys
):
  """Issue 21 item 10e: a full disk used to print hundreds of lines of tracebacks."""
  raw = toy_dataset(tmp_path / 'raw', n_train=2, n_test=0)
  args = ['--dataset', raw, '--out', str(tmp_path / 'out'), '--modality', 'ct', '--no-progress']
  assert P.main(args + ['--val-fraction', '0']) == 0
  before = np.load(tmp_path / 'out' / 'train' / 'images.npy')
  capsys.readouterr()

  def full(path, array):
    raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(path))

  monkeypatch.setattr(P.np, 'save', full)  # Each case's arrays (prepare_cases).
  assert P.main(args + ['--overwrite']) == 1
  monkeypatch.undo()
  err = capsys.readouterr().err
  assert err.startswith('error: no space left on device writing ') and err.count('\n') == 1
  assert '_image.npy' in err and 'run the same command again' in err
  np.testing.assert_array_equal(np.load(tmp_path / 'out' / 'train' / 'images.npy'), before)
  assert sorted(os.listdir(tmp_path)) == ['out', 'raw']


def test_a_full_disk_is_recognised_through_wrapping_errors():
  try:
    try:
      raise OSError(errno.EDQUOT, 'Disk quota exceeded')
    except OSError as e:
      raise ValueError('orbax: could not write the checkpoint') from e
  except ValueError as e:
    assert files.disk_full(e).startswith('no space left on device; free some space')
  wrapped = RuntimeError('tensorstore: INTERNAL: Error writing "x": No space left on device')
  assert 'tensorstore' in files.disk_full(wrapped)
  assert files.disk_full(OSError(errno.ENOENT, 'No such file')) is None
  assert files.disk_full(ValueError('bad value')) is None


def test_two_images_of_one_case_are_an_error_naming_both(tmp_path):
  raw = toy_dataset(tmp_path / 'raw', n_train=2, n_test=0)
  first = os.path.join(raw, 'imagesTr', 'case_001_0000.nii.gz')
  second = os.path.join(raw, 'imagesTr', 'case_001.nii.gz')
  os.link(first, second)
  with pytest.raises(DataError, match="case 'case_001' has a second image") as e:
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  assert first in str(e.value) and second in str(e.value)


def test_no_training_cases_is_an_error_even_with_test_cases(tmp_path):
  """Issue 21 item 2: an empty imagesTr/ used to prepare (test split only) and exit 0."""
  raw = toy_dataset(tmp_path / 'raw', n_train=1, n_test=1)
  os.remove(os.path.join(raw, 'imagesTr', 'case_000_0000.nii.gz'))
  with pytest.raises(DataError, match='no training cases'):
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_validation_split_emptied_by_skipped_cases_is_an_error(tmp_path):
  """Issue 21 item 2: splits are drawn before bad cases are skipped; a validation split left
  empty is an error naming its cases, not a run that fails later."""
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0)
  summary = P.prepare_dataset(
    raw, tmp_path / 'probe', small_spec(), val_fraction=0.34, seed=1, progress=False
  )
  (val_case,) = [r['case_id'] for r in P.read_manifest(tmp_path / 'probe')['splits']['validation']]
  assert summary['cases']['validation'] == 1
  with open(os.path.join(raw, 'imagesTr', f'{val_case}_0000.nii.gz'), 'wb') as f:
    f.write(b'junk')
  with pytest.raises(DataError, match=f'every validation case was skipped.*{val_case}'):
    P.prepare_dataset(
      raw, tmp_path / 'out', small_spec(), val_fraction=0.34, seed=1, skip_bad=True, progress=False
    )
  assert not os.path.exists(tmp_path / 'out')


def test_training_case_without_label_is_an_error(tmp_path):
  """Issue 21 item 1: one `training` entry without "label" marked the whole split unlabelled,
  so every source label became 0 and the student learned background."""
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0, layout='msd')
  meta = json.load(open(os.path.join(raw, 'dataset.json')))
  del meta['training'][1]['label']
  json.dump(meta, open(os.path.join(raw, 'dataset.json'), 'w'))
  with pytest.raises(DataError, match=r'1 of 3 training cases have no label.*case_001'):
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)


@pytest.mark.parametrize(
  'path', ['../outside/case_000.nii.gz', '/etc/case_000.nii.gz', './imagesTr/../../case_000.nii.gz']
)
def test_dataset_json_paths_outside_the_folder_are_refused(tmp_path, path):
  """Issue 21 item 12: dataset.json entries with ../ or absolute paths read files elsewhere."""
  raw = toy_dataset(tmp_path / 'raw', n_train=2, n_test=0, layout='msd')
  os.makedirs(tmp_path / 'outside')  # A readable image there: refused, not merely missing.
  shutil.copy(os.path.join(raw, 'imagesTr', 'case_000.nii.gz'), tmp_path / 'outside')
  meta = json.load(open(os.path.join(raw, 'dataset.json')))
  meta['training'][0]['image'] = path
  json.dump(meta, open(os.path.join(raw, 'dataset.json'), 'w'))
  with pytest.raises(DataError, match='points outside the dataset folder') as err:
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  assert 'dataset.json' in str(err.value) and path in str(err.value)


@pytest.mark.parametrize('voxel_mm', [1e5, 1e-9])
def test_absurd_voxel_spacing_is_an_error_naming_the_file(tmp_path, voxel_mm):
  """Issue 21 item 4: a 1e5 mm or 1e-9 mm spacing used to prepare into a constant image."""
  raw = toy_dataset(tmp_path / 'raw', n_train=3, n_test=0)
  path = os.path.join(raw, 'imagesTr', 'case_001_0000.nii.gz')
  img = nib.load(path)
  _write_nifti(path, np.asarray(img.dataobj), np.diag([voxel_mm, voxel_mm, 4.0, 1.0]))
  with pytest.raises(DataError, match=r'case_001_0000.nii.gz.*voxel spacing .* outside'):
    P.prepare_dataset(raw, tmp_path / 'out', small_spec(), progress=False)
  # The range is configurable (CLI --spacing-range): the check passes, the next one fails.
  with pytest.raises(DataError, match='label affine differs' if voxel_mm > 1 else 'singular'):
    P.prepare_dataset(
      raw, tmp_path / 'out', small_spec(), progress=False, spacing_range_mm=(1e-12, 1e6)
    )
