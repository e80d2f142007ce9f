"""The report's tables (markdown) and its number formats, from the records and comparisons."""

from __future__ import annotations

import functools

import numpy as np

from cmedl_jax.evaluation import statistics as eval_stats
from cmedl_jax.study import plan
from cmedl_jax.study.comparisons import teacher_gap
from cmedl_jax.study.records import case_dsc
from cmedl_jax.study.records import class_dsc
from cmedl_jax.study.records import detection_rate
from cmedl_jax.study.records import fp_per_case
from cmedl_jax.study.records import hd95_median
from cmedl_jax.study.records import paired
from cmedl_jax.study.records import record_classes
from cmedl_jax.study.records import tumor_dsc
from cmedl_jax.study.records import validation_curves
from cmedl_jax.study.records import values


def fmt(x, digits=3, sign=False):
  if x is None or not np.isfinite(x):
    return 'n/a' if x is None or np.isnan(x) else ('inf' if x > 0 else '-inf')
  return f'{x:+.{digits}f}' if sign else f'{x:.{digits}f}'


def p_value(p):
  return 'n/a' if not np.isfinite(p) else (f'{p:.4f}' if p >= 1e-4 else f'{p:.1e}')


def mean_sd(v):
  """'mean ± sd (n)' of a {seed: value}."""
  x = np.asarray([v[k] for k in sorted(v)], float)
  if not x.size:
    return 'n/a'
  sd = f' ± {x.std(ddof=1):.3f}' if x.size > 1 else ''
  return f'{x.mean():.3f}{sd} ({x.size})'


def interval(t):
  return f'{fmt(t["mean"], sign=True)} [{fmt(t["low"], sign=True)}, {fmt(t["high"], sign=True)}]'


def primary_section(tests):
  lines = [
    '| setting | seeds | per-seed d (CMEDL − student alone, mean test DSC) | mean d [95 % t-interval] '
    '| sign-flip p | Holm p | decision |',
    '|---|---|---|---|---|---|---|',
  ]
  for setting, t in tests.items():
    per_seed = ', '.join(f's{s} {fmt(d, sign=True)}' for s, d in zip(t['seeds'], t['differences']))
    decision = (
      t['decision']
      if t['n_seeds'] >= 2
      else ('one seed: no test' if t['n_seeds'] else 'not run yet')
    )
    lines.append(
      f'| {setting} | {t["n_seeds"]} | {per_seed or "—"} | {interval(t)} | {p_value(t["p"])} | '
      f'{p_value(t["p_holm"])} | **{decision}** |'
    )
  extended = [s for s, t in tests.items() if t['n_seeds'] > len(plan.PRIMARY_SEEDS)]
  if extended:
    lines.append(
      f'\n{", ".join(extended)}: seeds 8-11 added once after an inconclusive first decision, '
      'as the plan allows; the decision above is the second (sequential addition makes the '
      'test slightly anti-conservative).'
    )
  return '\n'.join(lines)


