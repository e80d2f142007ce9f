"""The paper's comparisons on the phantom benchmark: trains, predicts, evaluates, writes a report.

  python benchmarks/reproduce.py                      # the study -> docs/RESULTS.md (~1 h, 2 cores)
  python benchmarks/reproduce.py --report-only        # rebuild the report from the saved runs
  python benchmarks/reproduce.py --tiny --root /tmp/s --out /tmp/s/RESULTS.md   # pipeline check

Every run is a `python -m cmedl_jax.main --config=configs/study.py:...` command (listed in the
report and saved with its wall time in ROOT/runs/NAME/study_run.json); a run directory that
already holds a finished run is not trained again, so an interrupted study continues where it
stopped. Test-set predictions (the final model of each run, no selection on the test set) go
to ROOT/runs/NAME/test_predictions/, their per-case and per-tumor metrics to
ROOT/runs/NAME/test_eval.json (and, for CMEDL runs, the teacher's on pseudo-target images:
test_predictions_teacher/, test_eval_teacher.json); every number in the report comes from them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cmedl_jax.evaluation import cases as eval_cases  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmedl_jax.evaluation import metrics as seg_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmedl_jax.evaluation import plots as eval_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmedl_jax.evaluation import report as eval_report  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmedl_jax.evaluation import statistics as eval_stats  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import study  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_prep import nifti_io  # pylint: disable=g-import-not-at-top,wrong-import-position

# Phantom sets: kind -> (training cases, test cases, seed). CT and MRI never share patients.
DATASETS = {
  'thorax_ct': (30, 10, 0),
  'thorax_t2w': (24, 8, 1),
  'abdomen_t1w': (20, 8, 2),
  'abdomen_t2w': (20, 4, 3),
}
TINY_DATASETS = {'thorax_ct': (6, 3, 0), 'thorax_t2w': (6, 2, 1)}
TINY_PHANTOM_GRID = dict(size=48, spacing=8.0, slices=12)
# The tiny check's networks are those of configs/tiny.py (a pipeline check, not a study).
TINY_OVERRIDES = {
  'data.image_size': 32,
  'data.spacing_mm': 12.0,
  'train.num_steps': 4,
  'eval.batch_size': 8,
  'model.student.base_width': 4,
  'model.student.depth': 2,
  'model.teacher.base_width': 4,
  'model.teacher.depth': 2,
  'model.translator.ngf': 4,
  'model.translator.n_blocks': 1,
  'model.discriminator.ndf': 4,
  'method.contextual_points': 64,
}
SOURCE_KIND = {'informative': 'thorax_ct', 'weak': 'thorax_t2w', 'equal': 'abdomen_t1w'}
TEACHER_KIND = {'informative': 'thorax_t2w', 'weak': 'thorax_ct', 'equal': 'abdomen_t2w'}
PAPER = (
  'The paper (377 CT and 82 T2w MRI of different patients, 609 test tumors, full-size '
  'networks) reports CMEDL significantly (p < 0.001) more accurate than the non-CMEDL '
  'methods: DSC 0.77 vs 0.73 for lung tumors on CT with a T2w teacher, 0.84 vs 0.81 on '
  'MRI with a CT teacher, and 0.90 vs 0.88 for MRI multi-organ segmentation with an MRI '
  'teacher.'
)


def run(name, group, setting, method, seg='unet', i2i='cyclegan', seed=0, **overrides):
  """One training run of the study: a config arg of configs/study.py plus overrides."""
  return dict(
    name=name,
    group=group,
    setting=setting,
    method=method,
    seg=seg,
    i2i=i2i,
    seed=seed,
    overrides={'seed': seed, **overrides},
  )


def study_runs():
  """All runs, most important first (a partial study still answers question 1)."""
  runs = []
  for seed in (0, 1, 2):
    runs += [
      run(f'informative-student_only-s{seed}', 'main', 'informative', 'student_only', seed=seed),
      run(f'informative-cmedl-s{seed}', 'main', 'informative', 'cmedl', seed=seed),
    ]
    if seed < 2:
      runs += [
        run(f'informative-two_channel-s{seed}', 'main', 'informative', 'two_channel', seed=seed),
        run(f'informative-pmri_teacher-s{seed}', 'main', 'informative', 'pmri_teacher', seed=seed),
      ]
  runs += [
    run('arch-unet-cut-cmedl', 'arch', 'informative', 'cmedl', i2i='cut'),
    run('arch-densefcn-student_only', 'arch', 'informative', 'student_only', 'densefcn'),
    run('arch-densefcn-cyclegan-cmedl', 'arch', 'informative', 'cmedl', 'densefcn'),
    run('arch-pspnet-student_only', 'arch', 'informative', 'student_only', 'pspnet'),
    run('arch-pspnet-cyclegan-cmedl', 'arch', 'informative', 'cmedl', 'pspnet'),
    run('weak-student_only', 'weak', 'weak', 'student_only'),
    run('weak-cmedl', 'weak', 'weak', 'cmedl'),
    run('equal-student_only', 'equal', 'equal', 'student_only'),
    run('equal-cmedl', 'equal', 'equal', 'cmedl'),
    run('ablation-distill_none', 'ablation', 'informative', 'cmedl', **{'method.distill': 'none'}),
    run('ablation-distill_kl', 'ablation', 'informative', 'cmedl', **{'method.distill': 'kl'}),
    run(
      'ablation-taps_last', 'ablation', 'informative', 'cmedl', **{'method.hint_taps': ('last',)}
    ),
    run(
      'ablation-teacher_grad',
      'ablation',
      'informative',
      'cmedl',
      **{'method.hint_trains_teacher': True, 'method.hint_trains_translator': True},
    ),
    run('ablation-two_stage-stage1', 'ablation', 'informative', 'stage1'),
    run(
      'ablation-two_stage',
      'ablation',
      'informative',
      'stage2',
      **{'method.translator_init': '{root}/runs/ablation-two_stage-stage1'},
    ),
  ]
  return runs


def tiny_runs():
  return [
    run('informative-student_only-s0', 'main', 'informative', 'student_only'),
    run('informative-cmedl-s0', 'main', 'informative', 'cmedl'),
  ]


# ------------------------------------------------------------------------------- running


def _flag_value(value):
  return repr(value) if isinstance(value, tuple) else str(value)


def train_command(r, root, extra):
  """The exact `cmedl_jax.main` command line (a list) of run `r`."""
  arg = f'{r["setting"]},{r["method"]},{r["seg"]},{r["i2i"]}'
  cmd = [
    sys.executable,
    '-m',
    'cmedl_jax.main',
    f'--config=configs/study.py:{arg}',
    f'--workdir={root}/runs/{r["name"]}',
  ]
  overrides = dict(r['overrides'])
  if os.path.normpath(root) != os.path.normpath(study.ROOT):
    for side in ('source', 'target'):
      kind = (SOURCE_KIND if side == 'source' else TEACHER_KIND)[r['setting']]
      overrides[f'data.{side}.raw_dir'] = f'{root}/data/phantoms/{kind}'
      overrides[f'data.{side}.prepared_dir'] = f'{root}/data/prepared/{kind}'
  overrides.update(extra)
  for key, value in overrides.items():
    value = value.format(root=root) if isinstance(value, str) else value
    cmd.append(f'--config.{key}={_flag_value(value)}')
  return cmd


def shown(cmd):
  return ' '.join(shlex.quote(c) for c in ['python'] + cmd[1:])


def finished(r, root):
  workdir = f'{root}/runs/{r["name"]}'
  if r['method'] == 'stage1':
    return os.path.isfile(f'{workdir}/study_run.json')
  return os.path.isdir(f'{workdir}/export') and os.path.isfile(f'{workdir}/study_run.json')


def write_phantoms(root, datasets, grid):
  from data_prep import phantoms  # pylint: disable=g-import-not-at-top

  for kind, (n_train, n_test, seed) in datasets.items():
    out = f'{root}/data/phantoms/{kind}'
    if os.path.isfile(f'{out}/dataset.json'):
      continue
    print(f'reproduce: writing {n_train}+{n_test} {kind} phantoms to {out}', flush=True)
    phantoms.write_dataset(kind, n_train, seed, out, n_test=n_test, **grid)


def train(r, root, extra, core=None):
  """Trains run `r` unless finished; the log goes to RUN/train.log. core: pin the run to this
  CPU core (its compiled programs then come from and go to ROOT/jax_cache, which runs of the
  same method and size share)."""
  workdir = f'{root}/runs/{r["name"]}'
  if finished(r, root):
    return
  os.makedirs(workdir, exist_ok=True)
  cmd = train_command(r, root, extra)
  print(f'reproduce: training {r["name"]}: {shown(cmd)}', flush=True)
  env, pin = None, None
  if core is not None:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.abspath(f'{root}/jax_cache'))
    pin = functools.partial(os.sched_setaffinity, 0, {core})
  t0 = time.time()
  with open(f'{workdir}/train.log', 'a') as log:
    rc = subprocess.call(
      cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin
    )
  seconds = time.time() - t0
  if rc != 0:
    raise RuntimeError(f'run {r["name"]} failed (exit {rc}); see {workdir}/train.log')
  write_json(
    f'{workdir}/study_run.json',
    {
      'command': shown(cmd),
      'seconds': round(seconds, 1),
      'returncode': rc,
      'commit': _git_commit(),
    },
  )
  print(f'reproduce: {r["name"]} done in {seconds:.0f} s', flush=True)


def train_all(runs, root, extra, jobs=1):
  """Trains the unfinished `runs`; returns the names of those that failed.

  jobs > 1: that many runs at once, each pinned to its own core (the study's small steps use
  a second core poorly, two runs use both: benchmarks/study_throughput.py), sharing compiled
  programs through ROOT/jax_cache; runs that start from another run (stage 2) wait for all
  others.
  """
  failed = []

  def one(r, core=None):
    try:
      train(r, root, extra, core)
    except RuntimeError as e:  # Report it and go on with the other runs.
      print(f'reproduce: {e}', file=sys.stderr, flush=True)
      failed.append(r['name'])

  if jobs <= 1:
    for r in runs:
      one(r)
    return failed
  cores = sorted(os.sched_getaffinity(0))
  later = [r for r in runs if any('{root}/runs/' in str(v) for v in r['overrides'].values())]
  first = [r for r in runs if r not in later]
  for batch in (first, later):
    free = queue.Queue()
    for k in range(min(jobs, len(cores))):
      free.put(cores[k])

    def pinned(r):
      core = free.get()
      try:
        one(r, core)
      finally:
        free.put(core)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      list(pool.map(pinned, batch))
  return failed


def write_json(path, obj):
  """Writes obj as JSON atomically (inf/NaN as strings, as cmedl_jax.evaluation.report does)."""
  nifti_io.write_json(path, eval_report.json_safe(obj))


def tumor_types(dataset_dir, case, ref):
  """Type ('peripheral' | 'juxta_mediastinal') of each reference component, in the order of
  metrics.evaluate_tumors (raster order of the 26-connected components of `ref`)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  meta_path = f'{dataset_dir}/phantom_meta/{case}.json'
  inst_path = f'{dataset_dir}/instancesTs/{case}.nii.gz'
  if not (os.path.isfile(meta_path) and os.path.isfile(inst_path)):
    return None
  with open(meta_path) as f:
    kinds = {t['instance_id']: t['type'] for t in json.load(f).get('tumors', [])}
  instances, _, _ = eval_cases.load_nifti(inst_path)
  comps, _ = ndimage.label(ref > 0, np.ones((3,) * ref.ndim, bool))
  out = []
  for k, sl in enumerate(ndimage.find_objects(comps), start=1):
    ids = instances[sl][comps[sl] == k]
    ids = ids[ids > 0]
    out.append(kinds.get(int(np.bincount(ids).argmax()), 'unknown') if ids.size else 'unknown')
  return out


