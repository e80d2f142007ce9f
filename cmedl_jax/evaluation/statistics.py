"""Statistics of metric rows: summaries over finite values, detection, paired tests.

Rows are the dicts of `cases` (per case, per tumor, inter-rater). inf (one mask empty) and
NaN values are counted, never averaged; paired tests exclude and count pairs with either.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from cmedl_jax.evaluation import metrics


def describe(values) -> dict:
  """n, counts of inf/NaN and mean, sd (ddof 1), median, q1, q3, IQR of finite values."""
  v = np.asarray(list(values), np.float64)
  finite = v[np.isfinite(v)]
  out = {
    'n': int(v.size),
    'n_finite': int(finite.size),
    'n_inf': int(np.isinf(v).sum()),
    'n_nan': int(np.isnan(v).sum()),
  }
  if finite.size:
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    out.update(
      mean=float(finite.mean()),
      sd=float(finite.std(ddof=1)) if finite.size > 1 else float('nan'),
      median=float(median),
      q1=float(q1),
      q3=float(q3),
      iqr=float(q3 - q1),
    )
  else:
    out.update({k: float('nan') for k in ('mean', 'sd', 'median', 'q1', 'q3', 'iqr')})
  return out


def summarize(
  rows: Sequence[dict], keys: Sequence[str], metric_names: Sequence[str] = metrics.METRIC_NAMES
) -> list[dict]:
  """describe() of each metric per group of `keys` (in first-seen order)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return [
    {**dict(zip(keys, group)), 'metric': m, **describe(r[m] for r in members)}
    for group, members in groups.items()
    for m in metric_names
  ]


def detection_counts(case_rows, tumor_rows) -> list[dict]:
  """Per method and class: tumors, detected tumors, false-positive predicted components."""
  out = {}
  for row in case_rows:
    entry = out.setdefault(
      (row['method'], row['class']),
      {
        'method': row['method'],
        'class': row['class'],
        'n_tumors': 0,
        'n_detected': 0,
        'n_fp_components': 0,
      },
    )
    entry['n_fp_components'] += row['n_fp_components']
  for row in tumor_rows:
    entry = out[(row['method'], row['class'])]
    entry['n_tumors'] += 1
    entry['n_detected'] += int(row['detected'])
  for entry in out.values():
    entry['detection_rate'] = (
      entry['n_detected'] / entry['n_tumors'] if entry['n_tumors'] else float('nan')
    )
  return list(out.values())


