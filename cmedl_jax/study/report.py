"""The study's report (markdown) and its figures, built from the run records alone.

The prose that is not computed lives in report_text/*.md (str.format templates).
"""

from __future__ import annotations

import collections
import datetime
import os
import re

import numpy as np

from cmedl_jax import environment
from cmedl_jax.study import comparisons as cmp
from cmedl_jax.study import figures
from cmedl_jax.study import plan
from cmedl_jax.study import tables
from cmedl_jax.study.records import class_dsc
from cmedl_jax.study.records import record_classes
from cmedl_jax.study.records import run_cpus
from cmedl_jax.study.records import values
from data_prep import files

TEXT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'report_text')


def text(name, **fields):
  """report_text/NAME.md without its final newline, its {fields} filled in."""
  with open(os.path.join(TEXT_DIR, f'{name}.md'), encoding='utf-8') as f:
    return f.read().removesuffix('\n').format(**fields)


def equal_length_check(runs, records):
  """The Deviations sentence on the plan's equal-setting length check, or None without runs."""
  sel = dict(group='primary', setting='equal', arm='student_only')
  organs = values(
    runs, records, lambda rec: [class_dsc(rec, c) for c in record_classes(rec)], **sel
  )
  final_val = values(
    runs, records, lambda v: v[-1]['val_dsc'] if v else np.nan, key='validation', **sel
  )
  if not organs:
    return None
  lowest = min(min(dsc) for dsc in organs.values())
  lowest_val = min(filter(np.isfinite, final_val.values()), default=np.nan)
  return text(
    'equal_length_check',
    lowest_validation=tables.fmt(lowest_val),
    lowest_test=tables.fmt(lowest),
    above='above' if lowest > 0.5 else 'not above',
  )


def mixed_cpus(runs, records):
  """The Deviations sentence on paired arms trained on different CPU models, or None."""
  mixed = []
  for r in runs:
    other = re.sub('-(cmedl|self_distill)-', '-student_only-', r['name'])
    if other == r['name'] or r['name'] not in records or other not in records:
      continue
    a, b = run_cpus(records[other]), run_cpus(records[r['name']])
    if a != b:
      shown_cpus = ' / '.join(', '.join(sorted(x)) if x else 'unrecorded' for x in (a, b))
      mixed.append(f'{r["name"]} ({shown_cpus})')
  return text('mixed_cpus', runs='; '.join(mixed)) if mixed else None


def recorded_checks(runs, records):
  """The Deviations section's sentences on what the records say of the plan's equal-setting
  length check and of paired arms trained on different CPU models."""
  return [s for s in (equal_length_check(runs, records), mixed_cpus(runs, records)) if s]


def _side(t):
  """Where a t-interval lies: 'above 0', 'below 0' or 'includes 0'."""
  if not (np.isfinite(t['low']) and np.isfinite(t['high'])):
    return 'no interval'
  return 'above 0' if t['low'] > 0 else ('below 0' if t['high'] < 0 else 'includes 0')


def _said_interval(label, t, n_seeds):
  """'label d [interval] (n seeds, where the interval lies)' for the discussion."""
  return f'{label} {tables.interval(t)} ({n_seeds} seed{"s" * (n_seeds != 1)}, {_side(t)})'


def decisions_said(tests):
  """The discussion's sentences on each setting's decision."""
  said = []
  for setting, t in tests.items():
    if t['n_seeds'] < 2:
      said.append(f'The {setting} setting has no result yet.')
      continue
    said.append(
      f'{setting.capitalize()} setting, {t["n_seeds"]} seeds: CMEDL minus the student alone '
      f'{tables.interval(t)} DSC, sign-flip p {tables.p_value(t["p"])} '
      f"(Holm {tables.p_value(t['p_holm'])}): **{t['decision']}** by the plan's rule."
    )
  return ' '.join(said)


