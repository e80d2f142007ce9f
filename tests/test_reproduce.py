"""benchmarks/reproduce.py end to end on its tiny setting: phantoms -> training runs -> test
predictions -> per-case/per-tumor metrics -> RESULTS.md whose numbers come from the run dirs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
  root, out = tmp_path / 'study', tmp_path / 'docs' / 'RESULTS.md'
  cmd = [
    sys.executable,
    'benchmarks/reproduce.py',
    '--tiny',
    '--root',
    str(root),
    '--out',
    str(out),
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert '## 1. Informative teacher' in text and 'Tiny pipeline check' in text
  assert (tmp_path / 'docs' / 'RESULTS_figures' / 'main_dsc.png').stat().st_size > 1000
  assert (tmp_path / 'docs' / 'RESULTS_figures' / 'overlays.png').stat().st_size > 1000

  meta_dir = root / 'data' / 'phantoms' / 'thorax_ct' / 'phantom_meta'
  test_cases = sorted(
    p.name[: -len('.nii.gz')]
    for p in (root / 'data' / 'phantoms' / 'thorax_ct' / 'labelsTs').iterdir()
  )
  for method in ('student_only', 'cmedl'):
    run_dir = root / 'runs' / f'informative-{method}-s0'
    record = json.loads((run_dir / 'test_eval.json').read_text())
    assert sorted(r['case'] for r in record['case_rows']) == test_cases
    assert {f'{c}.nii.gz' for c in test_cases} <= set(os.listdir(run_dir / 'test_predictions'))
    # Each reference tumor got its type from the phantom's ground truth: per case the counts of
    # types equal the meta's (tiny tumors can merge or vanish on the grid, so at most).
    for case in test_cases:
      meta = json.loads((meta_dir / f'{case}.json').read_text())['tumors']
      rows = [t for t in record['tumor_rows'] if t['case'] == case]
      for kind in ('peripheral', 'juxta_mediastinal'):
        assert sum(t['type'] == kind for t in rows) <= sum(m['type'] == kind for m in meta)
      assert all(t['type'] in ('peripheral', 'juxta_mediastinal') for t in rows)
    # The table's mean DSC is the mean of the saved per-case values.
    mean = np.mean([float(r['dice']) for r in record['case_rows']])
    row = next(l for l in text.splitlines() if l.startswith(f'| {method} |'))
    assert re.search(rf'\| {mean:.3f}( ± [0-9.]+)? \|', row), (mean, row)
    run = json.loads((run_dir / 'study_run.json').read_text())
    assert run['returncode'] == 0 and 'configs/study.py:informative' in run['command']
    assert f'`{run["command"]}`' in text
  cmedl_row = next(l for l in text.splitlines() if l.startswith('| cmedl |'))
  assert '(n=3' in cmedl_row  # The case-paired Wilcoxon test used all test cases.

  # --report-only rebuilds the same report from the saved runs without training.
  before = text
  proc = subprocess.run(
    cmd + ['--report-only'], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'training' not in proc.stdout
  assert out.read_text() == before
