"""Phantom generator: tissue intensities, tumor contrast, determinism, headers, layout, CLI."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_prep import nifti_io
from data_prep import phantoms as P

T = P.TISSUES
# Small grids keep the tests fast; 4 mm in-plane still covers the whole body.
SMALL = {
  'thorax_ct': dict(size=96, spacing=4.0, slices=20, slice_spacing=3.0),
  'thorax_t2w': dict(size=96, spacing=4.0, slices=12, slice_spacing=5.0),
  'abdomen_t1w': dict(size=96, spacing=4.0, slices=12, slice_spacing=5.0),
  'abdomen_t2w': dict(size=96, spacing=4.0, slices=12, slice_spacing=5.0),
}
INPLANE = np.zeros((3, 3, 3), bool)
INPLANE[:, :, 1] = True
INPLANE[1, 1, :] = True  # 6-neighbourhood


def _case(kind, index, seed=0):
  rng = np.random.default_rng(P.case_seed(seed, kind, index))
  return P.generate_phantom(kind, rng, P.make_grid(kind, **SMALL[kind]))


@pytest.fixture(scope='module')
def thorax_cases():
  return {kind: [_case(kind, i) for i in range(8)] for kind in ('thorax_ct', 'thorax_t2w')}


def _core(mask, iterations=1):
  return ndimage.binary_erosion(mask, structure=INPLANE, iterations=iterations)


# ---------------------------------------------------------------- intensities per tissue


def test_ct_tissue_means_match_nominal_values_in_documented_ranges(thorax_cases):
  ranges = P.TISSUE_RANGES['thorax_ct']
  for case in thorax_cases['thorax_ct'][:3]:
    img, nominal = case.image.astype(np.float64), case.meta['tissue_values']
    sigma = case.meta['noise_sigma']
    for name in ('fat', 'muscle', 'lung', 'mediastinum', 'heart', 'bone', 'background'):
      core = _core(case.tissues == T[name], 2)
      if core.sum() < 30:
        continue
      lo, hi = ranges.get(name, ranges['mediastinum'])
      if name == 'heart':  # mediastinum + U(-2, 4)
        lo, hi = ranges['mediastinum'][0] - 2, ranges['mediastinum'][1] + 4
      assert lo <= nominal[name] <= hi, name
      measured = img[core].mean()
      # Lung: posterior gravity gradient (up to +-35 HU) and faint sub-voxel vessels.
      tol = 25.0 if name == 'lung' else 3.0 + 4 * sigma / np.sqrt(core.sum())
      if name == 'background':  # air clipped at -1024 HU on disk
        tol = 8.0
      assert abs(measured - nominal[name]) < tol, (name, measured, nominal[name])
    # The noise is what the meta says: std in the mediastinum core.
    core = _core(case.tissues == T['mediastinum'], 2)
    assert abs(img[core].std() / sigma - 1) < 0.15


@pytest.mark.parametrize('kind', ['thorax_t2w', 'abdomen_t1w', 'abdomen_t2w'])
def test_mri_tissue_means_within_documented_ranges(kind):
  case = _case(kind, 0)
  assert case.image.dtype == np.uint16 and case.image.min() >= 0
  rel = case.image.astype(np.float64) / case.meta['mri_scale']
  checked = 0
  for name, (lo, hi) in P.TISSUE_RANGES[kind].items():
    if lo < 0.1 or name not in T:
      continue  # dark tissues sit on the Rician noise floor
    core = _core(case.tissues == T[name], 1)
    if core.sum() < 30:
      continue
    mean = rel[core].mean()
    # Documented: nominal x bias field (0.75-1.33) x scale; kidney medulla x0.7 (T1) / x1.25 (T2).
    slack = (0.7, 1.25) if name.startswith('kidney') else (1.0, 1.0)
    assert lo * 0.75 * slack[0] - 0.02 <= mean <= hi * 1.34 * slack[1] + 0.02, (name, mean)
    checked += 1
  assert checked >= 4


def test_t2w_thorax_contrast_order():
  case = _case('thorax_t2w', 1)
  img = case.image.astype(np.float64)
  mean = {
    n: img[_core(case.tissues == T[n])].mean()
    for n in ('lung', 'muscle', 'mediastinum', 'fat', 'csf')
  }
  assert mean['lung'] < mean['muscle'] < mean['mediastinum'] < mean['fat'] < mean['csf']
  assert mean['lung'] < 0.4 * mean['mediastinum']


# ---------------------------------------------------------------- tumor contrast (the premise)


def _tumor_contrasts(case):
  """Per tumor: (type, CNR) with CNR = |mean(tumor core) - mean(reference)| / std(reference).
  Reference: adjacent mediastinum/heart (ring 1-3 voxels out) for juxta-mediastinal tumors,
  adjacent lung for peripheral ones (whose noise is taken from the mediastinum core)."""
  img = case.image.astype(np.float64)
  soft = _core(np.isin(case.tissues, [T['mediastinum'], T['heart']]))
  lung = _core(case.tissues == T['lung'])
  med_core = _core(case.tissues == T['mediastinum'], 2)
  out = []
  for tm in case.meta['tumors']:
    mask = case.instances == tm['instance_id']
    core = _core(mask)
    ring = ndimage.binary_dilation(mask, INPLANE, 3) & ~ndimage.binary_dilation(mask, INPLANE, 1)
    ref = ring & (soft if tm['type'] == 'juxta_mediastinal' else lung)
    if core.sum() < 8 or ref.sum() < 8:
      continue
    sigma = img[ref].std() if tm['type'] == 'juxta_mediastinal' else img[med_core].std()
    out.append((tm['type'], abs(img[core].mean() - img[ref].mean()) / sigma))
  return out


def test_juxta_mediastinal_tumors_low_contrast_in_ct_high_in_t2w(thorax_cases):
  cnr = {
    kind: [c for case in cases for c in _tumor_contrasts(case)]
    for kind, cases in thorax_cases.items()
  }
  ct_juxta = [v for t, v in cnr['thorax_ct'] if t == 'juxta_mediastinal']
  ct_peri = [v for t, v in cnr['thorax_ct'] if t == 'peripheral']
  mr_juxta = [v for t, v in cnr['thorax_t2w'] if t == 'juxta_mediastinal']
  assert len(ct_juxta) >= 3 and len(mr_juxta) >= 3 and len(ct_peri) >= 2, cnr
  assert max(ct_juxta) < 1.0, ct_juxta  # invisible against the mediastinum on CT
  assert min(mr_juxta) > 3.0, mr_juxta  # bright against it on T2w
  assert min(ct_peri) > 10.0, ct_peri  # peripheral tumors stand out in lung on CT


def test_a_consistent_juxta_mediastinal_ct_offset_is_an_option(thorax_cases, tmp_path):
  """juxta_offset_hu (the study's premise factorial): the same patients and labels, with every
  juxta-mediastinal CT tumor the mediastinum + U(10, 15) HU instead of U(-6, 6); recorded in
  dataset.json; refused for MRI kinds."""
  offsets = {'default': [], 'cue': []}
  for index, plain in enumerate(thorax_cases['thorax_ct']):
    rng = np.random.default_rng(P.case_seed(0, 'thorax_ct', index))
    cue = P.generate_phantom(
      'thorax_ct', rng, P.make_grid('thorax_ct', **SMALL['thorax_ct']), (10, 15)
    )
    np.testing.assert_array_equal(cue.label, plain.label)
    for case, key in ((plain, 'default'), (cue, 'cue')):
      mediastinum = case.meta['tissue_values']['mediastinum']
      offsets[key] += [
        t['nominal_value'] - mediastinum
        for t in case.meta['tumors']
        if t['type'] == 'juxta_mediastinal'
      ]
  assert len(offsets['cue']) >= 3
  assert all(-6 <= v <= 6 for v in offsets['default']), offsets
  assert all(10 - 1e-3 <= v <= 15 + 1e-3 for v in offsets['cue']), offsets
  out = P.write_dataset(
    'thorax_ct', 1, 0, tmp_path / 'cue', n_test=0, juxta_offset_hu=(10, 15), **SMALL['thorax_ct']
  )
  assert json.loads((out / 'dataset.json').read_text())['phantom']['juxta_offset_hu'] == [10, 15]
  with pytest.raises(ValueError, match='thorax_ct only'):
    P.write_dataset('thorax_t2w', 1, 0, tmp_path / 'mri', juxta_offset_hu=(10, 15))


def test_tumor_types_and_geometry(thorax_cases):
  types = []
  for case in thorax_cases['thorax_ct'] + thorax_cases['thorax_t2w']:
    tumors = case.meta['tumors']
    assert 1 <= len(tumors) <= 3
    kinds = [t['type'] for t in tumors]
    types += kinds
    assert np.array_equal(case.label, (case.instances > 0).astype(np.uint8))
    assert np.array_equal(case.label == 1, case.tissues == T['tumor'])
    for t in tumors:
      mask = case.instances == t['instance_id']
      assert t['n_voxels'] == mask.sum() > 0
      assert 10 * 0.85**5 <= t['diameter_mm'] <= 50
      around = ndimage.binary_dilation(mask, INPLANE, 1) & ~mask
      touches_med = np.isin(case.tissues[around], [T['mediastinum'], T['heart']]).any()
      if t['type'] == 'juxta_mediastinal':
        assert touches_med
      else:  # in lung with a 3 mm margin (the 4 mm test voxels may graze the pleura)
        assert np.isin(case.tissues[around], [T['lung'], T['lung_vessel']]).mean() > 0.8
  assert types.count('peripheral') >= 4 and types.count('juxta_mediastinal') >= 4


# ---------------------------------------------------------------- determinism & geometry


def test_same_seed_same_arrays_other_seed_other_arrays():
  a = P.generate_case('thorax_ct', np.random.default_rng(5), **SMALL['thorax_ct'])
  b = P.generate_case('thorax_ct', np.random.default_rng(5), **SMALL['thorax_ct'])
  c = P.generate_case('thorax_ct', np.random.default_rng(6), **SMALL['thorax_ct'])
  for x, y in zip(a[:4], b[:4]):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
  assert a[4] == b[4]
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])


def test_kinds_with_same_seed_are_different_patients():
  seeds = {k: P.case_seed(0, k, 0).generate_state(4).tolist() for k in P.KINDS}
  assert len({tuple(s) for s in seeds.values()}) == len(P.KINDS)


def test_orientation_on_disk_does_not_move_the_anatomy():
  grid = P.make_grid('thorax_ct', **SMALL['thorax_ct'])
  lps = P.Grid(grid.size, grid.spacing, grid.slices, grid.slice_spacing, 'LPS')
  ras_case = P.generate_phantom('thorax_ct', np.random.default_rng(3), grid)
  lps_case = P.generate_phantom('thorax_ct', np.random.default_rng(3), lps)
  assert nib.aff2axcodes(lps_case.affine) == ('L', 'P', 'S')
  canon = nib.as_closest_canonical(nib.Nifti1Image(lps_case.tissues, lps_case.affine))
  assert np.allclose(canon.affine, ras_case.affine)
  assert (np.asarray(canon.dataobj) == ras_case.tissues).mean() > 0.999
  # Anatomical sanity in world RAS: the heart lies left (x < 0) and anterior of the spine.
  xyz = np.argwhere(ras_case.tissues == T['heart'])
  world = nib.affines.apply_affine(ras_case.affine, xyz).mean(0)
  spine = nib.affines.apply_affine(ras_case.affine, np.argwhere(ras_case.tissues == T['csf'])).mean(
    0
  )
  assert world[0] < 0 and world[1] > spine[1]


def test_abdomen_left_right_organs_in_world_coordinates():
  for kind in ('abdomen_t1w', 'abdomen_t2w'):
    case = _case(kind, 2)
    x = {}
    for name, v in P.ABDOMEN_LABELS.items():
      if v:
        vox = np.argwhere(case.label == v)
        assert len(vox) > 20, (kind, name)
        x[name] = nib.affines.apply_affine(case.affine, vox)[:, 0].mean()
    assert x['liver'] > 0 and x['kidney_right'] > 0  # RAS+: patient right is +x
    assert x['spleen'] < 0 and x['kidney_left'] < 0


# ---------------------------------------------------------------- written dataset


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp('phantoms')
  out = {}
  for kind in P.KINDS:
    out[kind] = P.write_dataset(kind, 2, 7, root / kind, n_test=1, **SMALL[kind])
  return out


@pytest.mark.parametrize('kind', P.KINDS)
def test_header_geometry(written, kind):
  grid = P.make_grid(kind, **SMALL[kind])
  ds = json.loads((written[kind] / 'dataset.json').read_text())
  for entry in ds['training'] + ds['test']:
    img = nib.load(written[kind] / entry['image'])
    lab = nib.load(written[kind] / entry['label'])
    for im in (img, lab):
      assert im.shape == grid.shape
      assert np.allclose(im.header.get_zooms(), grid.zooms)
      assert nib.aff2axcodes(im.affine) == tuple(grid.orientation)
      assert im.header['sform_code'] == 1 and im.header['qform_code'] == 1
      assert np.allclose(im.header.get_qform(), im.affine, atol=1e-4)
    assert lab.get_data_dtype() == np.uint8
    assert img.get_data_dtype() == (np.int16 if kind == 'thorax_ct' else np.uint16)
    assert np.allclose(img.affine, lab.affine)
  expected = {'thorax_ct': 'RAS', 'thorax_t2w': 'LPS', 'abdomen_t1w': 'LAS', 'abdomen_t2w': 'LPS'}
  assert grid.orientation == expected[kind]


@pytest.mark.parametrize('kind', P.KINDS)
def test_dataset_json_is_valid(written, kind):
  root = written[kind]
  ds = json.loads((root / 'dataset.json').read_text())
  thorax = kind.startswith('thorax')
  labels = P.THORAX_LABELS if thorax else P.ABDOMEN_LABELS
  assert ds['labels'] == labels and ds['labels']['background'] == 0
  assert ds['channel_names'] == {
    '0': {'thorax_ct': 'CT', 'thorax_t2w': 'T2', 'abdomen_t1w': 'T1', 'abdomen_t2w': 'T2'}[kind]
  }
  assert ds['modality'] == {'0': 'CT' if kind == 'thorax_ct' else 'MRI'}
  assert ds['file_ending'] == '.nii.gz'
  assert ds['numTraining'] == len(ds['training']) == 2 and ds['numTest'] == len(ds['test']) == 1
  assert ds['phantom']['kind'] == kind and ds['phantom']['seed'] == 7
  assert ds['phantom']['generator_version'] == P.GENERATOR_VERSION
  assert sorted(os.listdir(root / 'imagesTr')) == sorted(
    os.path.basename(e['image']) for e in ds['training']
  )
  seen = set()
  for split, entries in (('Tr', ds['training']), ('Ts', ds['test'])):
    for e in entries:
      case = os.path.basename(e['label'])[: -len('.nii.gz')]
      assert e['image'] == f'./images{split}/{case}_0000.nii.gz' and case.startswith(kind + '_')
      assert (root / e['image']).is_file() and (root / e['label']).is_file()
      lab = np.asarray(nib.load(root / e['label']).dataobj)
      seen |= set(np.unique(lab).tolist())
      assert set(np.unique(lab).tolist()) <= set(labels.values())
      meta = json.loads((root / 'phantom_meta' / f'{case}.json').read_text())
      assert meta['case_id'] == case and meta['tissue_codes'] == P.TISSUES
      tis = nib.load(root / f'tissues{split}' / f'{case}.nii.gz')
      assert tis.get_data_dtype() == np.uint8 and tis.shape == lab.shape
      if thorax:
        inst = np.asarray(nib.load(root / f'instances{split}' / f'{case}.nii.gz').dataobj)
        assert sorted(t['instance_id'] for t in meta['tumors']) == sorted(
          set(np.unique(inst).tolist()) - {0}
        )
        assert all(t['type'] in P.TUMOR_TYPES for t in meta['tumors'])
  assert seen == set(labels.values())
  assert not [f for f in os.listdir(root) if f.startswith('.')]  # no temp files left


def test_reader_of_the_pipeline_accepts_it(written):
  info = nifti_io.read_dataset(written['thorax_t2w'])
  assert (
    len(info.training) == 2 and len(info.test) == 1 and info.labels == {0: 'background', 1: 'tumor'}
  )
  assert all(c.label and os.path.isfile(c.label) for c in info.training + info.test)


def test_rewrite_is_byte_identical_and_removes_stale_cases(tmp_path):
  kw = SMALL['abdomen_t2w']
  a = P.write_dataset('abdomen_t2w', 3, 1, tmp_path / 'a', n_test=0, **kw)
  b = P.write_dataset('abdomen_t2w', 3, 1, tmp_path / 'b', n_test=0, **kw)
  for sub in ('imagesTr', 'labelsTr', 'tissuesTr'):
    for f in os.listdir(a / sub):
      assert (a / sub / f).read_bytes() == (b / sub / f).read_bytes()
  P.write_dataset('abdomen_t2w', 1, 1, a, n_test=0, **kw)
  assert os.listdir(a / 'imagesTr') == ['abdomen_t2w_000_0000.nii.gz']
  assert len(os.listdir(a / 'phantom_meta')) == 1


# ---------------------------------------------------------------- paired phantoms


def _paired(kind, index, seed=0, juxta=P.JUXTA_OFFSET_HU):
  rng = np.random.default_rng(P.case_seed(seed, kind, index))
  own = np.random.default_rng(P.paired_seed(seed, kind, index))
  return P.generate_paired(kind, rng, own, P.make_grid(kind, **SMALL[kind]), juxta)


@pytest.fixture(scope='module')
def paired_cases():
  return [_paired('thorax_ct', i) for i in range(8)]


def _assert_same_anatomy(a, b):
  for what in ('label', 'tissues', 'instances', 'affine'):
    x, y = getattr(a, what), getattr(b, what)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), what
  geometry = ('instance_id', 'type', 'center_mm', 'diameter_mm', 'n_voxels')
  assert [{g: t[g] for g in geometry} for t in a.meta['tumors']] == [
    {g: t[g] for g in geometry} for t in b.meta['tumors']
  ]


def test_paired_rendering_shares_the_anatomy_and_leaves_the_source_unchanged(
  thorax_cases, paired_cases
):
  for plain, (ct, mr) in zip(thorax_cases['thorax_ct'], paired_cases):
    assert ct.image.tobytes() == plain.image.tobytes() and ct.meta == plain.meta
    _assert_same_anatomy(ct, mr)
    assert mr.meta['kind'] == 'thorax_t2w' and mr.image.dtype == np.uint16
    assert mr.meta['orientation'] == 'RAS' and mr.meta['shape'] == ct.meta['shape']
    for name, value in mr.meta['tissue_values'].items():  # the T2w model's own draws
      lo, hi = P.TISSUE_RANGES['thorax_t2w'][name]
      assert lo <= value <= hi, name
    assert all(0.60 <= t['nominal_value'] <= 0.85 for t in mr.meta['tumors'])
  # Its own stream: neither a case's stream nor the same for two cases.
  own = {tuple(P.paired_seed(0, 'thorax_ct', i).generate_state(4)) for i in range(3)}
  cases = {tuple(P.case_seed(0, k, i).generate_state(4)) for k in P.KINDS for i in range(3)}
  assert len(own) == 3 and not own & cases


def test_paired_juxta_mediastinal_tumors_low_contrast_in_ct_high_in_t2w(paired_cases):
  """The premise on the same tumors: each juxta-mediastinal tumor is invisible against the
  mediastinum on CT and bright against it on its T2w rendering."""
  juxta = []
  for ct, mr in paired_cases:
    cnr_ct, cnr_mr = _tumor_contrasts(ct), _tumor_contrasts(mr)
    assert [t for t, _ in cnr_ct] == [t for t, _ in cnr_mr]
    juxta += [(c, m) for (t, c), (_, m) in zip(cnr_ct, cnr_mr) if t == 'juxta_mediastinal']
  assert len(juxta) >= 3, juxta
  assert max(c for c, _ in juxta) < 1.0 and min(m for _, m in juxta) > 3.0, juxta


def test_paired_from_t2w_renders_ct_on_the_t2w_grid(thorax_cases):
  """The other direction: thorax_t2w patients rendered in CT; juxta_offset_hu applies to it."""
  mr, ct = _paired('thorax_t2w', 1, juxta=(10, 15))
  plain = thorax_cases['thorax_t2w'][1]
  assert mr.image.tobytes() == plain.image.tobytes() and mr.meta == plain.meta
  _assert_same_anatomy(mr, ct)
  assert ct.meta['kind'] == 'thorax_ct' and ct.image.dtype == np.int16
  assert nib.aff2axcodes(ct.affine) == ('L', 'P', 'S')
  mediastinum = ct.meta['tissue_values']['mediastinum']
  offsets = [
    t['nominal_value'] - mediastinum for t in ct.meta['tumors'] if t['type'] == 'juxta_mediastinal'
  ]
  assert offsets and all(10 - 1e-3 <= v <= 15 + 1e-3 for v in offsets), offsets
  with pytest.raises(ValueError, match='thorax kinds only'):
    P.paired_kind('abdomen_t2w')


@pytest.fixture(scope='module')
def paired_written(tmp_path_factory):
  """The CLI's --paired-out with the `written` fixture's thorax_ct arguments."""
  root = tmp_path_factory.mktemp('paired')
  grid = SMALL['thorax_ct']
  args = ['--kind', 'thorax_ct', '--n', '2', '--n-test', '1', '--seed', '7']
  args += ['--size', str(grid['size']), '--spacing', str(grid['spacing'])]
  args += ['--slices', str(grid['slices']), '--slice-spacing', str(grid['slice_spacing'])]
  assert P.main(args + ['--out', str(root / 'A'), '--paired-out', str(root / 'B')]) == 0
  return root / 'A', root / 'B'


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


def test_paired_out_leaves_the_ct_dataset_byte_identical(written, paired_written):
  plain, (a, _) = written['thorax_ct'], paired_written
  assert _files(a) == _files(plain)
  for f in _files(a):
    assert (a / f).read_bytes() == (plain / f).read_bytes(), f


def test_paired_dataset_has_the_same_cases_labels_and_geometry(paired_written):
  a, b = paired_written
  ds_a, ds_b = (json.loads((root / 'dataset.json').read_text()) for root in (a, b))
  assert ds_b['training'] == ds_a['training'] and ds_b['test'] == ds_a['test']
  assert ds_b['channel_names'] == {'0': 'T2'} and ds_b['modality'] == {'0': 'MRI'}
  source = ds_b['phantom']['paired_with']
  assert source['dataset'] == ds_a['name'] == 'Phantom_thorax_ct' and source['path'] == '../A'
  assert source['anatomy_shared'] is True and ds_b['phantom']['kind'] == 'thorax_t2w'
  assert _files(b) == _files(a)
  for split, entry in [('Tr', e) for e in ds_a['training']] + [('Ts', e) for e in ds_a['test']]:
    case = os.path.basename(entry['label'])[: -len('.nii.gz')]
    for path in (
      entry['label'],
      f'tissues{split}/{case}.nii.gz',
      f'instances{split}/{case}.nii.gz',
    ):
      x, y = nib.load(a / path), nib.load(b / path)
      assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), path
    x, y = nib.load(a / entry['image']), nib.load(b / entry['image'])
    assert np.array_equal(x.affine, y.affine) and x.header.get_zooms() == y.header.get_zooms()
    assert x.get_data_dtype() == np.int16 and y.get_data_dtype() == np.uint16
    meta = json.loads((b / 'phantom_meta' / f'{case}.json').read_text())
    assert meta['kind'] == 'thorax_t2w' and meta['paired_with']['case_id'] == case
  info = nifti_io.read_dataset(b)
  assert len(info.training) == 2 and len(info.test) == 1


@pytest.mark.parametrize(
  'kind, paired, fragment',
  [('abdomen_t1w', 'y', 'thorax kinds only'), ('thorax_ct', 'y/../x', 'other than out')],
)
def test_cli_bad_paired_out_exit_2_with_one_line(tmp_path, capsys, kind, paired, fragment):
  argv = ['--kind', kind, '--n', '1', '--out', str(tmp_path / 'x')]
  with pytest.raises(SystemExit) as e:
    P.main(argv + ['--paired-out', str(tmp_path / paired)])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('phantoms: error:') and fragment in err
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- CLI


def test_cli_writes_a_dataset(tmp_path, capsys):
  out = tmp_path / 'ct'
  assert (
    P.main(
      [
        '--kind',
        'thorax_ct',
        '--n',
        '1',
        '--n-test',
        '1',
        '--seed',
        '3',
        '--out',
        str(out),
        '--size',
        '64',
        '--spacing',
        '6',
        '--slices',
        '8',
      ]
    )
    == 0
  )
  assert 'wrote 1 training + 1 test thorax_ct cases' in capsys.readouterr().out
  ds = json.loads((out / 'dataset.json').read_text())
  assert ds['numTraining'] == 1 and nib.load(out / ds['training'][0]['image']).shape == (64, 64, 8)


@pytest.mark.parametrize(
  'args, fragment',
  [
    (['--kind', 'thorax_mri', '--n', '2'], 'invalid choice'),
    (['--kind', 'thorax_ct', '--n', '0'], 'must be >= 1'),
    (['--kind', 'thorax_ct', '--n', 'two'], 'expected an integer'),
    (['--kind', 'thorax_ct', '--spacing', '-1'], 'must be > 0'),
  ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, fragment):
  with pytest.raises(SystemExit) as e:
    P.main(args + ['--out', str(tmp_path / 'x')])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('phantoms: error:') and fragment in err
  assert not (tmp_path / 'x').exists()


def test_cli_unwritable_out_dir_exit_2(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'data_prep.phantoms',
      '--kind',
      'abdomen_t1w',
      '--n',
      '1',
      '--out',
      str(blocker / 'sub'),
    ],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1 and 'phantoms: error:' in proc.stderr
  assert str(blocker / 'sub') in proc.stderr and proc.stdout == ''