def teacher_said(runs, records):
  """The discussion's paragraph on the teacher against its own CMEDL student ('' without)."""
  gaps = {}
  for setting in plan.SETTINGS:
    _, t = cmp.teacher_gap(runs, records, setting)
    if t is not None and t['n_seeds'] >= 2:
      gaps[setting] = t
  if not gaps:
    return ''
  listed = '; '.join(f'{s} {tables.interval(t)} ({t["n_seeds"]} seeds)' for s, t in gaps.items())
  said = (
    "\n\nThe teacher, segmenting the translator's output of the same test volumes, minus its "
    f'own CMEDL student (mean test DSC): {listed}. '
  )
  if all(_side(t) == 'below 0' for t in gaps.values()):
    said += text('teacher_worse')
  return said


def factorial_said(comparisons):
  """The discussion's paragraph on the premise factorial ('' without factorial results)."""

  def said_cells(arm):
    """'cell d [interval] (n seeds, side); ...' of the factorial cells that have `arm`."""
    return '; '.join(
      _said_interval(c, t, len(n)) for c, a, ((_, _, n, t), _) in comparisons if a == arm and n
    )

  cells, controls = said_cells('cmedl'), said_cells('self_distill')
  if not cells:
    return ''
  said = '\n\n' + text('factorial_said', cells=cells)
  if controls:
    said += ' ' + text('controls_said', controls=controls)
  return said


def exploratory_said(exploratory):
  """The discussion's paragraph on the sensitivity arms and ablations (exploratory_comparisons)."""
  if not exploratory:
    return ''
  arms = '; '.join(_said_interval(c['arm'], c['vs_cmedl'], len(c['dsc'])) for c in exploratory)
  said = (
    '\n\nSensitivity arms and ablations (exploratory, seeds 0-2: intervals, not decisions), '
    f'minus CMEDL with the defaults on the same seeds: {arms}.'
  )
  gaps = {c['arm']: c['teacher_gap'] for c in exploratory if c['teacher_gap']}
  reached = [arm for arm, t in gaps.items() if t['mean'] >= 0]
  if gaps:
    listed = '; '.join(_said_interval(arm, t, t['n_seeds']) for arm, t in gaps.items())
    said += f" The teacher's mean test DSC minus its student's, per arm: {listed}; " + (
      f"the teacher's mean reaches its student's in {', '.join(reached)}."
      if reached
      else "in no arm does the teacher's mean reach its student's."
    )
  return said


def discussion(tests, runs, records, comparisons, exploratory=()):
  """The decisions, the teacher against its student, the factorial and the exploratory arms
  (exploratory_comparisons of sensitivity and ablation), said from the data."""
  return (
    decisions_said(tests)
    + teacher_said(runs, records)
    + factorial_said(comparisons)
    + exploratory_said(exploratory)
    + '\n\n'
    + text('limits')
  )


def run_counts(runs, records):
  """'**k of n planned runs**', then ' and k of n exploratory ablation runs' and ' (with k
  translator-only stage-1 runs)' where there are any."""
  planned = [r for r in runs if r['group'] != 'ablation']
  added = [r for r in runs if r['group'] == 'ablation']
  counts = f'**{sum(r["name"] in records for r in planned)} of {len(planned)} planned runs**'
  if added:
    counts += (
      f' and {sum(r["name"] in records for r in added)} of {len(added)} exploratory ablation runs'
    )
  first_stages = sum(bool(r['requires']) and r['requires']['name'] in records for r in runs)
  if first_stages:
    counts += f' (with {first_stages} translator-only stage-1 run{"s" * (first_stages != 1)})'
  return counts


def header(tests, runs, records, tiny):
  """The title, where the report and its runs come from, and the primary decisions."""
  commits = sorted({rec['run'].get('commit', '?') for rec in records.values()})
  machines = sorted({rec['run'].get('machine', '?').split(' (')[0] for rec in records.values()})
  cpus = collections.Counter(cpu for rec in records.values() for cpu in run_cpus(rec) or ())
  missing = [
    g
    for g in ('primary', 'factorial', 'sensitivity', 'ablation')
    if any(r['group'] == g and r['name'] not in records for r in runs)
  ]
  return text(
    'header',
    tiny_flag=' --tiny' if tiny else '',
    commit=environment.commit() or 'unknown',
    date=datetime.date.today().isoformat(),
    counts=run_counts(runs, records),
    minutes=f'{sum(rec["run"]["seconds"] for rec in records.values()) / 60:.0f}',
    commits=', '.join(f'`{c}`' for c in commits) or '—',
    machines=', '.join(machines) or '—',
    cpus=', '.join(f'{c} ({n})' for c, n in sorted(cpus.items())) or 'none',
    unrecorded=sum('environment' not in rec for rec in records.values()),
    still_to_run=text('still_to_run', groups=', '.join(missing)) + ' ' if missing else '',
    paper=text('paper'),
    tiny_note=text('tiny_note') if tiny else '',
    primary_table=tables.primary_section(tests),
  )


