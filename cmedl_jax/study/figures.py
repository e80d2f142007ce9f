"""The report's figures: per-seed paired differences and validation curves (PNG)."""

from __future__ import annotations

import numpy as np

from cmedl_jax.evaluation import plots as eval_plots
from cmedl_jax.evaluation import statistics as eval_stats
from cmedl_jax.study import plan
from cmedl_jax.study.records import case_dsc
from cmedl_jax.study.records import validation_curves
from cmedl_jax.study.records import values


def differences_figure(rows, path, xlabel, margin=True):
  """Per-seed paired differences (dots) with mean and 95 % t-interval (bar), one row each.
  rows: [(label, seed_level_test of the per-seed differences)]; margin: mark +0.02."""
  if not rows:
    return False
  plt = eval_plots.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
  for i, (label, t) in enumerate(rows):
    d = t['differences']
    y = len(rows) - 1 - i
    ax.plot(d, [y] * len(d), 'o', color='tab:blue', alpha=0.6, ms=4)
    if np.isfinite(t['low']):
      ax.plot([t['low'], t['high']], [y, y], '-', color='black', lw=2)
    ax.plot([t['mean']], [y], 'D', color='black', ms=5)
  ax.axvline(0, color='gray', lw=0.8)
  if margin:
    ax.axvline(eval_stats.MARGIN_DSC, color='tab:red', lw=0.8, ls='--')
  ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
  ax.set_xlabel(xlabel)
  eval_plots.save_figure(fig, path)
  plt.close(fig)
  return True


def curves_figure(runs, records, path):
  """Validation DSC against step, mean over seeds: student alone, CMEDL student, its teacher."""
  panels = [s for s in plan.SETTINGS if values(runs, records, case_dsc, group='primary', setting=s)]
  if not panels:
    return False
  plt = eval_plots.pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, setting in zip(axes[0], panels):
    for arm, tag, label in (
      ('student_only', 'val_dsc', 'student alone'),
      ('cmedl', 'val_dsc', 'CMEDL student'),
      ('cmedl', 'val_teacher_dsc', 'CMEDL teacher (pseudo-target)'),
    ):
      curves = validation_curves(runs, records, setting, arm, tag)
      steps = sorted({s for c in curves.values() for s in c})
      if curves and steps:
        mean = [np.nanmean([c.get(s, np.nan) for c in curves.values()]) for s in steps]
        ax.plot(steps, mean, label=f'{label} ({len(curves)} seeds)')
    ax.set_title(setting, fontsize=9)
    ax.set_xlabel('step')
    ax.set_ylabel('validation DSC')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
  eval_plots.save_figure(fig, path)
  plt.close(fig)
  return True