def teacher_run(r):
  """The pseudo-run 'the teacher of CMEDL run r on pseudo-target images' (same seed, group)."""
  return dict(r, name=f'{r["name"]}#teacher', method='cmedl_teacher')


def predict_and_evaluate(r, root):
  """Predicts the source test set with the run's final model; returns and saves the metrics.

  For a teacher pseudo-run (teacher_run) the run's teacher segments the translator's output.
  """
  teacher = r['method'] == 'cmedl_teacher'
  name = r['name'].split('#')[0]
  workdir = f'{root}/runs/{name}'
  suffix = '_teacher' if teacher else ''
  eval_path = f'{workdir}/test_eval{suffix}.json'
  if os.path.isfile(eval_path) and os.path.getmtime(eval_path) >= os.path.getmtime(
    f'{workdir}/study_run.json'
  ):
    with open(eval_path) as f:
      return json.load(f)
  from cmedl_jax import inference, predict  # pylint: disable=g-import-not-at-top

  dataset_dir = f'{root}/data/phantoms/{SOURCE_KIND[r["setting"]]}'
  pseudo = r['method'] in ('cmedl', 'stage2') and r['seed'] == 0
  predictor = inference.Predictor(workdir=workdir, pseudo_target=pseudo, teacher=teacher)
  out_dir = f'{workdir}/test_predictions{suffix}'
  inputs = predict.list_inputs(f'{dataset_dir}/imagesTs')
  result = predict.predict_files(
    predictor, inputs, out_dir, overwrite=True, pseudo_target=pseudo, progress=False
  )
  if result['failed']:
    raise RuntimeError(f'{r["name"]}: prediction failed: {result["failed"]}')
  classes = eval_cases.parse_classes(f'{dataset_dir}/dataset.json')
  refs = nifti_io.list_cases(f'{dataset_dir}/labelsTs')
  preds = {c: f'{out_dir}/{c}.nii.gz' for c in refs}
  thorax = 'tumor' in classes
  case_rows, tumor_rows = eval_cases.evaluate_method(
    r['name'],
    preds,
    refs,
    classes,
    eval_cases.DEFAULT_TOLERANCE_MM,
    tumor_classes=['tumor'] if thorax else [],
  )
  if thorax:
    for case in refs:
      ref, _, _ = eval_cases.load_nifti(refs[case])
      types = tumor_types(dataset_dir, case, ref)
      rows = [t for t in tumor_rows if t['case'] == case]
      for t in rows:
        t['type'] = types[t['tumor'] - 1] if types else 'unknown'
  record = {
    'run': r['name'],
    'case_rows': case_rows,
    'tumor_rows': tumor_rows,
    'predictions': out_dir,
    'reference': f'{dataset_dir}/labelsTs',
  }
  write_json(eval_path, record)
  return record


