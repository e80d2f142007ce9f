"""Issue 15's pilot: the old and the new method defaults on the phantoms, at the study's size.

  python -m cmedl_jax.study.pilot                # trains what is not recorded; docs/PILOT.md + .png
  python -m cmedl_jax.study.pilot --report-only  # rebuilds the report from docs/PILOT_runs/
  python -m cmedl_jax.study.pilot --tiny --root /tmp/p --out /tmp/p/PILOT.md   # pipeline check

One seed, configs/study.py's informative setting (CT student, T2w teacher, 64 px, 6 mm) run
for STEPS steps with whole-volume validation every EVAL_EVERY steps:
  student_only   the student alone (how long until it plateaus),
  cmedl-new      CMEDL with the defaults of configs/default.py (authors' practice: no real
                 target labels, separate teacher BN, history pool 50),
  cmedl-old      CMEDL with the switches of the 2026-11 study (configs/study.py METHOD_SWITCHES),
  cmedl-new-seg  cmedl-new with the teacher's segmentation gradient into the translator at the
                 authors' effective scale (~1 / (B*H*W), loss.seg_to_translator).
Each finished run's small records (config, command and time, validation history) are copied
to docs/PILOT_runs/NAME/ and committed; a run recorded there is not trained again, on any
machine, so the pilot continues across sessions. The pilot chooses the study's training length
and shows whether the teacher learns; it is not the study (one seed, validation volumes only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cmedl_jax.evaluation import plots
from cmedl_jax.study import plan
from cmedl_jax.study import report as study_report
from cmedl_jax.study import runner
from configs import default
from configs import study
from data_prep import files

ROOT = 'runs/pilot'
SEED = 0  # One seed.
STEPS = 3000
EVAL_EVERY = 250
BATCH, SIZE = 8, 64  # configs/study.py's global batch and image side.
RECORDS = os.path.join(runner.REPO, 'docs', 'PILOT_runs')
RECORD_FILES = ('config.json', 'study_run.json', 'validation.json')
TINY_OVERRIDES = dict(plan.TINY_OVERRIDES, **{'train.num_steps': 4})
TINY_EVAL_EVERY = 2
PLATEAU_DSC = 0.03  # student_only has plateaued once its smoothed DSC is this close to its best.
SMOOTH = 4  # Validations averaged (trailing) against their noise.


def new_switches():
  """The method switches of study.METHOD_SWITCHES at their configs/default.py values."""
  config = default.get_config()
  return {k: config[k.split('.')[0]][k.split('.')[1]] for k in study.METHOD_SWITCHES}


def pilot_runs():
  """The pilot's runs, most important first."""
  new = new_switches()
  seg_scale = round(1.0 / (BATCH * SIZE * SIZE), 7)
  return [
    plan.run('student_only', 'pilot', 'informative', 'student_only', SEED),
    plan.run('cmedl-new', 'pilot', 'informative', 'cmedl', SEED, **new),
    plan.run('cmedl-old', 'pilot', 'informative', 'cmedl', SEED),
    plan.run(
      'cmedl-new-seg',
      'pilot',
      'informative',
      'cmedl',
      SEED,
      **{**new, 'loss.seg_to_translator': seg_scale},
    ),
  ]


def schedule(steps, eval_every):
  """Training-length overrides shared by every pilot run."""
  return {
    'train.num_steps': steps,
    'train.eval_every': eval_every,
    'train.checkpoint_every': eval_every,
    'train.image_every': steps,
    'train.keep_checkpoints': 1,
  }


def record(r, root, records):
  """Copies run r's record files to RECORDS/NAME (atomically, study_run.json last)."""
  for name in sorted(RECORD_FILES, key=lambda n: n == 'study_run.json'):
    with open(f'{root}/runs/{r["name"]}/{name}', 'rb') as f:
      files.atomic_write(os.path.join(records, r['name'], name), f.read())


def recorded(r, records):
  return os.path.isfile(os.path.join(records, r['name'], 'study_run.json'))


def load(r, records):
  """(validation history, study_run record, config) of a recorded run."""
  out = []
  for name in ('validation.json', 'study_run.json', 'config.json'):
    with open(os.path.join(records, r['name'], name)) as f:
      out.append(json.load(f))
  return out