def figures_section(fig_dir, tests, runs, records, comparisons, exploratory):
  """The Figures section (written to fig_dir; '' when there is nothing to show)."""
  shown = []
  rows = [(f'{s} (primary)', t) for s, t in tests.items() if t['n_seeds']]
  rows += [(f'{cell} {arm}', t) for cell, arm, ((_, _, _, t), _) in comparisons if t['n_seeds']]
  if figures.differences_figure(
    rows,
    f'{fig_dir}/paired_differences.png',
    'DSC difference, arm − student alone (same seed); red: +0.02 margin',
  ):
    shown.append('![per-seed paired differences](RESULTS_figures/paired_differences.png)')
  if figures.differences_figure(
    [(c['arm'], c['vs_cmedl']) for c in exploratory if c['vs_cmedl']['n_seeds']],
    f'{fig_dir}/exploratory_differences.png',
    'DSC difference, arm − CMEDL with the defaults (same seed); exploratory',
    margin=False,
  ):
    shown.append(
      '![exploratory arms against CMEDL with the defaults]'
      '(RESULTS_figures/exploratory_differences.png)'
    )
  if figures.curves_figure(runs, records, f'{fig_dir}/validation_curves.png'):
    shown.append('![validation DSC curves](RESULTS_figures/validation_curves.png)')
  curve_table = tables.curve_differences_section(runs, records)
  if curve_table:
    shown.append(text('curve_table', table=curve_table))
  return '## Figures\n\n' + '\n\n'.join(shown) + '\n' if shown else ''


def deviations(runs, records):
  """The Deviations section: the plan's departures, what the records say, the ablations."""
  items = [text('deviations')] + [f'- {s}' for s in recorded_checks(runs, records)]
  if any(r['group'] == 'ablation' for r in runs):
    items.append('- ' + text('addition'))
  return '## Deviations from the plan\n\n' + '\n'.join(items) + '\n'


def build_report(out, runs, records, tiny):
  """Writes the report (markdown) and its figures (RESULTS_figures/ beside it) from records."""
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(out)), 'RESULTS_figures')
  tests = cmp.primary(runs, records)
  comparisons = cmp.factorial_comparisons(runs, records)
  sensitivity = cmp.exploratory_comparisons(runs, records, 'sensitivity', plan.SENSITIVITY_ARMS)
  ablations = cmp.exploratory_comparisons(
    runs, records, 'ablation', {arm: what for arm, (what, _) in plan.ABLATIONS.items()}
  )
  parts = [
    header(tests, runs, records, tiny),
    text('secondary', table=tables.secondary_section(runs, records)),
    text('factorial', scarce_cases=plan.SCARCE_CASES, table=tables.factorial_section(comparisons)),
    text('sensitivity', table=tables.exploratory_section(sensitivity, 'sensitivity')),
  ]
  if any(r['group'] == 'ablation' for r in runs):
    parts.append(text('ablations', table=tables.exploratory_section(ablations, 'ablation')))
  exploratory = sensitivity + ablations
  figures_text = figures_section(fig_dir, tests, runs, records, comparisons, exploratory)
  parts += [figures_text] if figures_text else []
  parts += [
    text('every_run', table=tables.run_table(runs, records)),
    deviations(runs, records),
    text('errata') + '\n',
    '## Discussion\n\n' + discussion(tests, runs, records, comparisons, exploratory) + '\n',
  ]
  files.atomic_write(out, '\n'.join(parts).encode())
