r"""Study runs per hour on this machine: the study driver one run at a time (as before) against
two at a time, each pinned to its own core, sharing compiled programs
(`benchmarks/reproduce.py --jobs 2`).

  python benchmarks/study_throughput.py [--steps 300] [--runs 4] [--root /tmp/study_throughput]

Trains the same short study runs (configs/study.py:informative, cmedl and student_only
alternating, seeds 0, 1, ...; `--steps` steps, one validation at the end) twice, into fresh run
folders, on phantom data prepared beforehand: first with --jobs 1 and no compilation cache
(what the driver did), then with --jobs 2. Prints each mode's wall time, runs per hour and
their ratio, with the float32 matmul peak measured before and after. Short runs weigh
compilation more than the study's 3000-step runs do, so the cache helps them more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

DATASETS = {'thorax_ct': (16, 0, 0), 'thorax_t2w': (16, 0, 1)}


def study_runs(n):
  """n runs: cmedl and student_only alternating, seeds 0, 0, 1, 1, ..."""
  methods = ('cmedl', 'student_only')
  return [
    reproduce.run(f'{methods[i % 2]}-s{i // 2}', 'main', 'informative', methods[i % 2], seed=i // 2)
    for i in range(n)
  ]


def prepare(root):
  """Phantoms under ROOT/data and their prepared folders (as the first run would make them)."""
  from cmedl_jax import train  # pylint: disable=g-import-not-at-top
  from configs import study  # pylint: disable=g-import-not-at-top

  reproduce.write_phantoms(root, DATASETS, {})
  train.prepare_data(study.set_root(study.get_config('informative,cmedl'), root))


def timed(runs, root, steps, jobs):
  """Wall seconds to train `runs` into ROOT/runs with `jobs` at a time."""
  extra = {
    'train.num_steps': steps,
    'train.eval_every': steps,
    'train.checkpoint_every': steps,
    'train.image_every': steps,
  }
  t0 = time.perf_counter()
  failed = reproduce.train_all(runs, root, extra, jobs)
  if failed:
    raise SystemExit(f'study_throughput: runs failed: {failed} (see their train.log)')
  return time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--runs', type=int, default=4)
  parser.add_argument('--root', default='/tmp/study_throughput')
  args = parser.parse_args(argv)
  shutil.rmtree(args.root, ignore_errors=True)
  data = os.path.join(args.root, 'jobs1')
  prepare(data)
  os.makedirs(os.path.join(args.root, 'jobs2'))
  os.symlink(os.path.join(data, 'data'), os.path.join(args.root, 'jobs2', 'data'))
  runs = study_runs(args.runs)
  print(
    f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.runs} runs of '
    f'{args.steps} steps: {", ".join(r["name"] for r in runs)}'
  )
  peak_before = step_bench.matmul_peak()['numpy']
  seconds = {
    jobs: timed(runs, os.path.join(args.root, f'jobs{jobs}'), args.steps, jobs) for jobs in (1, 2)
  }
  peak_after = step_bench.matmul_peak()['numpy']
  print(
    f'float32 matmul peak (numpy, 4096^3): {peak_before:.0f} GFLOP/s before, '
    f'{peak_after:.0f} after; load average at the end {os.getloadavg()[0]:.2f}'
  )
  print('| mode | wall s | runs per hour |')
  print('|---|---|---|')
  for jobs, label in ((1, 'one run at a time (before)'), (2, '--jobs 2, pinned, shared cache')):
    print(f'| {label} | {seconds[jobs]:.0f} | {3600 * args.runs / seconds[jobs]:.1f} |')
  print(f'runs per hour, --jobs 2 / one at a time: {seconds[1] / seconds[2]:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