# ------------------------------------------------------------------------------- report


def _num(x):
  return (
    float('nan')
    if isinstance(x, str) and x == 'nan'
    else (float('inf') if x == 'inf' else float(x))
  )


def _rows(record, key, r):
  out = []
  for row in record[key]:
    row = dict(row)
    for m in seg_metrics.METRIC_NAMES:
      row[m] = _num(row[m])
    row.update(seed=r['seed'], run=r['name'])
    out.append(row)
  return out


def _ms(values, digits=3):
  d = eval_stats.describe(values)
  if not d['n_finite']:
    return 'n/a'
  s = (
    f'{d["mean"]:.{digits}f} ± {d["sd"]:.{digits}f}'
    if d['n_finite'] > 1
    else f'{d["mean"]:.{digits}f}'
  )
  return s + (f' ({d["n_inf"]} inf)' if d['n_inf'] else '')


def _p(rows_a, rows_b, keys, level, metric='dice'):
  """(p, pairs, mean of B - A over the pairs): paired two-sided Wilcoxon of B vs A.

  Rows pair on `keys` (which include the seed, so methods with more seeds than the other pair
  only on the common ones); all classes are pooled into one test.
  """
  pool = lambda rows: [dict(r, pair_class=r['class'], **{'class': 'all'}) for r in rows]
  keys = tuple(keys) + ('pair_class',)
  if not rows_a or not rows_b:
    return float('nan'), 0, float('nan')
  w = eval_stats.wilcoxon_tests(pool(rows_a), pool(rows_b), keys, level, [metric])
  index = {tuple(r[k] for k in keys): r[metric] for r in pool(rows_a)}
  diffs = [
    r[metric] - index[k]
    for r in pool(rows_b)
    if (k := tuple(r[k2] for k2 in keys)) in index
    and np.isfinite(r[metric])
    and np.isfinite(index[k])
  ]
  mean_diff = float(np.mean(diffs)) if diffs else float('nan')
  if not w:
    return float('nan'), 0, mean_diff
  return w[0]['p_value'], w[0]['n_pairs'], mean_diff


def _fmt_p(p):
  return 'n/a' if not np.isfinite(p) else (f'{p:.2g}' if p >= 1e-3 else f'{p:.1e}')


