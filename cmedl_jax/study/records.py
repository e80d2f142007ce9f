"""A run's records (RESULTS_runs/NAME/: config.json, study_run.json, validation.json,
test_eval.json, test_eval_teacher.json, environment.json), loading them and the per-record values
the report is built from (mean test DSC per run, per tumour type, per organ, ...)."""

from __future__ import annotations

import json
import os

import numpy as np

from cmedl_jax import environment
from cmedl_jax.evaluation import report as eval_report
from cmedl_jax.study import plan
from data_prep import files

RECORD_FILES = ('config.json', 'study_run.json', 'validation.json', 'test_eval.json')
TEACHER_RECORD = 'test_eval_teacher.json'
ENVIRONMENT_RECORD = environment.FILE


def record_files(r):
  if r['method'] == 'stage1':  # A translator alone: nothing to test.
    return RECORD_FILES[:2]
  return RECORD_FILES + (TEACHER_RECORD,) * plan.has_teacher(r)


def recorded(r, records_dir):
  """True when the run's records are in RECORD_DIR/NAME/ (the run is done)."""
  return all(os.path.isfile(f'{records_dir}/{r["name"]}/{f}') for f in record_files(r))


def write_json(path, obj):
  """Writes obj as JSON atomically (inf/NaN as strings, as cmedl_jax.evaluation.report does)."""
  files.write_json(path, eval_report.json_safe(obj))


def _num(x):
  return float(x) if not isinstance(x, str) else {'nan': np.nan, 'inf': np.inf}.get(x, np.nan)


def load_records(runs, records_dir):
  """{name: {'eval', 'teacher', 'run', 'validation'}} of the runs whose records exist, with
  the runs they require (two-stage's stage 1: 'run' and 'environment' only)."""
  out = {}
  for r in [q for run_ in runs for q in (run_['requires'], run_) if q]:
    if r['name'] in out or not recorded(r, records_dir):
      continue
    loaded = {}
    for key, f in (
      ('eval', 'test_eval.json'),
      ('run', 'study_run.json'),
      ('validation', 'validation.json'),
      ('teacher', TEACHER_RECORD),
      ('environment', ENVIRONMENT_RECORD),
    ):
      path = f'{records_dir}/{r["name"]}/{f}'
      if os.path.isfile(path):
        with open(path) as fh:
          loaded[key] = json.load(fh)
    out[r['name']] = loaded
  return out


def case_dsc(record):
  """The primary value of a run: mean over test cases of the case's DSC (mean over classes)."""
  per_case = {}
  for row in record['case_rows']:
    per_case.setdefault(row['case'], []).append(_num(row['dice']))
  return float(np.mean([np.mean(v) for v in per_case.values()]))


def tumor_dsc(record, kind):
  """Mean DSC of the reference tumours of type `kind` (juxta_mediastinal | peripheral)."""
  values = [_num(t['dice']) for t in record['tumor_rows'] if t.get('type') == kind]
  return float(np.mean(values)) if values else float('nan')


def record_classes(record):
  """The classes of a test record's case rows, in their order (the equal setting's organs)."""
  return tuple(dict.fromkeys(row['class'] for row in record['case_rows']))


def run_cpus(record):
  """The CPU models a recorded run trained on ({current} and any resumed-from), 'unknown' for
  one it could not name (None would not sort beside names); None without environment.json."""
  env = record.get('environment')
  if env is None:
    return None
  return {e.get('cpu') or 'unknown' for e in [env['current']] + env.get('history', [])}


def class_dsc(record, cls):
  """Mean over test cases of class `cls`'s DSC (the equal setting's organs)."""
  return float(np.mean([_num(r['dice']) for r in record['case_rows'] if r['class'] == cls]))


def detection_rate(record):
  rows = record['tumor_rows']
  return float(np.mean([bool(t['detected']) for t in rows])) if rows else float('nan')


def fp_per_case(record):
  return float(np.mean([_num(r['n_fp_components']) for r in record['case_rows']]))


def hd95_median(record):
  """Median per-case HD95 in mm (inf, an empty prediction, counts as the largest)."""
  return float(np.median([_num(r['hd95']) for r in record['case_rows']]))


def values(runs, records, value, key='eval', **select):
  """{seed: value(record)} over the recorded runs whose fields equal `select`."""
  out = {}
  for r in runs:
    record = records.get(r['name'], {}).get(key)
    if record is not None and all(r[k] == v for k, v in select.items()):
      out[r['seed']] = value(record)
  return out


def paired(a, b):
  """(seeds, b - a per seed) over the seeds both {seed: value} have."""
  seeds = sorted(set(a) & set(b))
  return seeds, [b[s] - a[s] for s in seeds]


def validation_curves(runs, records, setting, arm, tag='val_dsc'):
  """{seed: {step: value of `tag`}} of the setting's primary runs of `arm` (validation.json)."""
  return values(
    runs,
    records,
    lambda v: {e['step']: _num(e.get(tag, 'nan')) for e in v},
    key='validation',
    group='primary',
    setting=setting,
    arm=arm,
  )
