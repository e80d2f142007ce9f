"""The pre-registered phantom study (docs/STUDY_PLAN.md): trains, predicts, evaluates, reports.

  python -m cmedl_jax.study --jobs 2              # train what is not recorded -> docs/RESULTS.md
  python -m cmedl_jax.study --only informative-,weak- --jobs 2   # runs named so (prefixes)
  python -m cmedl_jax.study --extend informative --jobs 2   # + seeds 8-11 (the plan's rule)
  python -m cmedl_jax.study --ablations --jobs 2  # + the exploratory ablations, after the plan
  python -m cmedl_jax.study --extend auto --ablations --jobs 2   # all that is left, in order
  python -m cmedl_jax.study --report-only         # docs/RESULTS.md from the records alone
  python -m cmedl_jax.study --tiny --root /tmp/s --out /tmp/s/RESULTS.md   # pipeline check

Every run is a `python -m cmedl_jax.main --config=configs/study.py:...` command, trained in
ROOT/runs/NAME (log, checkpoints, export) and then tested on its setting's test set with its
final weights (and, for CMEDL, its teacher on the translator's output). Its small records
(config.json, study_run.json with the command, wall time, commits at its start and end and
machine, validation.json, test_eval.json with every per-case and per-tumour number,
test_eval_teacher.json) are copied to RESULTS_runs/NAME/ beside the report as soon as the run
is done. A run whose records are there is done: commit them, and the study continues in another
sitting or on another machine (`git pull`, the same command). The report is built from
RESULTS_runs/ alone, at any time.
"""

from __future__ import annotations

import argparse
import os
import sys

from cmedl_jax.study import comparisons
from cmedl_jax.study import plan
from cmedl_jax.study import records
from cmedl_jax.study import report
from cmedl_jax.study import runner
from configs import study


def _parser():
  parser = argparse.ArgumentParser(
    prog='python -m cmedl_jax.study',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--root', default=study.ROOT, help='data and run directories')
  parser.add_argument(
    '--out',
    default=os.path.join(runner.REPO, 'docs', 'RESULTS.md'),
    help='the report; records and figures go beside it (RESULTS_runs/, RESULTS_figures/)',
  )
  parser.add_argument('--tiny', action='store_true', help='a minutes-long pipeline check')
  parser.add_argument(
    '--report-only', action='store_true', help='no training: the report from the records'
  )
  parser.add_argument('--only', default='', help='comma-separated run name prefixes')
  parser.add_argument(
    '--extend',
    default='',
    help='comma-separated settings that ended inconclusive, or auto (those the records '
    'decide inconclusive with all 8 seeds): add their seeds 8-11 (once; docs/STUDY_PLAN.md), '
    'trained after the other planned runs; recorded extra seeds are always reported',
  )
  parser.add_argument(
    '--ablations',
    action='store_true',
    help='also the exploratory ablation arms (not in the plan: ABLATIONS, seeds 0-2), after '
    'the planned runs; recorded ablations are always reported',
  )
  parser.add_argument(
    '--jobs',
    type=int,
    default=1,
    help='runs trained at once, each pinned to one core (2 on 2 cores: benchmarks/'
    'study_speed.py; on a GPU machine, up to one per core: the runs share the GPU and its '
    'memory; not yet tried on a GPU)',
  )
  return parser


def _extended(parser, extend, records_dir):
  """The settings whose extra seeds run or are reported (--extend, and those recorded)."""
  extended = {s for s in extend.split(',') if s}
  if 'auto' in extended:
    extended = (extended - {'auto'}) | comparisons.inconclusive_settings(records_dir)
  unknown = extended - set(plan.SETTINGS)
  if unknown:
    parser.error(
      f'--extend: unknown settings {sorted(unknown)}; settings: {", ".join(plan.SETTINGS)}'
    )
  return extended | {  # Extra seeds, once either arm is recorded, stay in the report.
    r['setting']
    for r in plan.plan_runs(plan.SETTINGS)
    if plan.is_extra_seed(r) and records.recorded(r, records_dir)
  }


def _runs(args, records_dir, extended):
  """The runs of the report: the plan's (or the tiny check's) and the ablations when asked for
  or recorded."""
  runs = plan.tiny_runs() if args.tiny else plan.plan_runs(extended)
  ablations = plan.ablation_runs()
  if not args.tiny and (
    args.ablations or any(os.path.isdir(f'{records_dir}/{r["name"]}') for r in ablations)
  ):
    runs += ablations
  return runs


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  root = args.root.rstrip('/')
  records_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), 'RESULTS_runs')
  runs = _runs(args, records_dir, _extended(parser, args.extend, records_dir))
  chosen = runs
  if args.only:
    chosen = [r for r in runs if r['name'].startswith(tuple(args.only.split(',')))]
  failed = []
  if not args.report_only:
    todo = sorted(
      (r for r in chosen if not records.recorded(r, records_dir)), key=plan.training_order
    )
    datasets = plan.TINY_DATASETS if args.tiny else plan.DATASETS
    runner.write_phantoms(root, todo, datasets, plan.TINY_PHANTOM_GRID if args.tiny else {})
    extra = dict(plan.TINY_OVERRIDES) if args.tiny else {}
    failed = runner.complete_all(todo, root, records_dir, extra, args.jobs)
  report.build_report(args.out, runs, records.load_records(runs, records_dir), args.tiny)
  print(f'study: report {args.out}', flush=True)
  if failed:
    print(f'study: failed runs: {failed}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