def method_table(groups, baseline, tumor_split=True):
  """Markdown rows: per method the per-case and per-tumor metrics and tests vs `baseline`."""
  head = ['method', 'runs', 'DSC (case)', 'sDSC 2 mm', 'HD95 mm', 'p DSC vs base (case)']
  if tumor_split:
    head += [
      'DSC peripheral',
      'DSC juxta-med.',
      'detected',
      'p DSC vs base (tumor)',
      'p juxta',
      'p peripheral',
    ]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  base = groups.get(baseline)
  for name, g in groups.items():
    cases, tumors = g['cases'], g['tumors']
    cells = [
      name,
      str(len(g['runs'])),
      _ms(r['dice'] for r in cases),
      _ms(r['surface_dice'] for r in cases),
      _ms((r['hd95'] for r in cases), 1),
    ]
    is_base = base is None or name == baseline
    p = _p(base['cases'], cases, ('seed', 'case', 'class'), 'case') if not is_base else None
    cells.append('—' if is_base else f'{_fmt_p(p[0])} (n={p[1]}, Δ {p[2]:+.3f})')
    if tumor_split:
      for kind in ('peripheral', 'juxta_mediastinal'):
        cells.append(_ms(t['dice'] for t in tumors if t.get('type') == kind))
      det = sum(bool(t['detected']) for t in tumors)
      cells.append(f'{det}/{len(tumors)}')
      keys = ('seed', 'case', 'class', 'tumor')
      for sel in (None, 'juxta_mediastinal', 'peripheral'):
        if is_base:
          cells.append('—')
          continue
        a = [t for t in base['tumors'] if sel is None or t.get('type') == sel]
        b = [t for t in tumors if sel is None or t.get('type') == sel]
        p = _p(a, b, keys, 'tumor')
        cells.append(f'{_fmt_p(p[0])} (n={p[1]})')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def class_table(groups, baseline):
  """Per-organ DSC (equal teacher) with a case-paired test vs baseline."""
  classes = list(dict.fromkeys(r['class'] for g in groups.values() for r in g['cases']))
  lines = [
    '| method | ' + ' | '.join(classes) + ' | mean over organs | p (cases x organs) |',
    '|' + '---|' * (len(classes) + 3),
  ]
  for name, g in groups.items():
    cells = [_ms(r['dice'] for r in g['cases'] if r['class'] == c) for c in classes]
    if name == baseline:
      p = '—'
    else:
      res = _p(groups[baseline]['cases'], g['cases'], ('seed', 'case', 'class'), 'case')
      p = f'{_fmt_p(res[0])} (n={res[1]}, Δ {res[2]:+.3f})'
    lines.append(
      f'| {name} | ' + ' | '.join(cells) + f' | {_ms(r["dice"] for r in g["cases"])} | {p} |'
    )
  return '\n'.join(lines)


def group_of(records, runs, names):
  g = {'runs': [], 'cases': [], 'tumors': []}
  for r in runs:
    if r['name'] in names and r['name'] in records:
      g['runs'].append(r['name'])
      g['cases'] += _rows(records[r['name']], 'case_rows', r)
      g['tumors'] += _rows(records[r['name']], 'tumor_rows', r)
  return g


def box_plot(groups, path, by_type=True):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [('per case', lambda g: [r['dice'] for r in g['cases']])]
  if by_type:
    for kind in ('peripheral', 'juxta_mediastinal'):
      panels.append(
        (f'{kind} tumors', lambda g, k=kind: [t['dice'] for t in g['tumors'] if t.get('type') == k])
      )
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (title, values) in zip(axes[0], panels):
    data = [np.asarray(values(g), float) for g in groups.values()]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), [n.replace('_', '\n') for n in groups], fontsize=7)
    ax.set_ylim(-0.02, 1.0)
    ax.set_ylabel('DSC')
    ax.set_title(title, fontsize=9)
  eval_plots.save_figure(fig, path)
  plt.close(fig)


def overlay_figure(root, records, path, names, setting='informative'):
  """Rows = test cases with a juxta-mediastinal and a peripheral tumor; columns = CT,
  pseudo-MRI (CMEDL's translator), reference and the predictions of `names`."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cmedl_run = names[-1]
  rec = records.get(cmedl_run)
  if rec is None:
    return False
  dataset_dir = f'{root}/data/phantoms/{SOURCE_KIND[setting]}'
  cases = sorted({t['case'] for t in rec['tumor_rows']})
  by_kind = {}
  for t in rec['tumor_rows']:
    by_kind.setdefault(t.get('type'), []).append(t)
  picks = []
  for kind in ('juxta_mediastinal', 'peripheral'):
    if by_kind.get(kind):
      t = max(by_kind[kind], key=lambda t: _num(t['ref_volume_mm3']))
      picks.append((t['case'], kind))
  picks += [(c, 'case') for c in cases if c not in {p[0] for p in picks}][: max(0, 3 - len(picks))]
  cols = ['CT', 'pseudo-MRI', 'reference'] + names
  fig, axes = plt.subplots(
    len(picks), len(cols), figsize=(2.3 * len(cols), 2.4 * len(picks)), squeeze=False
  )
  for i, (case, kind) in enumerate(picks):
    image, zooms = eval_plots.canonical(f'{dataset_dir}/imagesTs/{case}_0000.nii.gz', False)
    ref, _ = eval_plots.canonical(f'{dataset_dir}/labelsTs/{case}.nii.gz', True)
    k = int(np.argmax((ref > 0).sum(axis=(0, 1))))
    fake_path = f'{root}/runs/{cmedl_run}/test_predictions/{case}_pseudo_target.nii.gz'
    panels = [(image[:, :, k], None, 'gray', (-1000, 500) if setting == 'informative' else None)]
    if os.path.isfile(fake_path):
      panels.append((eval_plots.canonical(fake_path, False)[0][:, :, k], None, 'gray', (-1, 1)))
    else:
      panels.append((np.zeros_like(image[:, :, k]), None, 'gray', (0, 1)))
    panels.append((image[:, :, k], ref[:, :, k], 'gray', panels[0][3]))
    for name in names:
      pred_path = f'{root}/runs/{name}/test_predictions/{case}.nii.gz'
      pred = eval_plots.canonical(pred_path, True)[0] if os.path.isfile(pred_path) else None
      panels.append((image[:, :, k], None if pred is None else pred[:, :, k], 'gray', panels[0][3]))
    for j, (img, mask, cmap, window) in enumerate(panels):
      ax = axes[i][j]
      lo, hi = window if window else np.percentile(img, [1, 99])
      ax.imshow(img.T, cmap=cmap, origin='lower', vmin=lo, vmax=hi, aspect=zooms[1] / zooms[0])
      if j >= 2:
        ax.contour((ref[:, :, k] > 0).T, levels=[0.5], colors='lime', linewidths=0.8)
        if mask is not None and j > 2:
          ax.contour((mask > 0).T, levels=[0.5], colors='red', linewidths=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(cols[j].replace('informative-', ''), fontsize=7)
    axes[i][0].set_ylabel(f'{case}\n({kind}), slice {k}', fontsize=7)
  fig.suptitle('green: reference, red: prediction', fontsize=8)
  eval_plots.save_figure(fig, path)
  plt.close(fig)
  return True


REAL_DATA = """\
## The same study on real data

