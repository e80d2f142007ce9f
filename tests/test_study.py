"""cmedl_jax.study: the study's report from run records (fast), and its tiny setting end
to end: phantoms -> training runs -> test predictions -> per-case/per-tumour metrics -> records
in RESULTS_runs/ -> RESULTS.md whose numbers come from those records."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cmedl_jax.study import __main__ as study_main
from cmedl_jax.study import comparisons
from cmedl_jax.study import plan
from cmedl_jax.study import records as study_records
from cmedl_jax.study import report
from cmedl_jax.study import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-seed CMEDL gains: informative all positive (reproduced), weak inside +-0.003 (not
# reproduced), equal mixed and wide (inconclusive).
GAINS = {
  'informative': [0.03, 0.05, 0.04, 0.06, 0.02, 0.05, 0.04, 0.03],
  'weak': [0.001, -0.002, 0.0, 0.003, -0.001, 0.001, 0.002, -0.001],
  'equal': [0.1, -0.08, 0.05, -0.06, 0.09, -0.02, 0.07, 0.0],
}


def _record(dsc, cases=('a', 'b'), classes=('tumor',)):
  # Two cases whose DSCs average to `dsc` (each class of a case: the case's DSC); one tumour of
  # each type per case.
  case_rows = [
    dict(case=c, dice=dsc + s, hd95=5.0, n_fp_components=1, **{'class': k})
    for c, s in zip(cases, (-0.1, 0.1))
    for k in classes
  ]
  tumor_rows = [
    dict(case=c, dice=dsc, detected=True, type=t)
    for c in cases
    for t in ('juxta_mediastinal', 'peripheral')
  ]
  return dict(case_rows=case_rows, tumor_rows=tumor_rows)


def test_report_decides_each_setting_from_the_seed_level_differences(tmp_path):
  records = {}
  for r in plan.plan_runs():
    if r['group'] != 'primary':
      continue
    gain = GAINS[r['setting']][r['seed']] if r['arm'] == 'cmedl' else 0.0
    organs = ('liver', 'spleen') if r['setting'] == 'equal' else ('tumor',)
    records[r['name']] = dict(
      eval=_record(0.6 + gain, classes=organs),
      teacher=_record(0.5) if r['arm'] == 'cmedl' else None,
      run=dict(seconds=60.0, commit='abc1234', machine='x86_64 2 CPU cores (ci)'),
      validation=[dict(step=250, val_dsc=0.5 + gain, val_teacher_dsc=0.4)],
    )
  # One run resumed on another CPU: both models are said (runs per model).
  cpus = [dict(cpu='CPU A'), dict(cpu='CPU B')]
  records['weak-cmedl-s0']['environment'] = dict(current=cpus[1], history=cpus)
  out = tmp_path / 'RESULTS.md'
  report.build_report(str(out), plan.plan_runs(), records, tiny=False)
  text = out.read_text()
  assert 'runs per model:\nCPU A (1), CPU B (1); 47 earlier runs did not record' in text
  primary = text.split('## Primary endpoint')[1].split('##')[0]
  rows = {l.split('|')[1].strip(): l for l in primary.splitlines() if l.startswith('| ')}
  # Eight positive seeds: sign-flip p = 2/256; Holm x3 = 0.0234 (statistics tests the values).
  assert '**reproduced**' in rows['informative'] and '| 0.0078 | 0.0234 |' in rows['informative']
  assert '+0.040 [' in rows['informative'] and 's7 +0.030' in rows['informative']
  assert '**not reproduced**' in rows['weak']
  assert '**inconclusive**' in rows['equal']
  # The equal setting's organs each get a secondary row: CMEDL's mean gain over the 8 seeds.
  assert '| equal | spleen DSC | 0.600 ± 0.000 (8) | 0.619 ± 0.069 (8) | +0.019 [' in text
  assert '48 of 82 planned runs' in text and 'Still to run: factorial, sensitivity' in text
  assert (tmp_path / 'RESULTS_figures' / 'paired_differences.png').stat().st_size > 1000
  # Validation curves, CMEDL minus the student alone per step: mean over seeds, seeds above 0.
  assert '| informative | +0.040 (8/8) |' in text and '| weak | +0.000 (4/8) |' in text
  assert (tmp_path / 'RESULTS_figures' / 'validation_curves.png').stat().st_size > 1000
  # The plan's equal-setting length check (organs 0.6 each on test, validation mean 0.5) and the
  # pair trained on different CPUs are said under Deviations.
  deviations = ' '.join(text.split('## Deviations')[1].split())
  assert 'lowest final value over seeds 0.500' in deviations
  assert "any seed's student alone is 0.600, above 0.5" in deviations
  assert 'the arm: weak-cmedl-s0 (unrecorded / CPU A, CPU B).' in deviations

  # The plan's one extension (seeds 8-11) enters the same decision and is said.
  runs = plan.plan_runs(extended={'equal'})
  for r in runs:
    if r['setting'] == 'equal' and r['seed'] >= 8:
      records[r['name']] = dict(records[f'equal-{r["arm"]}-s0'])
  report.build_report(str(out), runs, records, tiny=False)
  text = out.read_text()
  assert '| equal | 12 |' in text and 'equal: seeds 8-11 added once' in text

  # The factorial: CMEDL +0.01 in every cell; the self-distillation control -0.02 in cue/scarce,
  # both said in the discussion.
  for r in runs:
    if r['group'] == 'factorial':
      gain = {'student_only': 0.0, 'cmedl': 0.01, 'self_distill': -0.02}[r['arm']]
      records[r['name']] = dict(records['informative-student_only-s0'], eval=_record(0.6 + gain))
  report.build_report(str(out), runs, records, tiny=False)
  text = out.read_text()
  assert 'per cell: none/rich +0.045 [' in text and 'cue/scarce +0.010 [' in text
  assert 'without the MRI side) minus the student alone: cue/scarce -0.020 [' in text

  # A run whose CPU could not be named counts as 'unknown'.
  records['factorial-cue-scarce-cmedl-s0']['environment'] = dict(current=dict(cpu=None))
  report.build_report(str(out), runs, records, tiny=False)
  assert 'CPU A (1), CPU B (1), unknown (1);' in out.read_text()


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
  root, out = tmp_path / 'study', tmp_path / 'docs' / 'RESULTS.md'
  cmd = [sys.executable, '-m', 'cmedl_jax.study', '--tiny', '--root', str(root), '--out', str(out)]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert '## Primary endpoint and decisions' in text and 'Tiny pipeline check' in text
  assert (tmp_path / 'docs' / 'RESULTS_figures' / 'validation_curves.png').stat().st_size > 1000

  records = tmp_path / 'docs' / 'RESULTS_runs'
  meta_dir = root / 'data' / 'phantoms' / 'thorax_ct' / 'phantom_meta'
  test_cases = sorted(
    p.name[: -len('.nii.gz')]
    for p in (root / 'data' / 'phantoms' / 'thorax_ct' / 'labelsTs').iterdir()
  )
  for method in ('student_only', 'cmedl'):
    name = f'informative-{method}-s0'
    run_dir = root / 'runs' / name
    record = json.loads((records / name / 'test_eval.json').read_text())
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
    # The run table's test DSC is the mean of the recorded per-case values.
    mean = np.mean([float(r['dice']) for r in record['case_rows']])
    row = next(l for l in text.splitlines() if l.startswith(f'| {name} |'))
    assert f'| {mean:.3f} |' in row, (mean, row)
    run = json.loads((records / name / 'study_run.json').read_text())
    assert run['returncode'] == 0 and 'configs/study.py:informative' in run['command']
    env = json.loads((records / name / 'environment.json').read_text())
    assert env['current']['cpu'] and env['current']['packages']['jax']
  assert f'{env["current"]["cpu"]} (' in text
  assert (records / 'informative-cmedl-s0' / 'test_eval_teacher.json').is_file()
  assert re.search(r'\| informative \| 1 \| s0 [+-]\d\.\d{3} \|', text)

  # Recorded runs are done: without their run directories, nothing is trained again, and the
  # report (from the records alone) is the same.
  shutil.rmtree(root / 'runs')
  before = text
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'training' not in proc.stdout and not (root / 'runs').exists()
  assert out.read_text() == before


def test_ablations_are_reported_beside_the_plan_and_two_stage_trains_its_stage1_first(
  tmp_path, monkeypatch
):
  runs = plan.plan_runs() + plan.ablation_runs()
  records = {}
  for r in runs:
    if r['group'] not in ('primary', 'ablation') or r['setting'] != 'informative':
      continue
    dsc = {'student_only': 0.6, 'cmedl': 0.62, 'kl': 0.5}.get(r['arm'], 0.61) + 0.01 * r['seed']
    records[r['name']] = dict(
      eval=_record(dsc),
      teacher=_record(0.5) if plan.has_teacher(r) else None,
      run=dict(seconds=60.0, commit='abc1234', machine='x86_64 2 CPU cores (ci)'),
      validation=[dict(step=250, val_dsc=0.5, val_teacher_dsc=0.4)],
    )
    if r['requires']:  # Two-stage's stage 1 records its training time only.
      records[r['requires']['name']] = dict(run=dict(seconds=60.0, commit='abc1234'))
  out = tmp_path / 'RESULTS.md'
  report.build_report(str(out), runs, records, tiny=False)
  text = out.read_text()
  # The training minutes count stage 1: 16 + 15 + 3 runs of 1 min.
  assert (
    '16 of 82 planned runs** and 15 of 15 exploratory ablation runs (with 3 translator-only '
    'stage-1 runs) recorded (34 min of'
  ) in ' '.join(text.split())
  section = text.split('## Ablations')[1].split('\n## ')[0]
  rows = {l.split('|')[1].strip(): l for l in section.splitlines() if l.startswith('| ')}
  assert set(plan.ABLATIONS) <= set(rows)
  # kl: 0.5 + 0.01 s against 0.6 + 0.01 s (student alone) and 0.62 + 0.01 s (CMEDL), seeds 0-2.
  assert (
    '| 3 | 0.510 ± 0.010 (3) | -0.100 [-0.100, -0.100] | -0.120 [-0.120, -0.120] |' in (rows['kl'])
  )
  assert 'Added after the plan' in text.split('## Deviations')[1]
  # A figure of each exploratory arm's per-seed differences against CMEDL with the defaults.
  assert '(RESULTS_figures/exploratory_differences.png)' in text.split('## Figures')[1]
  assert (tmp_path / 'RESULTS_figures' / 'exploratory_differences.png').stat().st_size > 0
  # The discussion says each exploratory arm against CMEDL, and the teacher against its student
  # (0.5 against 0.5 + 0.01 s for kl: differences 0, -0.01, -0.02, sd 0.01, half-width
  # t(0.975, 2) 4.302653 * 0.01 / sqrt(3) = 0.0248).
  discussion = text.split('## Discussion')[1]
  assert 'kl -0.120 [-0.120, -0.120] (3 seeds, below 0)' in discussion
  assert (
    'kl -0.010 [-0.035, +0.015] (3 seeds, includes 0)' in discussion
    and "in no arm does the teacher's mean reach its student's" in discussion
  )

  # Two-stage: stage 1 (a translator alone: config and run records only) is trained first, in
  # the same job, and stage 2 loads its translator from stage 1's workdir.
  two_stage = next(r for r in runs if r['name'] == 'ablation-two_stage-s1')
  root, records_dir, trained = str(tmp_path / 'study'), str(tmp_path / 'records'), []
  assert f'--config.method.translator_init={root}/runs/ablation-two_stage-s1-stage1' in (
    runner.train_command(two_stage, root, {})
  )

  def fake_run(r, *args, **kwargs):
    del args, kwargs
    name = r['name'].split('#')[0]
    trained.append(r['name'])
    for f in study_records.RECORD_FILES + (study_records.TEACHER_RECORD,):
      (tmp_path / 'study' / 'runs' / name).mkdir(parents=True, exist_ok=True)
      (tmp_path / 'study' / 'runs' / name / f).write_text('{}')

  monkeypatch.setattr(runner, 'train', fake_run)
  monkeypatch.setattr(runner, 'test_run', fake_run)
  runner.complete(two_stage, root, records_dir, {})
  assert trained == [
    'ablation-two_stage-s1-stage1',
    'ablation-two_stage-s1',
    'ablation-two_stage-s1',
    'ablation-two_stage-s1#teacher',
  ]
  assert sorted(os.listdir(f'{records_dir}/ablation-two_stage-s1-stage1')) == [
    'config.json',
    'study_run.json',
  ]
  assert study_records.recorded(two_stage, records_dir)
  assert set(study_records.load_records([two_stage], records_dir)) == {
    'ablation-two_stage-s1-stage1',
    'ablation-two_stage-s1',
  }


def _write_records(run_dir, dsc):
  """The small records of a finished run whose student has mean test DSC `dsc`."""
  run_dir.mkdir(parents=True, exist_ok=True)
  for f, obj in (
    ('test_eval.json', _record(dsc)),
    ('test_eval_teacher.json', _record(0.5)),
    ('study_run.json', dict(seconds=60.0)),
    ('validation.json', []),
    ('config.json', {}),
  ):
    (run_dir / f).write_text(json.dumps(obj))


def test_extend_auto_takes_the_inconclusive_settings_and_trains_them_after_the_plan(tmp_path):
  records_dir = tmp_path / 'RESULTS_runs'
  for r in plan.plan_runs():
    if r['group'] == 'primary' and not (r['setting'] == 'weak' and r['seed'] == 7):
      gain = GAINS[r['setting']][r['seed']] if r['arm'] == 'cmedl' else 0.0
      _write_records(records_dir / r['name'], 0.6 + gain)
  # Informative is reproduced, equal inconclusive; weak lacks a seed (no first decision yet).
  assert comparisons.inconclusive_settings(str(records_dir)) == {'equal'}
  runs = plan.plan_runs({'equal'}) + plan.ablation_runs()
  todo = sorted(
    (r for r in runs if not study_records.recorded(r, str(records_dir))), key=plan.training_order
  )
  names = [r['name'] for r in todo]
  assert names[:2] == ['weak-student_only-s7', 'weak-cmedl-s7']
  extension = [n for n in names if n.startswith('equal-')]
  assert extension == [f'equal-{a}-s{s}' for s in range(8, 12) for a in ('student_only', 'cmedl')]
  first_extension = names.index('equal-student_only-s8')
  assert names[first_extension - 1] == 'sensitivity-cmedl_authors-s2'
  assert all(n.startswith('ablation-') for n in names[first_extension + 8 :])
  assert len(names) == first_extension + 8 + 15


def test_the_report_counts_an_extension_once_either_arm_of_an_extra_seed_is_recorded(tmp_path):
  _write_records(tmp_path / 'RESULTS_runs' / 'equal-student_only-s8', 0.6)
  study_main.main(['--report-only', '--out', str(tmp_path / 'RESULTS.md')])
  planned = [r for r in plan.plan_runs({'equal'}) if r['group'] != 'ablation']
  assert len(planned) == len(plan.plan_runs()) + 8
  text = (tmp_path / 'RESULTS.md').read_text()
  assert f'**1 of {len(planned)} planned runs**' in text
  assert 'Still to run: primary' in text


@pytest.mark.slow
def test_the_committed_reports_rebuild_from_their_committed_records(tmp_path):
  """docs/RESULTS.md and docs/PILOT.md are what the study package writes from the records
  committed beside them (apart from RESULTS.md's commit and date, lines 3-4)."""
  for records in ('RESULTS_runs', 'PILOT_runs'):
    shutil.copytree(os.path.join(REPO, 'docs', records), tmp_path / records)
  for cmd in (
    ['cmedl_jax.study', '--report-only', f'--out={tmp_path}/RESULTS.md'],
    ['cmedl_jax.study.pilot', '--report-only', f'--out={tmp_path}/PILOT.md']
    + [f'--records={tmp_path}/PILOT_runs'],
  ):
    done = subprocess.run(
      [sys.executable, '-m', *cmd], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
  for name, header in (('RESULTS.md', {2, 3}), ('PILOT.md', set())):
    with open(os.path.join(REPO, 'docs', name)) as f:
      want = f.read().splitlines()
    got = (tmp_path / name).read_text().splitlines()
    assert len(got) == len(want), name
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert set(differ) <= header, (name, [(i + 1, got[i], want[i]) for i in differ[:5]])