def smoothed(values, width=SMOOTH):
  """Trailing means over `width` validations (fewer at the start)."""
  return [
    sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
    for i in range(len(values))
  ]


def plateau_step(history, tol=PLATEAU_DSC):
  """First validation step whose trailing mean DSC (SMOOTH validations) is within `tol` of the
  best trailing mean of the run: validation DSC on a few volumes is noisy step to step."""
  mean = smoothed([h['val_dsc'] for h in history])
  best = max(mean)
  return next(h['step'] for h, m in zip(history, mean) if m >= best - tol)


def summary(runs, histories, last=SMOOTH):
  """Markdown rows: per run, the mean student and teacher DSC of the last `last` validations,
  and the first step the teacher's DSC exceeds 0.1."""
  lines = [
    f'| run | student DSC, mean of the last {last} validations | teacher DSC, same | '
    'first validation with teacher DSC > 0.1 |',
    '|---|---|---|---|',
  ]
  for r in runs:
    history = histories.get(r['name'])
    if not history:
      continue
    tail = history[-last:]
    student = sum(h['val_dsc'] for h in tail) / len(tail)
    teacher, first = '-', '-'
    if 'val_teacher_dsc' in history[0]:
      teacher = f'{sum(h["val_teacher_dsc"] for h in tail) / len(tail):.3f}'
      first = next((str(h['step']) for h in history if h['val_teacher_dsc'] > 0.1), 'never')
    lines.append(f'| {r["name"]} | {student:.3f} | {teacher} | {first} |')
  return lines


def figure(runs, histories, path):
  """Student (test-time network) and teacher validation DSC over steps, one line per run."""
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for i, r in enumerate(runs):
    history = histories.get(r['name'])
    if not history:
      continue
    steps = [h['step'] for h in history]
    style = dict(marker='o', ms=3, label=r['name'], color=f'C{i}')  # One colour per run.
    axes[0].plot(steps, [h['val_dsc'] for h in history], **style)
    if 'val_teacher_dsc' in history[0]:
      axes[1].plot(steps, [h['val_teacher_dsc'] for h in history], **style)
  axes[0].set_title('student on CT (validation volumes)')
  axes[1].set_title('teacher on pseudo-MRI G(CT) (validation volumes)')
  for ax in axes:
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel('DSC (mean over volumes)')
  plots.save_figure(fig, path)
  plt.close(fig)


def _cell(h, key):
  return f'{h[key]:.3f}' if key in h else '-'


def table(runs, histories):
  """Markdown rows: step, then student and (CMEDL runs) teacher validation DSC per run."""
  names = [r['name'] for r in runs if r['name'] in histories]
  head = ['step']
  for n in names:
    head += [f'{n} student'] + ([f'{n} teacher'] if n != 'student_only' else [])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  steps = sorted({h['step'] for n in names for h in histories[n]})
  for step in steps:
    row = [str(step)]
    for n in names:
      h = next((h for h in histories[n] if h['step'] == step), {})
      row.append(_cell(h, 'val_dsc'))
      if n != 'student_only':
        row.append(_cell(h, 'val_teacher_dsc'))
    lines.append('| ' + ' | '.join(row) + ' |')
  return lines


RUN_TEXT = {
  'student_only': 'the student alone',
  'cmedl-new': "CMEDL, today's defaults (teacher on pseudo-MRI only, separate BN, pool 50)",
  'cmedl-old': "CMEDL, the 2026-11 study's switches (teacher also on labelled real MRI, joint BN, no pool)",
  'cmedl-new-seg': "cmedl-new with loss.seg_to_translator at the authors' effective scale (1/(B*H*W))",
}


def _tail_mean(history, key, last=SMOOTH):
  tail = history[-last:]
  return sum(h[key] for h in tail) / len(tail)