The study's configs are the project's ordinary configs with smaller sizes; on real data use
`configs/cmedl.py` and `configs/baseline.py` at full size (256x256 at 1.5 mm, U-Net width 32 / depth 4,
CycleGAN ngf 64 / 9 blocks; see README "Own data"). Each dataset folder is in the MSD / nnU-Net
layout (`dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`, `labelsTs/`).

```bash
# Lung tumors: MSD Task06_Lung CT (student) with a T2w MRI set of your own (teacher, labelled).
D="--config.data.source.raw_dir=data/Task06_Lung --config.data.source.prepared_dir=data/prepared/lung_ct \\
   --config.data.target.raw_dir=data/my_lung_t2w --config.data.target.prepared_dir=data/prepared/lung_t2w"
for seed in 0 1 2; do
  python -m cmedl_jax.main --config=configs/baseline.py:student_only,unet --workdir=runs/lung/student_only-s$seed $D --config.seed=$seed
  python -m cmedl_jax.main --config=configs/cmedl.py:unet,cyclegan        --workdir=runs/lung/cmedl-s$seed        $D --config.seed=$seed
  python -m cmedl_jax.main --config=configs/baseline.py:two_channel,unet  --workdir=runs/lung/two_channel-s$seed  $D --config.seed=$seed
  python -m cmedl_jax.main --config=configs/baseline.py:pmri_teacher,unet --workdir=runs/lung/pmri_teacher-s$seed $D --config.seed=$seed
done
for m in student_only cmedl two_channel pmri_teacher; do
  python -m cmedl_jax.predict --workdir=runs/lung/$m-s0 --input data/Task06_Lung/imagesTs --output runs/lung/$m-s0/test_predictions
done
python -m cmedl_jax.evaluate --pred runs/lung/student_only-s0/test_predictions --pred-b runs/lung/cmedl-s0/test_predictions \\
    --ref data/Task06_Lung/labelsTs --classes data/Task06_Lung/dataset.json --images data/Task06_Lung/imagesTs --out runs/lung/eval
# Weak teacher: swap the roles (configs/weak_teacher.py) with the same D.
# Equal teacher: AMOS CT and MRI (or T1w/T2w sets), 4 organs, configs/equal_teacher.py; label_map
# names must match each dataset.json, e.g. --config.data.label_map="{'liver': 1, 'spleen': 2, ...}".
```
MSD Task06 has no `labelsTs`; hold out part of `imagesTr`/`labelsTr` as the test set. The
per-tumor split (peripheral vs juxta-mediastinal) needs a per-tumor type table, which real data
sets do not carry; `cmedl_jax.evaluate` writes per-tumor rows (`tumors.csv`, with centroids) to
which such a table can be joined.
"""


def _git_commit():
  try:
    return subprocess.check_output(
      ['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, text=True
    ).strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _delta_sentence(groups, a, b):
  ga, gb = groups.get(a), groups.get(b)
  if not ga or not gb or not ga['cases'] or not gb['cases']:
    return f'{b} vs {a}: not run.'
  p, n, diff = _p(ga['cases'], gb['cases'], ('seed', 'case', 'class'), 'case')
  verdict = 'higher' if diff > 0 else 'lower' if diff < 0 else 'equal'
  sig = 'significant at 0.05' if np.isfinite(p) and p < 0.05 else 'not significant at 0.05'
  return (
    f'{b} vs {a}: DSC {verdict} by {abs(diff):.3f} on average over {n} paired cases '
    f'(same seed and test case; Wilcoxon p = {_fmt_p(p)}, {sig}).'
  )


def build_report(root, out, runs, records, tiny, extra):
  """Writes the markdown report and its figures (next to `out`, in RESULTS_figures/)."""
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(out)), 'RESULTS_figures')
  os.makedirs(fig_dir, exist_ok=True)
  rel = os.path.relpath(fig_dir, os.path.dirname(os.path.abspath(out)))

  def grouped(group, label_of):
    g = {}
    for r in runs:
      if r['group'] == group and r['name'] in records:
        g.setdefault(label_of(r), set()).add(r['name'])
    return {k: group_of(records, runs, v) for k, v in g.items()}

  main = grouped('main', lambda r: r['method'])
  order = ('student_only', 'cmedl', 'cmedl_teacher', 'two_channel', 'pmri_teacher')
  main = {k: main[k] for k in order if k in main}
  seconds = {}
  commits = {}
  for r in runs:
    path = f'{root}/runs/{r["name"]}/study_run.json'
    if os.path.isfile(path):
      with open(path) as f:
        record = json.load(f)
      seconds[r['name']] = record['seconds']
      commits.setdefault(record.get('commit', 'unknown'), []).append(r['name'])
  total_min = sum(seconds.values()) / 60
  cfg = study.get_config('informative,cmedl')
  size = (
    f'{extra.get("data.image_size", cfg.data.image_size)}² slices at '
    f'{extra.get("data.spacing_mm", cfg.data.spacing_mm)} mm, '
    f'{extra.get("train.num_steps", cfg.train.num_steps)} steps of batch '
    f'{cfg.train.global_batch_size}'
  )
  datasets = TINY_DATASETS if tiny else DATASETS
  parts = [
    f"""# CMEDL on the phantom benchmark: the paper's comparisons, small

