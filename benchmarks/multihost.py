r"""Multi-process data parallelism on this machine: 1 process x 4 devices against 2 processes x 2.

  python -m benchmarks.multihost [--size 96] [--batch 8] [--steps 5] [--out docs/PERFORMANCE.md]

The joint train step of configs/demo.py's networks on synthetic batches (the program of
benchmarks/performance.py's scaling rows), global batch `--batch` over 4 forced CPU devices:
either one process holding all 4, or two processes of 2 devices each joined by
`jax.distributed.initialize` on a localhost coordinator (jax's CPU collectives), as
`python -m cmedl_jax.main --jax_distributed` runs them. Reports the median step time, the
first step's losses (both layouts must agree), and the bytes the compiled step moves in
collectives per step, read from its optimised HLO (all-reduce, all-gather, reduce-scatter,
collective-permute output shapes). `--out` replaces the "Multi-process" section of that report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time

from benchmarks import train_step as step_benchmark
from benchmarks.train_step import ROOT
from data_prep import files

_DEVICES = '--xla_force_host_platform_device_count'
SECTION = '## Multi-process data parallelism'

_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2}
_BYTES.update({'s16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1})
_COLLECTIVE = re.compile(
  r'=\s*(?P<shape>.*?)\s+(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute)'
  r'(?:-start)?\('
)
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')


def collective_bytes(hlo_text):
  """{op: [count, bytes of the outputs]} over the collectives of an optimised HLO module."""
  out = {}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    total = 0
    for a in _ARRAY.finditer(m['shape']):
      n = 1
      for d in filter(None, a['dims'].split(',')):
        n *= int(d)
      total += n * _BYTES.get(a['dtype'], 4)
    count, size = out.get(m['op'], (0, 0))
    out[m['op']] = [count + 1, size + total]
  return out


def worker(size, batch, steps, address, n_proc, pid):
  """One process of `run`: joins the others (n_proc > 1), compiles the sharded demo step, times
  `steps` steps and prints process `pid`'s RESULT json (the keys `run` returns)."""
  import functools

  import jax
  import numpy as np

  if n_proc > 1:
    jax.distributed.initialize(address, n_proc, pid)
  from cmedl_jax import method, sharding, train_state, train_step as ts
  from configs import demo

  config = demo.get_config()
  config.data.image_size, config.train.global_batch_size = size, batch
  nets = method.build_networks(config, in_channels=1)
  mesh = sharding.make_mesh()
  state, tx = train_state.create_train_state(config, nets, jax.random.PRNGKey(0), (size, size, 1))
  state = sharding.from_host(jax.device_get(state), sharding.replicated(mesh))
  rows = slice(
    jax.process_index() * batch // jax.process_count(),
    (jax.process_index() + 1) * batch // jax.process_count(),
  )
  local = lambda seed: {
    k: v[rows] for k, v in step_benchmark.synthetic_batch(batch, size, seed).items()
  }
  src, tgt = sharding.shard_batch(local(1), mesh), sharding.shard_batch(local(2), mesh)
  step = jax.jit(
    functools.partial(ts.train_step, config=config, nets=nets, tx=tx), donate_argnums=0
  )
  step = step.lower(state, src, tgt).compile()  # Compiled once: its HLO and the timed runs.
  hlo = step.as_text()
  state, first = step(state, src, tgt)
  first = {k: float(v) for k, v in sharding.to_host(first).items()}
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, src, tgt)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  step_benchmark.print_result(
    dict(
      processes=jax.process_count(),
      devices=jax.device_count(),
      local_devices=jax.local_device_count(),
      step_s=float(np.median(times)),
      losses=first,
      params=int(params),
      collectives=collective_bytes(hlo),
    )
  )


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run(processes, args, devices=4, timeout=1800):
  """Runs the worker as `processes` processes sharing `devices` forced CPU devices (global
  batch args.batch of args.size^2 slices, args.steps timed steps); returns process 0's result:
  {'processes', 'devices', 'local_devices', 'step_s', 'losses' (first step), 'params',
  'collectives'}. benchmarks/performance.py's scaling rows are its 1-process runs."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICES)]
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=' '.join(flags + [f'{_DEVICES}={devices // processes}']),
  )
  address = f'localhost:{_free_port()}'
  argv = ['--size', str(args.size), '--batch', str(args.batch), '--steps', str(args.steps)]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'benchmarks.multihost',
        *argv,
        '--_worker',
        address,
        str(processes),
        str(i),
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    if p.returncode:
      raise RuntimeError(f'{processes}-process worker failed ({p.returncode}): {err[-3000:]}')
  lines = [l for l in outputs[0][0].splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT ') :])


def section(args, results, peaks):
  """The report section (markdown lines); peaks: float32 matmul GFLOP/s before and after (None:
  not measured)."""
  base = results[0]
  peak_said = (
    f'float32 matmul peak (numpy, 4096^3) before / after: {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s.'
    if peaks
    else 'float32 matmul peak not measured (--no-peak).'
  )
  lines = [
    SECTION,
    '',
    f'Generated by `python -m benchmarks.multihost` on {datetime.date.today()}: '
    f'{os.cpu_count()} CPU cores ({platform.machine()}), one run, load average '
    f'{os.getloadavg()[0]:.1f} at the end (compare the two rows with each other, not with other '
    'sections). '
    f'`configs/demo.py` networks at {args.size}x{args.size}, global batch {args.batch} over 4 '
    'forced CPU devices, median of '
    f'{args.steps} steps after the compiling one; the two processes meet through '
    "`jax.distributed` on localhost (jax's CPU collectives), as `--jax_distributed` runs them. "
    f'{peak_said}',
    '',
    '| processes x devices | step s | slices/s | largest loss difference vs 1x4 | '
    'collectives per step: MB (ops) | of which all-reduce: MB (ops) |',
    '|---|---|---|---|---|---|',
  ]
  for r in results:
    diff = max(
      abs(r['losses'][k] - base['losses'][k]) / max(abs(base['losses'][k]), 1e-12)
      for k in base['losses']
    )
    coll = r['collectives']
    ops, size = (sum(c[i] for c in coll.values()) for i in (0, 1))
    reduce_ops, reduce_size = coll.get('all-reduce', (0, 0))
    lines.append(
      f'| {r["processes"]}x{r["local_devices"]} | {r["step_s"]:.3f} | '
      f'{args.batch / r["step_s"]:.1f} | {diff:.1e} (relative) | {size / 1e6:.2f} ({ops}) | '
      f'{reduce_size / 1e6:.2f} ({reduce_ops}) |'
    )
  grad_mb = base['params'] * 4 / 1e6
  lines += [
    '',
    f'The model has {base["params"]:,} float32 parameters ({grad_mb:.2f} MB): the step '
    'all-reduces each gradient once (and the batch-norm statistics, the losses and metrics); '
    "the collective bytes are the outputs of the compiled step's collectives, per step, the "
    'same program in both layouts. Between processes on one machine the all-reduce goes '
    'through localhost sockets, so 2x2 pays for it where 1x4 exchanges through memory.',
    '',
  ]
  return lines


def replace_section(path, lines):
  """Replaces (or appends) SECTION in the markdown file at `path`."""
  text = open(path).read() if os.path.isfile(path) else ''
  start = text.find(SECTION)
  if start < 0:
    text = text.rstrip('\n') + '\n\n' + '\n'.join(lines)
  else:
    end = text.find('\n## ', start + len(SECTION))
    rest = text[end + 1 :] if end >= 0 else ''
    text = text[:start] + '\n'.join(lines) + ('\n' + rest if rest else '')
  files.atomic_write(path, text)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--size', type=int, default=96)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='', help='a report whose section this replaces')
  parser.add_argument('--no-peak', action='store_true', help='skip the matmul peak (a smoke run)')
  parser.add_argument('--_worker', nargs=3, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:  # ADDRESS PROCESSES INDEX: one process of `run`.
    address, processes, index = args._worker
    worker(args.size, args.batch, args.steps, address, int(processes), int(index))
    return 0
  peak = None if args.no_peak else step_benchmark.matmul_peak()  # Before and after the runs.
  results = [run(1, args), run(2, args)]
  after = None if args.no_peak else step_benchmark.matmul_peak()
  lines = section(args, results, [peak['numpy'], after['numpy']] if peak else None)
  print('\n'.join(lines))
  print('RESULT ' + json.dumps(results))
  if args.out:
    replace_section(args.out, lines)
  return 0


if __name__ == '__main__':
  sys.exit(main())