def reading(histories):
  """What the records say, as sentences built from them (nothing here is typed by hand)."""
  out = []
  only = histories.get('student_only')
  if only and len(only) > 1:
    half = only[len(only) // 2 :]
    swing = max(abs(a['val_dsc'] - b['val_dsc']) for a, b in zip(half, half[1:]))
    out.append(
      f"- Noise: student_only's validation DSC moves by up to {swing:.3f} between consecutive "
      f'validations in its second half; differences between runs smaller than that are not '
      'evidence (one seed, a handful of validation volumes).'
    )
  for name in ('cmedl-new', 'cmedl-old', 'cmedl-new-seg'):
    history = histories.get(name)
    if not history or 'val_teacher_dsc' not in history[0]:
      continue
    first = next((h['step'] for h in history if h['val_teacher_dsc'] > 0.1), None)
    out.append(
      f"- {name}: the teacher's DSC on G(CT) first exceeds 0.1 at step {first} and averages "
      f'{_tail_mean(history, "val_teacher_dsc"):.3f} over the last {SMOOTH} validations; its '
      f'student averages {_tail_mean(history, "val_dsc"):.3f}'
      + (f' (student_only: {_tail_mean(only, "val_dsc"):.3f}).' if only else '.')
    )
  return out


def run_lines(runs, records):
  """Markdown rows: each recorded run's time, commit, command (and CMEDL's switches)."""
  lines = []
  for r in runs:
    if recorded(r, records):
      _, run_record, config = load(r, records)
      switches = {k: config[k.split('.')[0]][k.split('.')[1]] for k in study.METHOD_SWITCHES}
      lines.append(
        f'- `{r["name"]}`: {run_record["seconds"]:.0f} s, commit {run_record["commit"]}; '
        f'`{run_record["command"]}`' + (f'; switches {switches}' if r['method'] == 'cmedl' else '')
      )
  return lines


def report(runs, records, out, tiny):
  """Writes the pilot report (markdown + figure beside it) from the recorded runs."""
  histories = {r['name']: load(r, records)[0] for r in runs if recorded(r, records)}
  png = os.path.splitext(out)[0] + '.png'
  figure(runs, histories, png)
  only = histories.get('student_only')
  text = study_report.text(
    'pilot',
    tiny=' — tiny check' if tiny else '',
    records=os.path.relpath(records, os.path.dirname(out)),
    run_list='\n'.join(f'- `{r["name"]}`: {RUN_TEXT[r["name"]]}' for r in runs),
    steps=STEPS if not tiny else 4,
    eval_every=EVAL_EVERY if not tiny else TINY_EVAL_EVERY,
    png=os.path.basename(png),
    summary='\n'.join(summary(runs, histories)),
    reading='\n'.join(reading(histories)),
    smooth=SMOOTH,
    plateau_dsc=PLATEAU_DSC,
    plateau=plateau_step(only) if only else None,
    table='\n'.join(table(runs, histories)),
    runs='\n'.join(run_lines(runs, records)),
  )
  files.atomic_write(out, text.encode())
  return histories


def _parser():
  parser = argparse.ArgumentParser(
    prog='python -m cmedl_jax.study.pilot',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--root', default=ROOT, help='data and run directories')
  parser.add_argument('--out', default=os.path.join(runner.REPO, 'docs', 'PILOT.md'))
  parser.add_argument('--records', default=RECORDS, help='where finished runs are recorded')
  parser.add_argument('--tiny', action='store_true', help='a seconds-long pipeline check')
  parser.add_argument('--report-only', action='store_true', help='no training')
  parser.add_argument('--only', default='', help='comma-separated run names (default: all)')
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  root = args.root.rstrip('/')
  runs = pilot_runs()
  if args.only:
    runs = [r for r in runs if r['name'] in set(args.only.split(','))]
  if args.tiny:
    extra = {**TINY_OVERRIDES, **schedule(4, TINY_EVAL_EVERY)}
  else:
    extra = schedule(STEPS, EVAL_EVERY)
  if not args.report_only:
    grid = plan.TINY_PHANTOM_GRID if args.tiny else {}
    runner.write_phantoms(root, runs, plan.TINY_DATASETS if args.tiny else plan.DATASETS, grid)
    for r in runs:
      if recorded(r, args.records):
        print(f'pilot: {r["name"]} is recorded in {args.records}; not trained again', flush=True)
        continue
      runner.train(r, root, extra)
      record(r, root, args.records)
  report(pilot_runs(), args.records, args.out, args.tiny)
  return 0


if __name__ == '__main__':
  sys.exit(main())
