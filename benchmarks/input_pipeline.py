r"""Benchmark: preparation time per case and augmented training slices per second at 256x256.

  python -m benchmarks.input_pipeline [--cases 4] [--batch 16] [--batches 40] [--workdir DIR]

Writes small phantom datasets (data_prep.phantoms: thorax CT and T2w MRI) unless `--workdir`
already holds them, prepares them at 1.5 mm / 256x256, then reads the unpaired training
iterator (default augmentation) and prints:

* preparation seconds per case (per modality);
* augmented slices per second (source + target slices, single-host, jax arrays on device 0),
  for 1 and 3 context slices, warps on the host (TF kernels) and on the jax device (here the
  CPU backend), and without augmentation (reads + transfer only);
* "data wait": the fraction of time a consumer that takes `--step-ms` per step spends blocked
  in next() (0 means the iterator is never what training waits on).

`--compare REV`: first runs the same benchmark of commit REV (a git worktree) on the same data
in a subprocess, then this one: before and after in one run, one machine.

Timings are noisy on a shared machine; run it alone for stable figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.train_step import ROOT

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def make_phantoms(workdir, cases, seed):
  from data_prep import phantoms  # pylint: disable=g-import-not-at-top

  out = {}
  for kind in ('thorax_ct', 'thorax_t2w'):
    path = os.path.join(workdir, 'raw', kind)
    if not os.path.exists(os.path.join(path, 'dataset.json')):
      t = time.time()
      phantoms.write_dataset(kind, cases, seed, path, n_test=0)
      print(f'phantoms {kind}: {cases} cases in {time.time() - t:.1f} s')
    out[kind] = path
  return out


def prepare_all(workdir, raw):
  from data_prep import prepare as P  # pylint: disable=g-import-not-at-top

  prepared = {}
  for kind, modality in (('thorax_ct', 'ct'), ('thorax_t2w', 'mri')):
    out = os.path.join(workdir, 'prepared', kind)
    if not P.is_prepared(out):
      spec = P.PrepSpec(modality=modality, spacing_mm=1.5, size=256, label_map={'tumor': 1})
      s = P.prepare_dataset(raw[kind], out, spec, val_fraction=0.0, progress=False)
      n = sum(s['cases'].values())
      print(
        f'prepare {kind}: {n} cases, {s["slices"]["train"]} slices, '
        f'{s["seconds_per_case"]:.2f} s/case'
      )
    prepared[kind] = out
  return prepared


def clinical_size_prep_time(slices=128):
  """prepare_volume on a 512x512xZ CT-sized volume (0.8 mm in-plane, LPS) without file I/O."""
  from data_prep import prepare as P  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  image = rng.normal(0.0, 20.0, (512, 512, slices)).astype(np.float32)
  image[:, :80] = -1000.0
  affine = np.diag([-0.8, -0.8, 2.5, 1.0])
  spec = P.PrepSpec(modality='ct', spacing_mm=1.5, size=256)
  t = time.time()
  prepared, geometry = P.prepare_volume(image, affine, spec)
  P.prepare_label(np.zeros(image.shape, np.uint8), geometry)
  return time.time() - t


def iterator_rate(src, tgt, batch, batches, context, augment_on='host', augment=None, warmup=5):
  from cmedl_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  it = ip.create_train_iterator(
    src,
    tgt,
    global_batch_size=batch,
    seed=0,
    context_slices=context,
    prefetch=4,
    augment_on=augment_on,
    augment=augment,
  )
  for _ in range(warmup):
    b = next(it)
  b[0]['image'].block_until_ready()
  t = time.time()
  for _ in range(batches):
    b = next(it)
  b[0]['image'].block_until_ready()
  dt = time.time() - t
  it.close()
  return 2 * batch * batches / dt


def data_wait(src, tgt, batch, steps, step_ms):
  from cmedl_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top

  it = ip.create_train_iterator(src, tgt, global_batch_size=batch, seed=1, prefetch=2)  # defaults
  for _ in range(3):  # start-up (tf.data autotuning, first buffers)
    next(it)
    time.sleep(step_ms / 1000.0)
  waited, t0 = 0.0, time.time()
  for _ in range(steps):
    t = time.time()
    next(it)
    waited += time.time() - t
    time.sleep(step_ms / 1000.0)  # the "train step"
  it.close()
  return waited / (time.time() - t0)


def run_other_revision(args, workdir):
  """Runs this benchmark as of git revision `args.compare` on `workdir`'s data, printed first
  (`python -m benchmarks.input_pipeline`, or the script of a revision before the package)."""
  tree = os.path.join(workdir, f'worktree-{args.compare}')
  if not os.path.isdir(tree):
    subprocess.check_call(['git', '-C', ROOT, 'worktree', 'add', '--detach', tree, args.compare])
  print(f'--- before: commit {args.compare} ---', flush=True)
  if os.path.isfile(os.path.join(tree, 'benchmarks', '__init__.py')):
    cmd = [sys.executable, '-m', 'benchmarks.input_pipeline']
  else:
    cmd = [sys.executable, os.path.join(tree, 'benchmarks', 'input_pipeline.py')]
  cmd += ['--workdir', workdir, '--cases', str(args.cases), '--batch', str(args.batch)]
  cmd += ['--batches', str(args.batches), '--step-ms', str(args.step_ms)]
  subprocess.check_call(cmd, cwd=tree)
  subprocess.check_call(['git', '-C', ROOT, 'worktree', 'remove', '--force', tree])
  print('--- after: this commit ---', flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default=None, help='reuse/keep data here (default: temp dir)')
  p.add_argument('--cases', type=int, default=4)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--batches', type=int, default=40)
  p.add_argument(
    '--step-ms',
    type=float,
    default=100.0,
    help='simulated train-step time for the data-wait measurement',
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--compare', default='', help='git revision to benchmark first (before)')
  args = p.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_input_')
  print(f'workdir {workdir}; cpus {os.cpu_count()}')
  raw = make_phantoms(workdir, args.cases, args.seed)
  prepared = prepare_all(workdir, raw)
  if args.compare:
    run_other_revision(args, workdir)
  src, tgt = prepared['thorax_ct'], prepared['thorax_t2w']
  print(
    f'prepare_volume + prepare_label, 512x512x128 CT (0.8 mm -> 1.5 mm, 256x256): '
    f'{clinical_size_prep_time():.2f} s (in memory, without reading the .nii.gz)'
  )
  import jax  # pylint: disable=g-import-not-at-top

  print(f'jax backend: {jax.default_backend()}')
  runs = [(1, 'device', None), (3, 'device', None), (1, 'host', None), (3, 'host', None)]
  if importlib.util.find_spec('tensorflow') is None:  # The optional extra of augment_on='host'.
    runs = [r for r in runs if r[1] != 'host']
    print("augmented (host): not measured, TensorFlow (augment_on='host') is not installed")
  for context, where, augment in runs + [(1, 'host', False)]:
    rate = iterator_rate(src, tgt, args.batch, args.batches, context, where, augment)
    what = 'un-augmented' if augment is False else f'augmented ({where})'
    print(
      f'iterator: {rate:.0f} {what} 256x256 slices/s (source+target, batch {args.batch} '
      f'per side, context {context})'
    )
  frac = data_wait(src, tgt, args.batch, 20, args.step_ms)
  print(f'data wait with a {args.step_ms:.0f} ms step: {100 * frac:.1f}% of wall time')


if __name__ == '__main__':
  main()
