"""The evaluation's files: cases.csv, tumors.csv, inter_rater.csv, summary.json, summary.md.

Each is written atomically (`files.atomic_write`). CSV floats are `repr` (round trip);
JSON has no inf/NaN, so they are written as the strings "inf", "-inf", "nan".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Sequence

from data_prep import files

EMPTY_TUMORS_CSV = 'method,case,class,tumor\n'  # tumors.csv when no tumor was evaluated.


def _csv_text(rows: Sequence[dict]) -> str:
  """CSV of `rows`: the columns in first-seen order, floats as repr."""
  fields = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
  return buf.getvalue()


def json_safe(obj):
  """JSON has no inf/NaN: they become the strings "inf", "-inf", "nan"."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return 'nan' if math.isnan(obj) else ('inf' if obj > 0 else '-inf')
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def _fmt(x, digits=3) -> str:
  return 'nan' if not math.isfinite(x) else f'{x:.{digits}f}'


def _summary_table(stats_rows, group_keys) -> str:
  head = group_keys + ['metric', 'n', 'mean ± sd', 'median [q1, q3]', 'inf', 'nan']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for s in stats_rows:
    lines.append(
      '| '
      + ' | '.join(
        [str(s[k]) for k in group_keys]
        + [
          s['metric'],
          str(s['n']),
          f'{_fmt(s["mean"])} ± {_fmt(s["sd"])}',
          f'{_fmt(s["median"])} [{_fmt(s["q1"])}, {_fmt(s["q3"])}]',
          str(s['n_inf']),
          str(s['n_nan']),
        ]
      )
      + ' |'
    )
  return '\n'.join(lines)


def _detection_table(detection) -> str:
  lines = [
    '| method | class | tumors | detected | rate | FP components |',
    '|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {d["method"]} | {d["class"]} | {d["n_tumors"]} | {d["n_detected"]} | '
    f'{_fmt(d["detection_rate"])} | {d["n_fp_components"]} |'
    for d in detection
  ]
  return '\n'.join(lines)


def _wilcoxon_table(wilcoxon, methods) -> str:
  lines = [
    f'B = {methods[1]} vs A = {methods[0]}, two-sided paired Wilcoxon '
    f'signed-rank test (scipy.stats.wilcoxon).\n',
    '| level | class | metric | pairs | median A | median B | median B−A | p |',
    '|---|---|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {w["level"]} | {w["class"]} | {w["metric"]} | {w["n_pairs"]} | '
    f'{_fmt(w["median_a"])} | {_fmt(w["median_b"])} | '
    f'{_fmt(w["median_diff_b_minus_a"])} | {_fmt(w["p_value"], 4)} |'
    for w in wilcoxon
  ]
  return '\n'.join(lines)


def summary_markdown(summary: dict) -> str:
  """summary.md: settings, per-case and per-tumor statistics, detection, tests, raters."""
  s = summary['settings']
  parts = [
    f'# Segmentation evaluation\n\nreference: `{s["ref"][0]}`; methods: '
    f'{", ".join(s["methods"])}; tolerance {s["tolerance_mm"]} mm; '
    f'{s["n_cases"]} cases. Statistics over finite values; `inf` counts cases with '
    f'one mask empty (DSC 0, distances inf).',
    '## Per case\n\n' + _summary_table(summary['per_case'], ['method', 'class']),
  ]
  if summary['per_tumor']:
    parts.append(
      '## Per tumor (reference connected components)\n\n'
      + _summary_table(summary['per_tumor'], ['method', 'class'])
    )
  if summary['detection']:
    parts.append('## Detection\n\n' + _detection_table(summary['detection']))
  if summary['wilcoxon']:
    parts.append('## Paired tests\n\n' + _wilcoxon_table(summary['wilcoxon'], s['methods']))
  if summary['inter_rater']:
    parts.append(
      '## Inter-rater agreement\n\n' + _summary_table(summary['inter_rater'], ['pair', 'class'])
    )
  return '\n\n'.join(parts) + '\n'


def write_reports(out_dir: str, summary: dict, case_rows, tumor_rows, rater_rows) -> str:
  """Writes the tables and summaries into `out_dir`; returns the markdown summary.

  inter_rater.csv only when there are rater rows; summary.json via json_safe.
  """
  os.makedirs(out_dir, exist_ok=True)
  files.atomic_write(os.path.join(out_dir, 'cases.csv'), _csv_text(case_rows))
  files.atomic_write(
    os.path.join(out_dir, 'tumors.csv'), _csv_text(tumor_rows) if tumor_rows else EMPTY_TUMORS_CSV
  )
  if rater_rows:
    files.atomic_write(os.path.join(out_dir, 'inter_rater.csv'), _csv_text(rater_rows))
  files.atomic_write(
    os.path.join(out_dir, 'summary.json'), json.dumps(json_safe(summary), indent=1) + '\n'
  )
  markdown = summary_markdown(summary)
  files.atomic_write(os.path.join(out_dir, 'summary.md'), markdown)
  return markdown
