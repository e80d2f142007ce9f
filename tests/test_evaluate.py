"""Tests of cmedl_jax.evaluate and cmedl_jax.evaluation on tiny NIfTI folders written here."""

import csv
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from cmedl_jax import evaluate
from cmedl_jax.evaluation import cases
from cmedl_jax.evaluation import metrics
from cmedl_jax.evaluation import statistics
from data_prep import nifti_io

SPACING = (0.8, 0.8, 2.5)
SHAPE = (20, 20, 8)
CASES = ('case_001', 'case_002', 'case_003', 'case_004')


def affine(spacing=SPACING):
  a = np.diag(list(spacing) + [1.0])
  a[:3, 3] = (-10.0, 5.0, 2.0)
  return a


def save(path, data, aff=None, dtype=np.uint8):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data, dtype), affine() if aff is None else aff), path)


def reference(i):
  ref = np.zeros(SHAPE, np.uint8)
  ref[4 : 10 + i, 4:10, 2:6] = 1  # tumor
  if i % 2:
    ref[14:17, 14:18, 1:4] = 1  # a second tumor
  ref[12:18, 2:8, 2:7] = 2  # organ
  return ref


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  rng = np.random.default_rng(0)
  for i, cid in enumerate(CASES):
    ref = reference(i)
    save(f'{root}/ref/{cid}.nii.gz', ref)
    rater2 = ref.copy()
    rater2[4 : 10 + i, 10, 2:6] = 1  # second rater draws the tumor one voxel wider
    save(f'{root}/ref2/{cid}.nii.gz', rater2)
    pred_a = np.roll(ref, i % 3, axis=0)  # worse with i
    pred_a[0:2, 18:20, 0:2] = 1  # a false-positive blob
    save(f'{root}/pred_a/{cid}.nii.gz', pred_a)
    pred_b = np.roll(ref, 1 if i == 3 else 0, axis=1)
    save(f'{root}/pred_b/{cid}.nii.gz', pred_b)
    save(f'{root}/images/{cid}_0000.nii.gz', rng.normal(size=SHAPE), dtype=np.float32)
  with open(f'{root}/dataset.json', 'w') as f:
    json.dump({'labels': {'background': 0, 'tumor': 1, 'organ': 2}}, f)
  return root


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_cli_end_to_end(folders, capsys):
  out = folders / 'out'
  rc = evaluate.main(
    [
      '--pred',
      str(folders / 'pred_a'),
      '--pred-b',
      str(folders / 'pred_b'),
      '--ref',
      str(folders / 'ref'),
      '--ref',
      str(folders / 'ref2'),
      '--images',
      str(folders / 'images'),
      '--classes',
      str(folders / 'dataset.json'),
      '--tolerance-mm',
      '1.0',
      '--out',
      str(out),
    ]
  )
  assert rc == 0
  printed = capsys.readouterr().out
  assert '| pred_a | tumor | dice |' in printed

  rows = read_csv(out / 'cases.csv')
  assert len(rows) == 2 * len(CASES) * 2
  # Every value equals a direct call of the metrics on the same arrays.
  for row in rows:
    pred = nib.load(folders / row['method'] / f'{row["case"]}.nii.gz').get_fdata()
    ref = nib.load(folders / 'ref' / f'{row["case"]}.nii.gz').get_fdata()
    label = {'tumor': 1, 'organ': 2}[row['class']]
    expected = metrics.evaluate_pair(pred == label, ref == label, SPACING, 1.0)
    for m in metrics.METRIC_NAMES:
      assert float(row[m]) == pytest.approx(expected[m], rel=1e-12), (row, m)
    if row['method'] == 'pred_a' and row['class'] == 'tumor':
      assert row['n_fp_components'] == '1'

  tumors = read_csv(out / 'tumors.csv')
  n_tumors = sum(1 + (i % 2) for i in range(len(CASES)))
  assert len(tumors) == 2 * (n_tumors + len(CASES))  # tumors + one organ component each
  assert all(t['detected'] == 'True' for t in tumors)

  summary = json.loads((out / 'summary.json').read_text())
  # Wilcoxon p-values equal scipy on the paired CSV columns.
  by_key = {(r['method'], r['case'], r['class']): r for r in rows}
  for w in summary['wilcoxon']:
    if w['level'] != 'case' or w['metric'] != 'dice':
      continue
    a = [float(by_key['pred_a', c, w['class']]['dice']) for c in CASES]
    b = [float(by_key['pred_b', c, w['class']]['dice']) for c in CASES]
    assert w['p_value'] == pytest.approx(stats.wilcoxon(b, a).pvalue)
  stat = [
    s
    for s in summary['per_case']
    if (s['method'], s['class'], s['metric']) == ('pred_a', 'tumor', 'dice')
  ][0]
  values = [float(r['dice']) for r in rows if (r['method'], r['class']) == ('pred_a', 'tumor')]
  assert stat['mean'] == pytest.approx(np.mean(values))
  assert stat['sd'] == pytest.approx(np.std(values, ddof=1))
  assert stat['iqr'] == pytest.approx(np.subtract(*np.percentile(values, [75, 25])))
  det = {(d['method'], d['class']): d for d in summary['detection']}
  assert det['pred_a', 'tumor']['n_tumors'] == n_tumors
  assert det['pred_a', 'tumor']['n_fp_components'] == len(CASES)

  raters = read_csv(out / 'inter_rater.csv')
  pairs = {r['pair'] for r in raters}
  assert pairs == {
    'ref vs ref2',
    'pred_a vs ref',
    'pred_a vs ref2',
    'pred_b vs ref',
    'pred_b vs ref2',
  }
  organ = [r for r in raters if r['pair'] == 'ref vs ref2' and r['class'] == 'organ']
  assert all(float(r['dice']) == 1.0 for r in organ)  # raters agree on the organ

  plots = sorted(os.listdir(out / 'plots'))
  assert [p for p in plots if p.startswith('box_')] == sorted(
    f'box_{m}.png' for m in metrics.METRIC_NAMES
  )
  overlays = [p for p in plots if p.startswith('overlay_')]
  assert len(overlays) == 6 and 'overlay_pred_a_worst_case_003.png' in overlays
  with open(out / 'plots' / overlays[0], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert '## Paired tests' in (out / 'summary.md').read_text()
  assert not [p for p in os.listdir(out) + os.listdir(out / 'plots') if p.startswith('.tmp')]


def test_default_classes_and_python_api(folders, tmp_path):
  summary = evaluate.evaluate_dirs(
    str(folders / 'pred_b'),
    str(folders / 'ref'),
    str(tmp_path),
    plots=False,
    tumor_classes=['label_1'],
  )
  assert summary['settings']['classes'] == {'label_1': 1, 'label_2': 2}
  tumors = read_csv(tmp_path / 'tumors.csv')
  assert {t['class'] for t in tumors} == {'label_1'}


def test_shape_affine_and_missing_errors(folders, tmp_path):
  ref = reference(0)
  save(f'{tmp_path}/ref/a.nii.gz', ref)
  save(f'{tmp_path}/pred/a.nii.gz', ref[:, :, :-1])
  with pytest.raises(ValueError, match=r'shape mismatch: .*pred/a\.nii\.gz'):
    evaluate.evaluate_dirs(f'{tmp_path}/pred', f'{tmp_path}/ref', f'{tmp_path}/o', plots=False)
  save(f'{tmp_path}/pred/a.nii.gz', ref, aff=affine((0.8, 0.8, 3.0)))
  with pytest.raises(ValueError, match=r'affine mismatch.*pred/a\.nii\.gz'):
    evaluate.evaluate_dirs(f'{tmp_path}/pred', f'{tmp_path}/ref', f'{tmp_path}/o', plots=False)
  save(f'{tmp_path}/ref/b.nii.gz', ref)
  save(f'{tmp_path}/pred/a.nii.gz', ref)
  with pytest.raises(ValueError, match=r'no prediction for 1 reference case\(s\): b'):
    evaluate.evaluate_dirs(f'{tmp_path}/pred', f'{tmp_path}/ref', f'{tmp_path}/o', plots=False)
  assert (
    evaluate.main(
      [
        '--pred',
        f'{tmp_path}/pred',
        '--ref',
        f'{tmp_path}/ref',
        '--out',
        f'{tmp_path}/o',
        '--no-plots',
      ]
    )
    == 2
  )


def test_non_integer_labels_rejected(tmp_path):
  save(f'{tmp_path}/x.nii.gz', np.full(SHAPE, 0.5), dtype=np.float32)
  with pytest.raises(ValueError, match=r'x\.nii\.gz: label volume holds non-integer'):
    cases.load_nifti(f'{tmp_path}/x.nii.gz')
  save(f'{tmp_path}/y.nii.gz', np.full(SHAPE, 2.0), dtype=np.float32)
  data, spacing, _ = cases.load_nifti(f'{tmp_path}/y.nii.gz')
  assert data.dtype == np.uint8 and spacing == SPACING  # float32 zooms -> exact decimals


def test_case_ids_and_classes(tmp_path):
  assert nifti_io.case_id('lung_001.nii.gz') == 'lung_001'
  assert nifti_io.case_id('lung_001_0000.nii.gz', image=True) == 'lung_001'
  assert nifti_io.case_id('lung_001_0000.nii') == 'lung_001_0000'
  assert nifti_io.case_id('notes.txt') is None
  msd = tmp_path / 'msd.json'
  msd.write_text(json.dumps({'labels': {'0': 'background', '1': 'tumor', '2': 'heart'}}))
  assert cases.parse_classes(str(msd)) == {'tumor': 1, 'heart': 2}
  assert cases.parse_classes('tumor=1, liver=3') == {'tumor': 1, 'liver': 3}
  region = tmp_path / 'region.json'
  region.write_text(json.dumps({'labels': {'background': 0, 'whole': [1, 2]}}))
  with pytest.raises(ValueError, match='region'):
    cases.parse_classes(str(region))
  with pytest.raises(ValueError, match='name=label'):
    cases.parse_classes('tumor')


def test_describe_counts_inf_and_nan():
  d = statistics.describe([1.0, 2.0, math.inf, 4.0, float('nan')])
  assert (d['n'], d['n_finite'], d['n_inf'], d['n_nan']) == (5, 3, 1, 1)
  assert d['mean'] == pytest.approx(7 / 3)
  assert d['median'] == 2.0 and d['iqr'] == pytest.approx(1.5)
  assert math.isnan(statistics.describe([math.inf])['mean'])


def test_wilcoxon_handles_ties_and_nonfinite():
  rows_a = [{'case': c, 'class': 't', 'dice': v} for c, v in zip('abcd', [0.5, 0.6, 0.7, 0.8])]
  rows_b = [{'case': c, 'class': 't', 'dice': v} for c, v in zip('abcd', [0.5, 0.6, 0.7, 0.8])]
  [w] = statistics.wilcoxon_tests(rows_a, rows_b, ('case', 'class'), 'case', ('dice',))
  assert math.isnan(w['p_value']) and w['n_pairs'] == 4  # all differences zero
  rows_b[0]['dice'] = math.inf
  [w] = statistics.wilcoxon_tests(rows_a, rows_b, ('case', 'class'), 'case', ('dice',))
  assert w['n_pairs'] == 3 and w['n_excluded_nonfinite'] == 1


def test_labels_outside_the_classes_are_named_in_a_warning(folders, tmp_path, capsys):
  """Issue 21 item 4: a predicted label that is not among the classes was ignored silently."""
  pred = reference(0)
  pred[0:3, 0:3, 0:2] = 3  # 18 voxels of an undeclared label
  save(f'{tmp_path}/pred/case_001.nii.gz', pred)
  cases.evaluate_method(
    'm',
    {'case_001': f'{tmp_path}/pred/case_001.nii.gz'},
    {'case_001': f'{folders}/ref/case_001.nii.gz'},
    {'tumor': 1, 'organ': 2},
    tolerance_mm=1.0,
  )
  err = capsys.readouterr().err
  assert f'{tmp_path}/pred/case_001.nii.gz: labels [3] are not among' in err
  assert '18 voxels' in err
  assert 'ref/case_001' not in err  # The reference has only declared labels.


def test_seed_level_test_against_hand_computed_values():
  """Differences 0.1, 0.2, -0.05: of the 8 sign patterns, 4 have |sum| >= 0.25 (0.35, 0.25,
  -0.25, -0.35), so p = 0.5; mean 1/12, sd 0.125831, t(0.975, 2 df) = 4.302653."""
  got = statistics.seed_level_test([0.1, 0.2, -0.05])
  assert got['n_seeds'] == 3 and got['p'] == pytest.approx(0.5)
  assert got['differences'] == [0.1, 0.2, -0.05]  # What was tested, for tables and figures.
  half = 4.302653 * 0.125831 / math.sqrt(3)
  assert got['mean'] == pytest.approx(1 / 12)
  assert got['low'] == pytest.approx(1 / 12 - half, abs=1e-5)
  assert got['high'] == pytest.approx(1 / 12 + half, abs=1e-5)
  assert got['decision'] == 'inconclusive'
  # Six seeds all positive: only the all-plus and all-minus patterns reach |mean|: p = 2/64.
  six = statistics.seed_level_test([0.03, 0.05, 0.04, 0.06, 0.02, 0.05])
  assert six['p'] == pytest.approx(2 / 64) and six['decision'] == 'reproduced'
  tight = statistics.seed_level_test([0.001, -0.002, 0.0, 0.003, -0.001, 0.001])
  assert tight['high'] < statistics.MARGIN_DSC and tight['decision'] == 'not reproduced'
  assert math.isnan(statistics.seed_level_test([0.1])['p'])


def test_holm_against_hand_computed_values():
  # Sorted 0.01, 0.03, 0.04: 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; max(0.06, 1 * 0.04) = 0.06.
  assert statistics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  got = statistics.holm([0.5, float('nan'), 0.2])  # NaN is not counted: two tests.
  assert got[0] == pytest.approx(0.5) and math.isnan(got[1]) and got[2] == pytest.approx(0.4)
  assert statistics.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_primary_decisions_apply_holm_over_the_settings():
  """Eight seeds all positive: sign-flip p = 2/256 = 0.0078125; six all positive: p = 2/64 =
  0.03125. Holm over the three: 3 * 0.0078125 = 0.0234, 2 * 0.03125 = 0.0625, then max(0.0625,
  1 * p_third). The six-seed setting's interval lies above 0, but its Holm p does not pass."""
  eight = [0.03, 0.05, 0.04, 0.06, 0.02, 0.05, 0.04, 0.03]
  six = [0.03, 0.05, 0.04, 0.06, 0.02, 0.05]
  null = [0.001, -0.002, 0.0, 0.003, -0.001, 0.001]
  got = statistics.primary_decisions({'informative': eight, 'weak': six, 'equal': null})
  assert got['informative']['p'] == pytest.approx(2 / 256)
  assert got['informative']['p_holm'] == pytest.approx(3 * 2 / 256)
  assert got['weak']['p_holm'] == pytest.approx(2 * 2 / 64)
  assert got['equal']['p_holm'] == pytest.approx(max(2 * 2 / 64, got['equal']['p']))
  assert got['weak']['low'] > 0
  assert [got[k]['decision'] for k in ('informative', 'weak', 'equal')] == [
    'reproduced',
    'inconclusive',
    'not reproduced',
  ]
