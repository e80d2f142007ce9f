"""The study's comparisons from its records: the primary decisions, the teacher against its
student, the premise factorial and the exploratory arms (paired per seed; the seed is the unit)."""

from __future__ import annotations

import functools

import numpy as np

from cmedl_jax.evaluation import statistics as eval_stats
from cmedl_jax.study import plan
from cmedl_jax.study.records import case_dsc
from cmedl_jax.study.records import load_records
from cmedl_jax.study.records import paired
from cmedl_jax.study.records import tumor_dsc
from cmedl_jax.study.records import values


def primary(runs, records):
  """{setting: primary_decisions entry + 'seeds'} (settings without results: n_seeds 0)."""
  diffs, seeds = {}, {}
  for setting in plan.SETTINGS:
    sel = dict(group='primary', setting=setting)
    a = values(runs, records, case_dsc, arm='student_only', **sel)
    b = values(runs, records, case_dsc, arm='cmedl', **sel)
    seeds[setting], diffs[setting] = paired(a, b)
  tests = eval_stats.primary_decisions(diffs)
  for setting, t in tests.items():
    t['seeds'] = seeds[setting]
  return tests


def teacher_gap(runs, records, setting):
  """(teacher DSC {seed: value}, seed-level test of teacher − its own CMEDL student) of a
  setting's primary CMEDL runs; ({}, None) without teacher records."""
  sel = dict(group='primary', setting=setting, arm='cmedl')
  teacher = values(runs, records, case_dsc, key='teacher', **sel)
  if not teacher:
    return teacher, None
  _, d = paired(values(runs, records, case_dsc, **sel), teacher)
  return teacher, eval_stats.seed_level_test(d)


def factorial_comparisons(runs, records):
  """[(cell label, arm, [(student alone {seed: value}, arm {seed: value}, paired seeds,
  seed_level_test of the finite differences)] for case DSC and juxta-mediastinal DSC)]."""
  out = []
  for cue, labels in plan.CELLS:
    cell = plan.cell_runs(runs, cue, labels)
    for arm in ('cmedl', 'self_distill'):
      row = []
      for value in (case_dsc, functools.partial(tumor_dsc, kind='juxta_mediastinal')):
        a = values(cell, records, value, arm='student_only')
        b = values(cell, records, value, arm=arm)
        seeds, d = paired(a, b)
        row.append((a, b, seeds, eval_stats.seed_level_test([x for x in d if np.isfinite(x)])))
      if row[0][2] or arm == 'cmedl':
        out.append((f'{cue}/{labels}', arm, row))
  return [o for o in out if o[1] == 'cmedl' or o[2][0][2]]


def exploratory_comparisons(runs, records, group, arms):
  """Arms of `group` (sensitivity, ablation) that have records, each paired per seed with the
  informative primary arms. arms: {arm: what changes}. -> [{arm, what, dsc, teacher ({seed: mean
  test DSC}), teacher_gap (teacher − its student; None without teacher records), vs_student,
  vs_cmedl, juxta_vs_cmedl (seed_level_test dicts)}]."""
  juxta = functools.partial(tumor_dsc, kind='juxta_mediastinal')
  sel = dict(group='primary', setting='informative')
  base = values(runs, records, case_dsc, arm='student_only', **sel)
  cmedl = values(runs, records, case_dsc, arm='cmedl', **sel)
  cmedl_juxta = values(runs, records, juxta, arm='cmedl', **sel)
  found = []
  for arm, what in arms.items():
    b = values(runs, records, case_dsc, group=group, arm=arm)
    if not b:
      continue
    b_juxta = values(runs, records, juxta, group=group, arm=arm)
    teacher = values(runs, records, case_dsc, key='teacher', group=group, arm=arm)
    d, dc, dj = (
      [x for x in paired(a, v)[1] if np.isfinite(x)]
      for a, v in ((base, b), (cmedl, b), (cmedl_juxta, b_juxta))
    )
    found.append(
      dict(
        arm=arm,
        what=what,
        dsc=b,
        teacher=teacher,
        teacher_gap=eval_stats.seed_level_test(paired(b, teacher)[1]) if teacher else None,
        vs_student=eval_stats.seed_level_test(d),
        vs_cmedl=eval_stats.seed_level_test(dc),
        juxta_vs_cmedl=eval_stats.seed_level_test(dj),
      )
    )
  return found


def inconclusive_settings(records_dir):
  """Settings whose first decision (all PRIMARY_SEEDS recorded) is inconclusive: --extend auto."""
  runs = plan.plan_runs()
  tests = primary(runs, load_records(runs, records_dir))
  return {
    s
    for s, t in tests.items()
    if t['n_seeds'] == len(plan.PRIMARY_SEEDS) and t['decision'] == 'inconclusive'
  }