Generated by `python benchmarks/reproduce.py{' --tiny' if tiny else ''}` (commit `{_git_commit()}`,
{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPU cores, no GPU):
{len(seconds)} training runs, {total_min:.1f} min of training in all, trained at commit(s)
{', '.join(f'`{c}` ({len(n)} runs)' for c, n in commits.items())} (per run in study_run.json). Run directories:
`{root}/runs/NAME` (config.json, train.log, TensorBoard events, checkpoints, export,
`test_predictions/`, `test_eval.json` with every per-case and per-tumor number below,
`study_run.json` with the command and its wall time); copies of the small record files are in
`RESULTS_runs/NAME/` beside this file. `--report-only` rebuilds this file from the run dirs.
{'**Tiny pipeline check: the numbers below mean nothing.**' if tiny else ''}

**Setup.** Phantoms (docs/PHANTOMS.md), unpaired: {', '.join(f'{k} {n}+{t} test (seed {s})' for k, (n, t, s) in datasets.items())}
(training+validation cases + held-out test cases; the teacher's sets are other patients).
Size, reduced from the paper so that the study fits about an hour on 2 CPU cores: {size};
U-Net width 8 / depth 3, small FC-DenseNet (growth 6, 3 pools) and PSPNet (width 8, one block
per stage), CycleGAN and CUT generators with ngf 8 and 3 residual blocks, PatchGAN ndf 8
(configs/study.py). The paper trains full-size networks at 256x256 on real scans for far longer. The
method's switches are those this code had in 2026-11, pinned in configs/study.py METHOD_SWITCHES
(the teacher also trains on labelled real target images in one joint batch-norm pass, no history
pool); docs/PILOT.md compares them with today's defaults (the authors' practice). All other
settings are the defaults of configs/default.py (hint loss on the penultimate and last features,
teacher stop-gradient, joint training, Adam lr 1e-3 constant then linear decay).
Metrics on the test volumes at their own grid (predictions of the *final* model, resampled back):
DSC, surface Dice at 2 mm (sDSC) and HD95 in mm, per case and per tumor (3D connected components
of the reference; type from the phantom's ground truth). `inf`: a case with an empty prediction
(HD95 undefined), excluded from the mean and counted. Tests: two-sided paired Wilcoxon signed-rank
(scipy), pairs = same seed and same test case (or tumor).
"""
  ]

  parts.append(
    '## 1. Informative teacher: CT student, T2w MRI teacher (U-Net + CycleGAN)\n\n'
    'Methods: student_only (CT alone), cmedl (the student of CMEDL), cmedl_teacher '
    "(the teacher of the same CMEDL runs, segmenting the translator's pseudo-MRI of "
    'the test CT: what the student is distilled from), two_channel (student on CT '
    'and pseudo-MRI as two channels), pmri_teacher (translator + teacher trained '
    'without a student; the teacher segments the pseudo-MRI). DSC, sDSC, HD95: mean ± sd '
    'over all runs (seeds) and test cases of a method; p: paired Wilcoxon against '
    'student_only over the same seeds and cases, Δ: mean paired difference.\n\n'
    + method_table(main, 'student_only')
    + '\n'
  )
  if main:
    box_plot(main, f'{fig_dir}/main_dsc.png')
    parts.append(f'![DSC per case and per tumor type]({rel}/main_dsc.png)\n')
  names = [
    n
    for n in (
      'informative-student_only-s0',
      'informative-two_channel-s0',
      'informative-pmri_teacher-s0',
      'informative-cmedl-s0',
    )
    if n in records
  ]
  if names and overlay_figure(root, records, f'{fig_dir}/overlays.png', names):
    parts.append(f'![CT, pseudo-MRI, reference and predictions]({rel}/overlays.png)\n')

  arch = {}
  for r in runs:
    if r['name'] in records and (
      r['group'] == 'arch' or r['name'] in ('informative-student_only-s0', 'informative-cmedl-s0')
    ):
      label = (
        f'{r["seg"]}+{r["i2i"]} {r["method"]}'
        if r['method'] == 'cmedl'
        else f'{r["seg"]} student_only'
      )
      arch[label] = group_of(records, runs, {r['name']})
  if len(arch) > 2:
    lines = [
      '| segmenter | translator | student only DSC | CMEDL DSC | Δ mean | p (case) |',
      '|---|---|---|---|---|---|',
    ]
    for seg in ('unet', 'densefcn', 'pspnet'):
      for i2i in ('cyclegan', 'cut'):
        key = f'{seg}+{i2i} cmedl'
        base = arch.get(f'{seg} student_only')
        if key not in arch:
          continue
        a = [r['dice'] for r in base['cases']] if base else []
        b = [r['dice'] for r in arch[key]['cases']]
        p = (
          _p(base['cases'], arch[key]['cases'], ('seed', 'case', 'class'), 'case')
          if base
          else (float('nan'), 0, 0)
        )
        da = eval_stats.describe(a)['mean'] if a else float('nan')
        db = eval_stats.describe(b)['mean']
        lines.append(
          f'| {seg} | {i2i} | {_ms(a) if a else "n/a"} | {_ms(b)} | '
          f'{db - da:+.3f} | {_fmt_p(p[0])} |'
        )
    parts.append(
      '## 2. Architectural flexibility (seed 0)\n\nReduced grid: every segmenter with '
      'CycleGAN, and U-Net with CUT; each against the same segmenter trained alone.\n\n'
      + '\n'.join(lines)
      + '\n'
    )

  weak = grouped('weak', lambda r: r['method'])
  if weak:
    parts.append(
      '## 3a. Weak teacher: T2w MRI student, CT teacher (seed 0)\n\n'
      + method_table(weak, 'student_only')
      + '\n'
    )
  equal = grouped('equal', lambda r: r['method'])
  if equal:
    parts.append(
      '## 3b. Equal teacher: abdominal T1w student, T2w teacher, 4 organs (seed 0)\n'
      '\n' + class_table(equal, 'student_only') + '\n'
    )

  abl = {}
  for r in runs:
    if r['name'] in records and (
      r['group'] == 'ablation'
      or r['name'] in ('informative-student_only-s0', 'informative-cmedl-s0')
    ):
      abl[r['name'].replace('informative-', '').replace('ablation-', '')] = group_of(
        records, runs, {r['name']}
      )
  if len(abl) > 2:
    parts.append(
      '## 4. Ablations (seed 0; p against CMEDL with the defaults)\n\n'
      'distill_none: CMEDL without any distillation loss (translator and teacher '
      'still trained); distill_kl: KL between the softened outputs instead of the '
      'hint loss; taps_last: hint on the last feature map only; teacher_grad: the '
      'hint loss also updates the teacher (and through it the translator); '
      'two_stage: the translator is trained first (stage1, '
      '`translator_only`), then frozen while teacher and student train.\n\n'
      + method_table(abl, 'cmedl-s0')
      + '\n'
    )

  summary = ['## Discussion', '', PAPER, '']
  if main:
    for b in ('cmedl', 'cmedl_teacher', 'two_channel', 'pmri_teacher'):
      summary.append('- Informative teacher, ' + _delta_sentence(main, 'student_only', b))
    base, cm = main.get('student_only'), main.get('cmedl')
    if base and cm:
      for kind in ('juxta_mediastinal', 'peripheral'):
        a = [t['dice'] for t in base['tumors'] if t.get('type') == kind]
        b = [t['dice'] for t in cm['tumors'] if t.get('type') == kind]
        if a and b:
          summary.append(
            f'- {kind} tumors: CMEDL {np.mean(b):.3f} vs student only '
            f'{np.mean(a):.3f} (Δ {np.mean(b) - np.mean(a):+.3f}, {len(b)} tumors).'
          )
  if weak:
    for b in ('cmedl', 'cmedl_teacher'):
      summary.append('- Weak teacher, ' + _delta_sentence(weak, 'student_only', b))
  if equal:
    for b in ('cmedl', 'cmedl_teacher'):
      summary.append('- Equal teacher, ' + _delta_sentence(equal, 'student_only', b))
  summary += ablation_findings(abl, main, weak, equal)
  summary.append('')
  summary.append(DISCUSSION)
  parts.append('\n'.join(summary))

  lines = [
    '## Commands and run times',
    '',
    'Phantoms: `'
    + ' && '.join(
      f'python -m data_prep.phantoms --kind {k} --n {n} --n-test {t} --seed {s} '
      f'--out {root}/data/phantoms/{k}'
      for k, (n, t, s) in datasets.items()
    )
    + '`',
    '',
    '| run | seconds | command |',
    '|---|---|---|',
  ]
  for r in runs:
    if '#' in r['name']:
      continue
    lines.append(
      f'| {r["name"]} | {seconds.get(r["name"], "not run")} | '
      f'`{shown(train_command(r, root, extra))}` |'
    )
  lines += [
    '',
    'Prediction and evaluation of each run (done in-process by the script, same code): '
    '`python -m cmedl_jax.predict --workdir RUN --input ROOT/data/phantoms/KIND/imagesTs '
    '--output RUN/test_predictions` and `python -m cmedl_jax.evaluate --pred '
    'RUN/test_predictions --ref ROOT/data/phantoms/KIND/labelsTs --classes '
    'ROOT/data/phantoms/KIND/dataset.json --out RUN/eval`.',
  ]
  parts.append('\n'.join(lines) + '\n')
  parts.append(REAL_DATA)
  nifti_io.atomic_write(out, '\n'.join(parts))
  print(f'reproduce: wrote {out}', flush=True)
  copy_run_records(root, runs, os.path.join(os.path.dirname(os.path.abspath(out)), 'RESULTS_runs'))


RECORD_FILES = (
  'config.json',
  'study_run.json',
  'validation.json',
  'test_eval.json',
  'test_eval_teacher.json',
)


def copy_run_records(root, runs, dest):
  """Copies each run's small record files (config, command and time, validation history,
  test metrics) next to the report, so that its numbers can be traced without the run dirs."""
  for r in runs:
    if '#' in r['name']:
      continue
    for name in RECORD_FILES:
      src = f'{root}/runs/{r["name"]}/{name}'
      if os.path.isfile(src):
        with open(src, 'rb') as f:
          nifti_io.atomic_write(os.path.join(dest, r['name'], name), f.read())


def _mean_dice(g):
  return (
    eval_stats.describe(r['dice'] for r in g['cases'])['mean'] if g and g['cases'] else float('nan')
  )


def ablation_findings(abl, main, weak, equal):
  """Bullets that read the ablation and teacher numbers (whatever they turn out to be)."""
  out = []
  so, cm, te = (main.get(k) for k in ('student_only', 'cmedl', 'cmedl_teacher'))
  if so and cm:
    per_seed = []
    for seed in sorted({r['seed'] for r in so['cases']} & {r['seed'] for r in cm['cases']}):
      m = [np.mean([r['dice'] for r in g['cases'] if r['seed'] == seed]) for g in (so, cm)]
      per_seed.append(f'seed {seed}: {m[0]:.3f} / {m[1]:.3f}')
    out.append(
      '- Informative teacher, mean DSC per seed (student_only / cmedl): '
      + '; '.join(per_seed)
      + '. The spread between seeds of one method is as large '
      'as the differences between methods.'
    )
  if so and te and te['cases']:
    better = _mean_dice(te) > _mean_dice(so)
    out.append(
      f'- The CMEDL teacher on pseudo-MRI reaches DSC {_mean_dice(te):.3f} against '
      f'{_mean_dice(so):.3f} for the CT student alone: the teacher is '
      f"{'better' if better else 'worse'} than the student it teaches. CMEDL's premise "
      'is a teacher that sees more than the student; '
      + (
        'here it holds.'
        if better
        else 'at this training length it does not hold, '
        'so distillation pulls the student toward a weaker network.'
      )
    )
  a, b = abl.get('distill_none'), abl.get('student_only-s0')
  if a and b and a['cases']:
    same = [r['dice'] for r in a['cases']] == [r['dice'] for r in b['cases']]
    out.append(
      '- distill_none '
      + (
        'gives exactly the same per-case DSC as student_only '
        '(same seed): without a distillation loss the student is trained on the same '
        'batches from the same initialisation, untouched by the translator and teacher '
        'beside it (a check that nothing else leaks into the student).'
        if same
        else f'differs from student_only ({_mean_dice(a):.3f} vs {_mean_dice(b):.3f}).'
      )
    )
  for name, what in (
    ('distill_kl', 'KL distillation'),
    ('taps_last', 'a hint on the last feature map only'),
    ('teacher_grad', 'letting the hint train the teacher'),
    ('two_stage', 'a translator trained first and frozen'),
  ):
    g, base = abl.get(name), abl.get('cmedl-s0')
    if g and base and g['cases']:
      d = _mean_dice(g) - _mean_dice(base)
      note = ' (the student collapsed to predicting background)' if _mean_dice(g) < 0.05 else ''
      out.append(
        f'- Ablation, {what}: DSC {_mean_dice(g):.3f} vs {_mean_dice(base):.3f} for '
        f'default CMEDL (Δ {d:+.3f}, one seed){note}.'
      )
  settings = []
  for label, groups in (('informative', main), ('weak', weak), ('equal', equal)):
    g_so, g_cm, g_te = (groups.get(k) for k in ('student_only', 'cmedl', 'cmedl_teacher'))
    if g_so and g_cm and g_te:
      t = _p(g_so['cases'], g_te['cases'], ('seed', 'case', 'class'), 'case')[2]
      c, p = (lambda r: (r[2], r[0]))(
        _p(g_so['cases'], g_cm['cases'], ('seed', 'case', 'class'), 'case')
      )
      settings.append((label, t, c, p))
  if settings:
    text = '; '.join(
      f'{label} teacher: teacher − student {t:+.3f}, CMEDL − student {c:+.3f} (p = {_fmt_p(p)})'
      for label, t, c, p in settings
    )
    gained = {label for label, _, c, p in settings if c > 0 and p < 0.05}
    better = {label for label, t, _, _ in settings if t > 0}
    verdict = (
      'CMEDL improved its student significantly exactly where its teacher, segmenting '
      'pseudo-target images, was better than the student: teacher quality decides.'
      if gained == better
      else f'Settings with a significant CMEDL gain: {sorted(gained) or "none"}; with a '
      f'teacher better than the student: {sorted(better) or "none"}.'
    )
    out.append(
      '- Paired DSC differences against the student trained alone: ' + text + '. ' + verdict
    )
  so_e, cm_e = (equal.get(k) for k in ('student_only', 'cmedl'))
  if so_e and cm_e:
    classes = list(dict.fromkeys(r['class'] for r in so_e['cases']))
    per = ', '.join(
      f'{c} {np.mean([r["dice"] for r in cm_e["cases"] if r["class"] == c]):.2f} vs '
      f'{np.mean([r["dice"] for r in so_e["cases"] if r["class"] == c]):.2f}'
      for c in classes
    )
    out.append(f'- Equal teacher, per organ (CMEDL vs student only): {per}.')
  return out


DISCUSSION = """\
**Limits of this study.** The phantoms are schematic (docs/PHANTOMS.md): one anatomical model
underlies CT and MRI, tumors are smooth lobulated spheres, and the only hard case the CT side
poses by design is the juxta-mediastinal tumor whose HU is within 6 HU of the mediastinum, where
the T2w side shows it with a contrast-to-noise above 3. So the premise CMEDL rests on (the MRI
teacher sees what CT hides) holds on the phantoms by construction, and a gain, if any, should
show on juxta-mediastinal tumors first. The networks have a quarter of the default width
(U-Net 8 vs 32 base channels, about 1/16 of the parameters; CycleGAN ngf 8 vs 64, 3 vs 9 blocks)
and train for 500 steps of 8 slices (4,000 slices, a few passes over the 24 training volumes),
at 6 mm in-plane spacing, where a 1 cm tumor covers two pixels; the teacher and the translator
have far less time to become good than in the paper,
and CMEDL's student can only gain from a teacher that is better than itself. A likely reason
a CT-to-MRI teacher can lag on the phantoms: it learns on real T2w images, where tumors are
bright, but at test time it reads pseudo-MRI made from CT, and a translator can only put into
pseudo-MRI what the CT holds; a juxta-mediastinal tumor within 6 HU of the mediastinum under
12-22 HU noise holds little. Between T1w and T2w abdominal phantoms the organs differ on both
sides, so the translation has more to carry over. One to three seeds
per method give a rough spread, not a confidence interval; the p-values pair seeds and test
cases and treat those pairs as independent. Numbers here should not be compared with the paper's
as absolute values: they are the same comparisons on a toy problem, meant to show that the
implementation runs every arm of the method and how the arms order on it. (The validation DSC in
each run's log is lower than the test DSC here: it is computed on the 6 mm prepared grid, where
small tumors are a few voxels, while the test metrics are on the 2.4 mm original grid.)"""


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--root', default=study.ROOT, help='data and run directories')
  parser.add_argument('--out', default=os.path.join(REPO, 'docs', 'RESULTS.md'))
  parser.add_argument('--tiny', action='store_true', help='a seconds-long pipeline check')
  parser.add_argument(
    '--report-only', action='store_true', help='no training: evaluate and report the finished runs'
  )
  parser.add_argument('--only', default='', help='comma-separated run names (default: all)')
  parser.add_argument(
    '--jobs',
    type=int,
    default=1,
    help='runs trained at once, each pinned to one core (2 on 2 cores: about twice the runs '
    'per hour; benchmarks/study_throughput.py)',
  )
  args = parser.parse_args(argv)
  root = args.root.rstrip('/')
  runs = tiny_runs() if args.tiny else study_runs()
  extra = dict(TINY_OVERRIDES) if args.tiny else {}
  if args.only:
    wanted = set(args.only.split(','))
    runs = [r for r in runs if r['name'] in wanted]
  if not args.report_only:
    write_phantoms(
      root, TINY_DATASETS if args.tiny else DATASETS, TINY_PHANTOM_GRID if args.tiny else {}
    )
  records = {}
  failed = [] if args.report_only else train_all(runs, root, extra, args.jobs)
  teachers = []
  for r in runs:
    if r['method'] != 'stage1' and finished(r, root):
      records[r['name']] = predict_and_evaluate(r, root)
      if r['method'] == 'cmedl' and r['group'] in ('main', 'weak', 'equal'):
        teachers.append(teacher_run(r))
        records[teachers[-1]['name']] = predict_and_evaluate(teachers[-1], root)
  runs = runs + teachers
  build_report(root, args.out, runs, records, args.tiny, extra)
  if failed:
    print(f'reproduce: failed runs: {failed}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
