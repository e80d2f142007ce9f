"""The study's runs (docs/STUDY_PLAN.md): phantom sets, settings, seeds, arms and ablations.

A run is a dict: name, group (primary | factorial | sensitivity | ablation), setting, arm,
method (configs/study.py's), seed, source (its DATASETS key), switches, requires (a run trained
first in the same job, or None) and overrides (config flags).
"""

from __future__ import annotations

# Phantom sets (docs/STUDY_PLAN.md "Data"): name -> (kind, training cases, test cases, generator
# seed, data_prep.phantoms.write_dataset options). CT and MRI never share patients; the cue set
# is the CT set with a consistent juxta-mediastinal tumour offset (the premise factorial).
DATASETS = {
  'thorax_ct': ('thorax_ct', 30, 50, 0, {}),
  'thorax_t2w': ('thorax_t2w', 24, 50, 1, {}),
  'abdomen_t1w': ('abdomen_t1w', 20, 40, 2, {}),
  'abdomen_t2w': ('abdomen_t2w', 20, 4, 3, {}),
  'thorax_ct_cue': ('thorax_ct', 30, 50, 0, {'juxta_offset_hu': (10.0, 15.0)}),
}
TINY_DATASETS = {'thorax_ct': ('thorax_ct', 6, 3, 0, {}), 'thorax_t2w': ('thorax_t2w', 6, 2, 1, {})}
TINY_PHANTOM_GRID = dict(size=48, spacing=8.0, slices=12)
# The tiny check's networks are those of configs/tiny.py (a pipeline check, not a study).
TINY_OVERRIDES = {
  'data.image_size': 32,
  'data.spacing_mm': 12.0,
  'train.num_steps': 4,
  'train.eval_every': 2,
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
SETTINGS = ('informative', 'weak', 'equal')
SOURCE_KIND = {'informative': 'thorax_ct', 'weak': 'thorax_t2w', 'equal': 'abdomen_t1w'}
TEACHER_KIND = {'informative': 'thorax_t2w', 'weak': 'thorax_ct', 'equal': 'abdomen_t2w'}
PRIMARY_SEEDS = range(8)  # docs/STUDY_PLAN.md: 8 per setting,
EXTRA_SEEDS = range(8, 12)  # added once to a setting that ended inconclusive (--extend).
FACTORIAL_SEEDS = range(4)
SENSITIVITY_SEEDS = range(3)
ABLATION_SEEDS = range(3)
SCARCE_CASES = 6  # Label-scarce CT training: the first 6 training cases.
# Factorial cells (cue, labels); ('none', 'rich') is the informative primary arm itself.
CELLS = (('none', 'rich'), ('none', 'scarce'), ('cue', 'rich'), ('cue', 'scarce'))
# Exploratory ablations (--ablations; not in docs/STUDY_PLAN.md: added 2026-12-03 for the
# report's ablation table, issue 18): the informative setting's CMEDL with one thing changed,
# paired per seed with the primary arms. arm -> (what changes, config overrides), in the order
# they train: target labels first (the one that gives the teacher information its student lacks).
ABLATIONS = {
  'target_labels': (
    'the teacher also trains on labelled real target (T2w) images',
    {'data.target_labels': True},
  ),
  'kl': ('KL between the softened outputs instead of the hint loss', {'method.distill': 'kl'}),
  'taps_last': ('the hint on the last feature map only', {'method.hint_taps': ('last',)}),
  'teacher_grad': (
    'the hint also trains the teacher and, through the pseudo-target, the translator',
    {'method.hint_trains_teacher': True, 'method.hint_trains_translator': True},
  ),
  'two_stage': ('the translator trained first (stage 1, alone), then frozen (stage 2)', {}),
}

SENSITIVITY_ARMS = {
  'cmedl_old': "the 2026-11 study's switches (configs/study.py METHOD_SWITCHES)",
  'cmedl_authors': "the teacher's gradient into the translator at the authors' effective scale",
}


def run(
  name,
  group,
  setting,
  arm,
  seed,
  source=None,
  switches='defaults',
  method=None,
  requires=None,
  **overrides,
):
  """One training run: configs/study.py:SETTING,METHOD,unet,cyclegan[,SWITCHES] + overrides.

  arm: what the report calls it (student_only, cmedl, self_distill, cmedl_old, ...); source:
  the student's dataset (DATASETS key; default the setting's); method: configs/study.py's
  (default: cmedl for cmedl* arms, else the arm); requires: a run trained first in the same
  job (two-stage: stage 2's translator is loaded from it)."""
  method = method or ('cmedl' if arm.startswith('cmedl') else arm)
  return dict(
    name=name,
    group=group,
    setting=setting,
    arm=arm,
    method=method,
    seed=seed,
    source=source or SOURCE_KIND[setting],
    switches=switches,
    requires=requires,
    overrides={'seed': seed, **overrides},
  )


def plan_runs(extended=()):
  """All runs of docs/STUDY_PLAN.md, in its order of priority; `extended`: settings whose
  primary arms get EXTRA_SEEDS too (the plan's one extension of an inconclusive setting)."""
  runs = []
  for setting in SETTINGS:
    for seed in list(PRIMARY_SEEDS) + list(EXTRA_SEEDS) * (setting in extended):
      for arm in ('student_only', 'cmedl'):
        runs.append(run(f'{setting}-{arm}-s{seed}', 'primary', setting, arm, seed))
  for cue, labels in CELLS[1:]:
    extra = {'data.source.train_cases': SCARCE_CASES} if labels == 'scarce' else {}
    source = 'thorax_ct_cue' if cue == 'cue' else 'thorax_ct'
    arms = ('student_only', 'cmedl') + (('self_distill',) if (cue, labels) == CELLS[3] else ())
    for seed in FACTORIAL_SEEDS:
      for arm in arms:
        name = f'factorial-{cue}-{labels}-{arm}-s{seed}'
        runs.append(run(name, 'factorial', 'informative', arm, seed, source, **extra))
  for switches in ('old', 'authors'):
    for seed in SENSITIVITY_SEEDS:
      name = f'sensitivity-cmedl_{switches}-s{seed}'
      runs.append(
        run(name, 'sensitivity', 'informative', f'cmedl_{switches}', seed, None, switches)
      )
  return runs


def ablation_runs():
  """The exploratory ablations (ABLATIONS x ABLATION_SEEDS), seed by seed."""
  runs = []
  for seed in ABLATION_SEEDS:
    for arm, (_, overrides) in ABLATIONS.items():
      name = f'ablation-{arm}-s{seed}'
      if arm == 'two_stage':
        stage1 = run(f'{name}-stage1', 'ablation', 'informative', arm, seed, method='stage1')
        runs.append(
          run(name, 'ablation', 'informative', arm, seed, method='stage2', requires=stage1)
        )
      else:
        runs.append(run(name, 'ablation', 'informative', arm, seed, method='cmedl', **overrides))
  return runs


def tiny_runs():
  return [
    run('informative-student_only-s0', 'primary', 'informative', 'student_only', 0),
    run('informative-cmedl-s0', 'primary', 'informative', 'cmedl', 0),
  ]


def cell_of(r):
  """The factorial cell (cue, labels) of an informative run."""
  cue = 'cue' if r['source'] == 'thorax_ct_cue' else 'none'
  return cue, 'scarce' if 'data.source.train_cases' in r['overrides'] else 'rich'


def has_teacher(r):
  return r['method'] in ('cmedl', 'stage2')


def teacher_run(r):
  """The pseudo-run 'the teacher of CMEDL run r on pseudo-target images' (same seed, group)."""
  return dict(r, name=f'{r["name"]}#teacher', method='cmedl_teacher')


def cell_runs(runs, cue, labels):
  """The informative runs of factorial cell (cue, labels), seeds FACTORIAL_SEEDS."""
  return [
    r
    for r in runs
    if r['setting'] == 'informative'
    and r['group'] in ('primary', 'factorial')
    and r['seed'] in FACTORIAL_SEEDS
    and cell_of(r) == (cue, labels)
  ]


def is_extra_seed(r):
  """True for a primary run of the plan's one extension (a seed of EXTRA_SEEDS)."""
  return r['group'] == 'primary' and r['seed'] in EXTRA_SEEDS


def training_order(r):
  """Sort key of the runs to train: the plan's own runs in its order, then its extension (extra
  seeds), then the exploratory ablations (sorted() keeps the order within each)."""
  if r['group'] == 'ablation':
    return 2
  return int(is_extra_seed(r))
