"""Running the study: each run's `cmedl_jax.main` command, training it (pinned to a core when
several train at once), testing its final model and copying its records beside the report.
A run whose records exist is done and skipped."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time

from cmedl_jax import environment
from cmedl_jax.evaluation import test_set
from cmedl_jax.study import plan
from cmedl_jax.study import records
from configs import study
from data_prep import files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flag_value(value):
  return repr(value) if isinstance(value, tuple) else str(value)


def train_command(r, root, extra):
  """The exact `cmedl_jax.main` command line (a list) of run `r`."""
  arg = f'{r["setting"]},{r["method"]},unet,cyclegan'
  arg += '' if r['switches'] == 'defaults' else f',{r["switches"]}'
  cmd = [
    sys.executable,
    '-m',
    'cmedl_jax.main',
    f'--config=configs/study.py:{arg}',
    f'--workdir={root}/runs/{r["name"]}',
  ]
  overrides = dict(r['overrides'])
  if r['requires']:
    overrides['method.translator_init'] = f'{root}/runs/{r["requires"]["name"]}'
  default_root = os.path.normpath(root) == os.path.normpath(study.ROOT)
  for side, name in (('source', r['source']), ('target', plan.TEACHER_KIND[r['setting']])):
    if (
      not default_root
      or name != (plan.SOURCE_KIND if side == 'source' else plan.TEACHER_KIND)[r['setting']]
    ):
      overrides[f'data.{side}.raw_dir'] = f'{root}/data/phantoms/{name}'
      overrides[f'data.{side}.prepared_dir'] = f'{root}/data/prepared/{name}'
  overrides.update(extra)
  for key, value in overrides.items():
    cmd.append(f'--config.{key}={_flag_value(value)}')
  return cmd


def shown(cmd):
  return ' '.join(shlex.quote(c) for c in ['python'] + cmd[1:])


def finished(r, root):
  workdir = f'{root}/runs/{r["name"]}'
  exported = r['method'] == 'stage1' or os.path.isdir(f'{workdir}/export')  # Stage 1: no student.
  return exported and os.path.isfile(f'{workdir}/study_run.json')


def write_phantoms(root, runs, datasets, grid):
  """Writes the phantom sets that `runs` use (those already written are kept)."""
  from data_prep import phantoms  # pylint: disable=g-import-not-at-top

  needed = {r['source'] for r in runs} | {plan.TEACHER_KIND[r['setting']] for r in runs}
  for name in sorted(needed):
    kind, n_train, n_test, seed, options = datasets[name]
    out = f'{root}/data/phantoms/{name}'
    if os.path.isfile(f'{out}/dataset.json'):
      continue
    print(f'study: writing {n_train}+{n_test} {kind} phantoms to {out}', flush=True)
    phantoms.write_dataset(kind, n_train, seed, out, n_test=n_test, **options, **grid)


def run_record(cmd, seconds, core, commit_at_start):
  """study_run.json of a finished training command: its command, wall time (s), the commit at
  its start and at its end (`commit`), the training code that differed from it, machine, core."""
  changed = environment.changed_files('cmedl_jax', 'configs', 'data_prep')
  return {
    'command': shown(cmd),
    'seconds': round(seconds, 1),
    'returncode': 0,  # Written only when the command succeeded.
    'commit_at_start': commit_at_start,
    'commit': environment.commit() or 'unknown',
    'uncommitted_training_code': ['unknown'] if changed is None else changed,
    'machine': environment.machine(),
    'pinned_core': core,
    'date': datetime.date.today().isoformat(),
  }


def train(r, root, extra, core=None):
  """Trains run `r` unless finished; the log goes to RUN/train.log. core: pin the run to this
  CPU core (its compiled programs then come from and go to ROOT/jax_cache, which runs of the
  same method and size share)."""
  workdir = f'{root}/runs/{r["name"]}'
  if finished(r, root):
    return
  os.makedirs(workdir, exist_ok=True)
  cmd = train_command(r, root, extra)
  print(f'study: training {r["name"]}: {shown(cmd)}', flush=True)
  env = None
  if core is not None:
    # Runs side by side on one GPU share its memory (JAX's default gives each process 75 %).
    env = dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=os.path.abspath(f'{root}/jax_cache'),
      XLA_PYTHON_CLIENT_PREALLOCATE='false',
    )
  commit_at_start = environment.commit() or 'unknown'
  t0 = time.time()
  with open(f'{workdir}/train.log', 'a') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if core is not None:
      # Pinned from here, as its interpreter starts and before it starts any thread, rather
      # than by a preexec_fn, which would fork this process (threaded once it has tested a
      # run with jax) and run Python code in the child.
      os.sched_setaffinity(proc.pid, {core})
    rc = proc.wait()
  seconds = time.time() - t0
  if rc != 0:
    raise RuntimeError(f'run {r["name"]} failed (exit {rc}); see {workdir}/train.log')
  records.write_json(f'{workdir}/study_run.json', run_record(cmd, seconds, core, commit_at_start))
  print(f'study: {r["name"]} trained in {seconds:.0f} s', flush=True)


def complete(r, root, records_dir, extra, core=None, lock=None):
  """Trains, tests and records run `r` unless its records exist. lock: held while testing
  (one test-set prediction at a time, in this process)."""
  if records.recorded(r, records_dir):
    return
  if r['requires']:
    complete(r['requires'], root, records_dir, extra, core, lock)
  train(r, root, extra, core)
  if r['method'] != 'stage1':
    with lock or threading.Lock():
      test_run(r, root)
      if plan.has_teacher(r):
        test_run(plan.teacher_run(r), root)
  run_dir = f'{root}/runs/{r["name"]}'
  # The run's CPU, packages and XLA flags (results agree bit for bit only on the same ones),
  # kept where the run wrote them; not required of a record (earlier records lack it).
  env_file = records.ENVIRONMENT_RECORD
  optional = [env_file] if os.path.isfile(f'{run_dir}/{env_file}') else []
  for f in optional + list(records.record_files(r)):
    with open(f'{run_dir}/{f}', 'rb') as src:
      files.atomic_write(f'{records_dir}/{r["name"]}/{f}', src.read())
  print(f'study: {r["name"]} recorded in {records_dir}/{r["name"]}', flush=True)


def complete_all(runs, root, records_dir, extra, jobs=1):
  """Completes the unrecorded `runs`; returns the names of those that failed.

  jobs > 1: that many runs at once, each pinned to its own core (the study's small steps use
  a second core poorly, two runs use both: benchmarks/study_speed.py), sharing compiled
  programs through ROOT/jax_cache.
  """
  failed = []
  lock = threading.Lock()

  def one(r, core=None):
    try:
      complete(r, root, records_dir, extra, core, lock)
    except RuntimeError as e:  # Report it and go on with the other runs.
      print(f'study: {e}', file=sys.stderr, flush=True)
      failed.append(r['name'])

  if jobs <= 1:
    for r in runs:
      one(r)
    return failed
  cores = sorted(os.sched_getaffinity(0))
  free = queue.Queue()
  for k in range(min(jobs, len(cores))):
    free.put(cores[k])

  def pinned(r):
    core = free.get()
    try:
      one(r, core)
    finally:
      free.put(core)

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    list(pool.map(pinned, runs))
  return failed


def test_run(r, root):
  """Tests run `r`'s final model on its source's test set (evaluation.test_set) and saves the
  record in RUN/test_eval.json, or returns the one saved after the run's training ended.

  For a teacher pseudo-run (plan.teacher_run) the run's teacher segments the translator's output
  and the record goes to RUN/test_eval_teacher.json.
  """
  teacher = r['method'] == 'cmedl_teacher'
  workdir = f'{root}/runs/{r["name"].split("#")[0]}'
  suffix = '_teacher' if teacher else ''
  eval_path = f'{workdir}/test_eval{suffix}.json'
  if os.path.isfile(eval_path) and os.path.getmtime(eval_path) >= os.path.getmtime(
    f'{workdir}/study_run.json'
  ):
    with open(eval_path) as f:
      return json.load(f)
  record = test_set.predict_and_evaluate(
    workdir,
    f'{root}/data/phantoms/{r["source"]}',
    f'{workdir}/test_predictions{suffix}',
    name=r['name'],
    teacher=teacher,
  )
  records.write_json(eval_path, record)
  return record