def wilcoxon_tests(
  rows_a,
  rows_b,
  pair_keys: Sequence[str],
  level: str,
  metric_names: Sequence[str] = metrics.METRIC_NAMES,
) -> list[dict]:
  """Paired two-sided Wilcoxon signed-rank tests (scipy.stats.wilcoxon) of B vs A.

  Rows are paired by `pair_keys` (e.g. case and class); grouped by class. Pairs where
  either value is inf or NaN are excluded and counted. p is NaN with fewer than 2 pairs
  or when all differences are zero.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  index_b = {tuple(r[k] for k in pair_keys): r for r in rows_b}
  out = []
  classes = list(dict.fromkeys(r['class'] for r in rows_a))
  for cls in classes:
    pairs = [(r, index_b.get(tuple(r[k] for k in pair_keys))) for r in rows_a if r['class'] == cls]
    pairs = [(a, b) for a, b in pairs if b is not None]
    for m in metric_names:
      a = np.array([p[0][m] for p in pairs], np.float64)
      b = np.array([p[1][m] for p in pairs], np.float64)
      ok = np.isfinite(a) & np.isfinite(b)
      a, b = a[ok], b[ok]
      diff = b - a
      entry = {
        'level': level,
        'class': cls,
        'metric': m,
        'n_pairs': int(a.size),
        'n_excluded_nonfinite': int((~ok).sum()),
        'median_a': float(np.median(a)) if a.size else float('nan'),
        'median_b': float(np.median(b)) if b.size else float('nan'),
        'median_diff_b_minus_a': float(np.median(diff)) if a.size else float('nan'),
        'statistic': float('nan'),
        'p_value': float('nan'),
      }
      if a.size >= 2 and np.any(diff != 0):
        with warnings.catch_warnings():
          warnings.simplefilter('ignore')
          result = stats.wilcoxon(b, a)
        entry['statistic'], entry['p_value'] = float(result.statistic), float(result.pvalue)
      out.append(entry)
  return out


def paired_tests(case_rows, tumor_rows, name_a: str, name_b: str) -> list[dict]:
  """wilcoxon_tests of method B vs A: per case, then per tumor (when there are tumor rows)."""
  rows_a = [r for r in case_rows if r['method'] == name_a]
  rows_b = [r for r in case_rows if r['method'] == name_b]
  tests = wilcoxon_tests(rows_a, rows_b, ('case', 'class'), 'case')
  tumors_a = [r for r in tumor_rows if r['method'] == name_a]
  tumors_b = [r for r in tumor_rows if r['method'] == name_b]
  if tumors_a:
    tests += wilcoxon_tests(tumors_a, tumors_b, ('case', 'class', 'tumor'), 'tumor')
  return tests


def summary_sections(case_rows, tumor_rows, rater_rows, pair=None) -> dict:
  """The statistics of summary.json: per_case, per_tumor, detection, wilcoxon, inter_rater.

  pair: (name of method A, name of method B) for paired tests of B vs A, or None.
  """
  return {
    'per_case': summarize(case_rows, ['method', 'class']),
    'per_tumor': summarize(tumor_rows, ['method', 'class']) if tumor_rows else [],
    'detection': detection_counts(case_rows, tumor_rows),
    'wilcoxon': paired_tests(case_rows, tumor_rows, *pair) if pair else [],
    'inter_rater': summarize(rater_rows, ['pair', 'class']) if rater_rows else [],
  }


# ------------------------------------------------------------- the training run as the unit

PAPER_EFFECT_DSC = 0.04  # The paper's CMEDL gain on lung tumours on CT (0.77 vs 0.73 DSC).
MARGIN_DSC = PAPER_EFFECT_DSC / 2  # "not reproduced": the interval's upper end below this.


def seed_level_test(differences, level=0.95, margin=MARGIN_DSC) -> dict:
  """Tests per-seed paired differences (e.g. one DSC difference per training seed: CMEDL
  student minus student alone, same seed, averaged over the same test cases).

  Returns {'n_seeds', 'differences' (the values tested, floats), 'mean', 'low', 'high'
  (two-sided `level` t-interval, scipy), 'p' (exact
  two-sided sign-flip permutation test over all 2^n sign patterns, scipy), 'decision'
  (`decide`)}. NaN interval and p with fewer than 2 seeds.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(differences, np.float64)
  out = {'n_seeds': int(d.size), 'differences': d.tolist()}
  out['mean'] = float(d.mean()) if d.size else float('nan')
  out.update(low=float('nan'), high=float('nan'), p=float('nan'))
  if d.size >= 2:
    interval = stats.ttest_1samp(d, 0.0).confidence_interval(level)
    flips = stats.permutation_test(
      (d,), np.mean, permutation_type='samples', n_resamples=np.inf, alternative='two-sided'
    )
    out.update(low=float(interval.low), high=float(interval.high), p=float(flips.pvalue))
  out['decision'] = decide(out['low'], out['high'], margin)
  return out


def decide(low, high, margin=MARGIN_DSC, p_adjusted=None, alpha=0.05) -> str:
  """'reproduced' if the interval lies above 0 (and, when given, the multiplicity-adjusted p
  is below `alpha`), 'not reproduced' if its upper end is below `margin` (half the paper's
  effect), else 'inconclusive'."""
  if low > 0 and (p_adjusted is None or p_adjusted < alpha):
    return 'reproduced'
  if high < margin:
    return 'not reproduced'
  return 'inconclusive'


def holm(p_values) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given (NaN stays NaN, not counted)."""
  p = np.asarray(p_values, np.float64)
  finite = np.flatnonzero(np.isfinite(p))
  adjusted = np.full(p.shape, np.nan)
  running = 0.0
  for rank, i in enumerate(finite[np.argsort(p[finite], kind='stable')]):
    running = max(running, min(1.0, (finite.size - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def primary_decisions(differences: dict, margin=MARGIN_DSC, alpha=0.05) -> dict:
  """The study's decision rule (docs/STUDY_PLAN.md) over several settings at once.

  differences: {setting: per-seed paired differences}. Returns {setting: seed_level_test(...)
  plus 'p_holm' (Holm over the settings with a p) and 'decision' (`decide` with p_holm)}.
  """
  tests = {k: seed_level_test(d, margin=margin) for k, d in differences.items()}
  adjusted = holm([t['p'] for t in tests.values()])
  for t, p_holm in zip(tests.values(), adjusted):
    t['p_holm'] = p_holm
    t['decision'] = decide(t['low'], t['high'], margin, p_holm, alpha)
  return tests