def run_table(runs, records):
  """One row per recorded run: every value the tables above are built from."""
  lines = [
    '| run | arm | seed | test DSC | juxta-med. tumour DSC | peripheral tumour DSC | detected '
    '| FP comp./case | HD95 median (mm) | teacher DSC | minutes | commit |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in runs:
    rec = records.get(r['name'])
    if rec is None:
      continue
    ev, teacher = rec['eval'], rec.get('teacher')
    lines.append(
      f'| {r["name"]} | {r["arm"]} | {r["seed"]} | {fmt(case_dsc(ev))} | '
      f'{fmt(tumor_dsc(ev, "juxta_mediastinal"))} | {fmt(tumor_dsc(ev, "peripheral"))} | '
      f'{fmt(detection_rate(ev), 2)} | {fmt(fp_per_case(ev), 1)} | {fmt(hd95_median(ev), 1)} | '
      f'{fmt(case_dsc(teacher)) if teacher else ""} | {rec["run"]["seconds"] / 60:.1f} | '
      f'`{rec["run"].get("commit", "?")}` |'
    )
  return '\n'.join(lines)


def secondary_section(runs, records):
  lines = [
    '| setting | endpoint | student alone | CMEDL student | d [95 % t-interval] | sign-flip p |',
    '|---|---|---|---|---|---|',
  ]
  endpoints = (
    ('juxta-mediastinal tumour DSC', functools.partial(tumor_dsc, kind='juxta_mediastinal')),
    ('peripheral tumour DSC', functools.partial(tumor_dsc, kind='peripheral')),
    ('tumours detected (fraction)', detection_rate),
    ('false-positive components per case', fp_per_case),
    ('HD95 median (mm)', hd95_median),
  )
  for setting in plan.SETTINGS:
    sel = dict(group='primary', setting=setting)
    organs = ()
    if setting == 'equal':
      first = next(
        (
          records[r['name']]['eval']
          for r in runs
          if r['name'] in records and r['setting'] == setting and r['group'] == 'primary'
        ),
        None,
      )
      organs = record_classes(first) if first else ()
    for label, value in endpoints + tuple(
      (f'{organ} DSC', functools.partial(class_dsc, cls=organ)) for organ in organs
    ):
      if setting == 'equal' and 'tumour' in label:
        continue
      a = values(runs, records, value, arm='student_only', **sel)
      b = values(runs, records, value, arm='cmedl', **sel)
      seeds, d = paired(a, b)
      if not seeds:
        continue
      d = [x for x in d if np.isfinite(x)]
      t = eval_stats.seed_level_test(d)
      lines.append(
        f'| {setting} | {label} | {mean_sd(a)} | {mean_sd(b)} | {interval(t)} | {p_value(t["p"])} |'
      )
    teacher, t = teacher_gap(runs, records, setting)
    if teacher:
      lines.append(
        f'| {setting} | teacher DSC on the pseudo-target (vs its own student) | — | '
        f'{mean_sd(teacher)} | teacher − student {interval(t)} | {p_value(t["p"])} |'
      )
  return '\n'.join(lines)


def factorial_section(comparisons):
  lines = [
    '| cue / CT labels | arm | seeds | student alone DSC | arm DSC | d [95 % t-interval] | p '
    '| d juxta-med. tumours [interval] |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for cell, arm, ((a, b, seeds, t), (_, _, _, tj)) in comparisons:
    lines.append(
      f'| {cell} | {arm} | {len(seeds)} | {mean_sd(a)} | {mean_sd(b)} | {interval(t)} | '
      f'{p_value(t["p"])} | {interval(tj)} |'
    )
  return '\n'.join(lines)


def exploratory_section(comparisons, group):
  """The table of exploratory_comparisons(...) of `group`."""
  lines = [
    '| arm | what changes | seeds | arm DSC | d vs student alone [95 % t-interval] '
    '| d vs CMEDL defaults | d juxta-med. tumours vs CMEDL | teacher DSC |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for c in comparisons:
    lines.append(
      f'| {c["arm"]} | {c["what"]} | {len(c["dsc"])} | {mean_sd(c["dsc"])} | '
      f'{interval(c["vs_student"])} | {interval(c["vs_cmedl"])} | '
      f'{interval(c["juxta_vs_cmedl"])} | {mean_sd(c["teacher"]) if c["teacher"] else "—"} |'
    )
  return '\n'.join(lines) if comparisons else f'No {group} run recorded yet.'


def curve_differences_section(runs, records):
  """Validation DSC, CMEDL student minus the student alone (same seed), at each validation step:
  mean over seeds and how many seeds are above 0 (exploratory: speed of learning, no test)."""
  rows = []
  for setting in plan.SETTINGS:
    curves = {
      arm: validation_curves(runs, records, setting, arm) for arm in ('student_only', 'cmedl')
    }
    seeds = sorted(set(curves['student_only']) & set(curves['cmedl']))
    if not seeds:
      continue
    steps = sorted(set.intersection(*(set(curves[a][s]) for a in curves for s in seeds)))
    cells = []
    for step in steps:
      d = np.array([curves['cmedl'][s][step] - curves['student_only'][s][step] for s in seeds])
      cells.append(f'{d.mean():+.3f} ({int((d > 0).sum())}/{len(d)})')
    rows.append((setting, steps, cells))
  if not rows:
    return ''
  steps = rows[0][1]
  lines = ['| setting | ' + ' | '.join(str(s) for s in steps) + ' |', '|---|' + '---|' * len(steps)]
  lines += [f'| {setting} | ' + ' | '.join(cells) + ' |' for setting, _, cells in rows]
  return '\n'.join(lines)
