r"""Writes docs/PERFORMANCE.md: the measured speed and memory of cmedl-jax on this machine.

  python -m benchmarks.performance [--out docs/PERFORMANCE.md] [--size 256] [--steps 2]
      [--pairs unet:cyclegan,unet:cut,densefcn:cyclegan,pspnet:cyclegan] [--quick]

Runs, each in its own process: the joint train step per segmenter x translator
(benchmarks/train_step.py workers: step time, XLA FLOPs, GFLOP/s and fraction of the measured
float32 matmul peak, XLA memory), the bf16 option, eager PyTorch for U-Net + CycleGAN when
torch is installed; data-parallel scaling on 1, 2, 4 and 8 forced CPU devices (same losses,
throughput) and 1 process x 4 devices vs 2 x 2 (benchmarks/multihost.py); the input
pipeline and metric benchmarks; prediction speed; and XLA's peak memory
for the default config as batch and image size grow. `--quick` shrinks everything (a smoke run,
figures not meant for the report). Takes about 15 minutes on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

from benchmarks import multihost
from benchmarks import train_step as step_benchmark
from benchmarks.train_step import ROOT
from data_prep import files

FAST_CONV = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
SCALING_DEVICES = (1, 2, 4, 8)


def run_python(args, env_extra=None, timeout=1800):
  """Runs python with the given arguments (from the repository root); returns the last
  'RESULT ' json line (or raises)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env_extra or {}))
  proc = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{args[:2]} failed ({proc.returncode}): {proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT ') :]), proc.stdout


# ---------------------------------------------------------------------------- sections


def train_step_rows(args):
  rows = []
  common = dict(size=args.size, batch=1, steps=args.steps, breakdown=False, xla_flags=FAST_CONV)
  for pair in args.pairs.split(','):
    rows.append(step_benchmark.run_worker('jax', pair, types.SimpleNamespace(**common)))
  rows.append(
    step_benchmark.run_worker(
      'jax', 'unet:cyclegan', types.SimpleNamespace(**common, dtype='bfloat16')
    )
  )
  default_flags = dict(common, xla_flags=os.environ.get('XLA_FLAGS', ''))
  rows.append(
    dict(
      step_benchmark.run_worker('jax', 'unet:cyclegan', types.SimpleNamespace(**default_flags)),
      flags='jax 0.10.2 default',
    )
  )
  if step_benchmark.torch_available():
    rows.append(
      step_benchmark.run_worker('torch', 'unet:cyclegan', types.SimpleNamespace(**common))
    )
  return rows


def scaling_rows(args):
  """The multihost.py worker in one process on 1, 2, 4 and 8 devices (demo networks, batch 8;
  the package's XLA:CPU flags, i.e. FAST_CONV, as `import cmedl_jax` sets them)."""
  sizes = types.SimpleNamespace(size=args.scaling_size, batch=8, steps=args.steps)
  return [multihost.run(1, sizes, devices=n) for n in SCALING_DEVICES]


def memory_rows(args):
  out = []
  for size, batch, remat in args.memory_grid:
    argv = ['-m', 'benchmarks.step_memory', '--size', str(size), '--batch', str(batch)]
    result, _ = run_python(argv + (['--remat'] if remat else []), {'XLA_FLAGS': FAST_CONV})
    out.append(result)
  return out


def _mb(x):
  return f'{x / 2**20:,.0f}'


def _row(steps, pair, framework, dtype='float32', flags=None):
  for r in steps:
    if (
      r.get('pair') == pair
      and r.get('framework') == framework
      and 'error' not in r
      and r.get('dtype', 'float32') == dtype
      and r.get('flags') == flags
    ):
      return r
  return None


def goals(steps, ref_flops, peak_g):
  """Lines comparing the step figures with the goals, saying where they fall short."""
  out = ['**Against the goals.**']
  jax_row, torch_row = _row(steps, 'unet:cyclegan', 'jax'), _row(steps, 'unet:cyclegan', 'torch')
  default = _row(steps, 'unet:cyclegan', 'jax', flags='jax 0.10.2 default')
  if jax_row and torch_row:
    ratio = jax_row['step_s'] / torch_row['step_s']
    out.append(
      f'- JAX / eager PyTorch step time, U-Net + CycleGAN: {ratio:.2f} (goal: at most '
      f'1; {"met" if ratio <= 1 else "not met"}).'
      + (
        f" With jax 0.10.2's default XLA:CPU flags it is "
        f'{default["step_s"] / torch_row["step_s"]:.2f}: its YNNPACK convolutions are '
        'the loss (docs/TRAIN_STEP_BENCHMARK.md).'
        if default
        else ''
      )
      + (
        " Where the step loses: the generators' residual-block convolutions (3x3, 256 "
        'channels; about four fifths of the FLOPs), whose XLA:CPU backward is slower than '
        "oneDNN's; weight gradients of batches under 8 are computed on row bands "
        '(layers.conv_general_dilated: U-Net fwd+bwd 1.20 -> 0.76 s at batch 1, measured '
        '2026-12-03, not by this script).'
        if ratio > 1
        else ''
      )
    )
  dense = _row(steps, 'densefcn:cyclegan', 'jax')
  if dense and jax_row:
    gfs = ref_flops['densefcn:cyclegan'] / dense['step_s'] / 1e9
    out.append(
      f'- FC-DenseNet103 falls short: {gfs:.0f} GFLOP/s ({100 * gfs / peak_g:.0f}% of '
      f'peak), {dense["compile_s"]:.0f} s to compile and {_mb(dense["xla_bytes"])} MB, '
      f'against {_mb(jax_row["xla_bytes"])} MB for U-Net. Its dense blocks concatenate '
      'ever wider stacks of thin (growth 16) feature maps and keep every stack for the '
      "backward pass (each layer keeps its ReLU'd input for its weight gradient). Compile "
      'time: with batch norm per layer, one FC-DenseNet103 fwd+bwd optimised to ~116,000 HLO '
      "lines, its largest loop fusions (1,100+ instructions) summing every later layer's "
      "batch-norm backward into a block input's gradient (remat and optimisation barriers "
      "do not change that on XLA:CPU); each map's batch statistics are now computed once per "
      'block (densefcn.StackBatchNorm, same function): ~63,000-71,000 lines, largest fusion '
      '~250 lines (measured 2026-12-03, not by this script).'
    )
  return out + ['']


KEPT_SECTIONS = ('## Study runs per hour',)


def kept_sections(path):
  """Sections of the existing report this script does not measure (e.g. benchmarks/
  study_throughput.py's), carried over unchanged with a line saying so."""
  text = open(path).read() if os.path.isfile(path) else ''
  out = ''
  for title in KEPT_SECTIONS:
    start = text.find(title)
    if start < 0:
      continue
    end = text.find('\n## ', start + len(title))
    section = text[start : end if end >= 0 else len(text)].rstrip('\n')
    section = section.split('\nThe whole report took')[0]
    note = '(Carried over from the previous report: not measured by benchmarks/performance.py.)'
    if note not in section:
      first, _, rest = section.partition('\n')
      section = f'{first}\n\n{note}\n{rest}'
    out += '\n' + section + '\n'
  return out


def _header(args, peak):
  """The report's title, machine and matmul peak, and the train-step table's heading."""
  peak_g = max(peak.values())
  lines = [
    '# Performance',
    '',
    f'Generated by `python -m benchmarks.performance` on {time.strftime("%Y-%m-%d")}: '
    f'{os.cpu_count()} CPU cores, jax {args.jax_version}, float32 unless said, '
    f'load average {os.getloadavg()[0]:.1f} at the end. Figures are one run each on this '
    'machine with nothing else running; expect a few per cent of noise.',
    '',
    'How the figures depend on the machine: machines of this kind have read 200 and 350 '
    'GFLOP/s float32 matmul peak on different days, and XLA:CPU and oneDNN (PyTorch) do not '
    'scale alike with it (JAX / PyTorch for the 256x256 step has read 0.97 and 1.11), so '
    'compare ratios and %peak only within one report, never across machines.',
    '',
    f'float32 matmul peak (4096^3, best of 3): numpy {peak["numpy"]:.0f} GFLOP/s, jax '
    f'{peak["jax"]:.0f} GFLOP/s; "%peak" below divides by {peak_g:.0f}.',
    '',
    '## Joint train step (translator(s), discriminators, teacher, student, Adam)',
    '',
    f'Full-size networks (`configs/cmedl.py`), {args.size}x{args.size}, batch 1, median of '
    f'{args.steps} steps after a warm-up, XLA flag `{FAST_CONV}` unless said '
    '(`python -m cmedl_jax.main` sets it). GFLOP = XLA `cost_analysis` of the JAX step; '
    'XLA MB = arguments + outputs + temporaries - aliased (buffer assignment).',
    '',
    '| pairing | impl | compile s | step s | GFLOP | GFLOP/s | %peak | XLA MB | peak RSS MB |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  return lines


def _step_rows(steps, peak_g):
  """The train-step table's rows; {pairing: GFLOP of its first JAX row} (used for all rows)."""
  lines = []
  ref_flops = {}
  for r in steps:
    if 'error' in r:
      lines.append(f'| {r["pair"]} | {r["framework"]} | {r["error"]} | | | | | | |')
      continue
    if r['framework'] == 'jax':
      ref_flops.setdefault(r['pair'], r['flops'])
    flops = ref_flops.get(r['pair'], float('nan'))
    impl = r['framework'] if r['framework'] == 'torch' else f'jax {r.get("dtype", "float32")}'
    if r.get('flags'):
      impl += f' ({r["flags"]} flags)'
    if r['framework'] == 'torch':
      impl = 'torch 2.13 eager (oneDNN)'
    gfs = flops / r['step_s'] / 1e9
    xla = _mb(r['xla_bytes']) if r.get('xla_bytes') else '-'
    compile_s = f'{r["compile_s"]:.1f}' if r['framework'] == 'jax' else '-'
    lines.append(
      f'| {r["pair"]} | {impl} | {compile_s} | {r["step_s"]:.2f} | '
      f'{flops / 1e9:,.0f} | {gfs:.0f} | {100 * gfs / peak_g:.0f}% | {xla} | '
      f'{r["rss_mb"]:,.0f} |'
    )
  return lines, ref_flops


def _scaling(args, scaling, steps, ref_flops):
  """The data-parallel scaling section and, given the full U-Net + CycleGAN row, its
  all-reduce on paper; that row (or None)."""
  lines = []
  lines += [
    '## Data-parallel scaling on forced CPU devices',
    '',
    f'`configs/demo.py` networks at {args.scaling_size}x{args.scaling_size}, global batch 8 '
    'sharded over N devices of this 2-core machine (`--xla_force_host_platform_device_'
    'count=N`). Same global batch, so the losses must agree; the cores do not grow with '
    'N, so throughput measures the cost of partitioning, not a speed-up.',
    '',
    '| devices | step s | slices/s | largest loss difference vs 1 device |',
    '|---|---|---|---|',
  ]
  base = {k: v for k, v in scaling[0]['losses'].items() if k.startswith('loss/')}
  for r in scaling:
    diff = max(abs(r['losses'][k] - base[k]) / max(abs(base[k]), 1e-12) for k in base)
    lines.append(
      f'| {r["devices"]} | {r["step_s"]:.3f} | {8 / r["step_s"]:.1f} | {diff:.1e} (relative) |'
    )
  params = scaling[0]['params']
  full = next(
    (
      r
      for r in steps
      if r.get('pair') == 'unet:cyclegan' and 'params' in r and r['framework'] == 'jax'
    ),
    None,
  )
  if full:
    n_params = sum(full['params'].values())
    grad_bytes = 4 * n_params
    lines += [
      '',
      '**On paper, 8 GPUs / a TPU slice.** Data parallelism all-reduces every '
      f'gradient once per step: for the full U-Net + CycleGAN model {n_params:,} '
      f'float32 parameters = {grad_bytes / 2**20:,.0f} MB per step (a ring all-reduce '
      f'moves about 2x that per device), against {ref_flops["unet:cyclegan"] / 1e9:,.0f} '
      f'GFLOP of compute per {args.size}x{args.size} slice. At 8 slices per device, an '
      'H100-class GPU (~400 TFLOP/s bf16 dense, ~50% achieved) computes for '
      f'{8 * ref_flops["unet:cyclegan"] / 200e12 * 1e3:.0f} ms while NVLink (~450 GB/s) '
      f'moves the gradients in {2 * grad_bytes / 450e9 * 1e3:.1f} ms: communication is '
      'a few per cent, and XLA overlaps it with the backward pass. Over 100 Gb/s '
      f'Ethernet between hosts the same all-reduce takes {2 * grad_bytes / 12.5e9 * 1e3:.0f}'
      ' ms, so multi-host runs want a larger per-device batch. '
      f'(The scaling model above has {params:,} parameters.)',
    ]
  return lines, full


def _pipeline_metrics_prediction(args, full, pipeline_text, metrics_text, pred):
  """The input pipeline, metrics and prediction sections."""
  lines = [
    '',
    '## Input pipeline',
    '',
    'Output of `python -m benchmarks.input_pipeline`:',
    '',
    '```',
    pipeline_text.strip(),
    '```',
    '',
  ]
  if full:
    need = 2 / full['step_s']
    lines += [
      f'The full step at {args.size}x{args.size}, batch 1, consumes 2 slices '
      f'(source + target) per {full["step_s"]:.1f} s = {need:.2f} slices/s, far less '
      'than the iterator delivers (above); the trainer reports the wait '
      '(`perf/data_wait_fraction`; 1-2% in the demo, where a step takes 0.7 s).',
      '',
    ]
  lines += [
    '## Metrics',
    '',
    'Output of `python -m benchmarks.metrics`:',
    '',
    '```',
    metrics_text.strip(),
    '```',
    '',
    '## Prediction',
    '',
    f'Full-size U-Net student, {pred["slices"]} slices of {args.size}x{args.size}, batch '
    f'16: {pred["seconds"]:.1f} s per volume = {60 / pred["seconds"]:.1f} volumes/min on '
    'the network alone; preparation and inversion add about 1.4 s for a 512x512x128 CT '
    '(input pipeline output above) plus reading and writing the NIfTI files.',
    '',
  ]
  return lines


def _memory(memory):
  """The peak-memory section: its table and the rematerialisation paragraph."""
  lines = [
    '## Peak memory (XLA buffer assignment) of the default config',
    '',
    'U-Net + CycleGAN, float32; compile only. Parameters, Adam states and the pool are '
    'the arguments; temporaries are the activations kept for the backward pass and the '
    'work buffers. Residuals: what JAX keeps from the generator-side forward pass for its '
    'backward pass (parameters included), counted before XLA optimises.',
    '',
    '| size | batch | remat | arguments MB | temporaries MB | total MB | residuals MB |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in memory:
    total = r['argument'] + r['output'] + r['temp'] - r['alias']
    lines.append(
      f'| {r["size"]} | {r["batch"]} | {"on" if r["remat"] else "off"} | '
      f'{_mb(r["argument"])} | {_mb(r["temp"])} | {_mb(total)} | '
      f'{_mb(r["residual"])} |'
    )
  lines += [
    '',
    'The arguments (parameters, the two Adam moments, the batch) stay nearly '
    'constant; the temporaries grow with batch and with the number of pixels.',
    '',
  ]
  pairs = {(r['size'], r['batch']): {} for r in memory}
  for r in memory:
    pairs[(r['size'], r['batch'])][r['remat']] = r
  for (size, batch), by in pairs.items():
    if True in by and False in by:
      off, on = by[False], by[True]
      lines += [
        f'**Rematerialisation** (`--config.model.remat=True`: `nn.remat` around every '
        'U-Net conv-BN-ReLU, ResNet-generator block, FC-DenseNet dense block and PSPNet '
        f'residual block) at {size}x{size}, batch {batch}: JAX keeps '
        f'{_mb(on["residual"])} MB of residuals instead of {_mb(off["residual"])} MB '
        f'({100 * (1 - on["residual"] / off["residual"]):.0f}% less; of which '
        f"{_mb(on['generator_params'])} MB are the parameters themselves), but XLA:CPU's "
        f'temporaries are {_mb(on["temp"])} MB vs {_mb(off["temp"])} MB: the CPU '
        'compiler drops the optimisation barriers that jax.checkpoint emits and then '
        'merges the recomputation with the forward pass (common-subexpression '
        'elimination), so on CPU remat changes neither memory nor speed. The saving is '
        'meant for GPU and TPU, where XLA keeps the barriers (not measured here: no '
        'accelerator lent). tests/test_models.py checks that remat gives the same '
        'parameters and gradients with fewer residuals, tests/test_train_step.py that '
        'the whole step is unchanged.',
        '',
      ]
      break
  return lines


def write_report(args, peak, steps, scaling, memory, pipeline_text, metrics_text, pred):
  peak_g = max(peak.values())
  lines = _header(args, peak)
  rows, ref_flops = _step_rows(steps, peak_g)
  lines += rows
  lines += [
    '',
    'bf16: compute in bfloat16, parameters and losses float32 '
    '(`--config.model.dtype=bfloat16`); on XLA:CPU it is no faster than float32 (row '
    'above), it is meant for accelerators. Rematerialisation: see the memory section.',
    '',
  ]
  lines += goals(steps, ref_flops, peak_g)
  scaling_lines, full = _scaling(args, scaling, steps, ref_flops)
  lines += scaling_lines
  lines += _pipeline_metrics_prediction(args, full, pipeline_text, metrics_text, pred)
  lines += _memory(memory)
  return '\n'.join(lines)


def _parse_args(argv):
  """The options, with the sizes of each section (--quick: the smoke run's) set on them."""
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=os.path.join(ROOT, 'docs', 'PERFORMANCE.md'))
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--steps', type=int, default=2)
  ap.add_argument('--pairs', default=step_benchmark.DEFAULT_PAIRS)
  ap.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run of the script')
  args = ap.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  args.jax_version = jax.__version__
  args.scaling_size = 96
  args.memory_grid = [
    (256, 1, False),
    (256, 2, False),
    (256, 4, False),
    (128, 1, False),
    (384, 1, False),
    (256, 1, True),
    (256, 4, True),
  ]
  args.pred_shape = (256, 128)  # (size, slices)
  if args.quick:
    args.size, args.steps, args.pairs, args.scaling_size = 64, 1, 'unet:cyclegan', 32
    args.memory_grid, args.pred_shape = [(64, 1, False), (64, 2, False), (64, 1, True)], (64, 8)
  return args


def _pipeline_and_metrics_text(args):
  """The printed output of benchmarks/input_pipeline.py (less its workdir line) and
  benchmarks/metrics.py, each run in its own process."""
  pipe = subprocess.run(
    [sys.executable, '-m', 'benchmarks.input_pipeline']
    + (['--cases', '2', '--batches', '5'] if args.quick else []),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
  )
  pipeline_text = '\n'.join(l for l in pipe.stdout.splitlines() if not l.startswith('workdir'))
  metrics_text = subprocess.run(
    [sys.executable, '-m', 'benchmarks.metrics'], cwd=ROOT, capture_output=True, text=True
  ).stdout
  return pipeline_text, metrics_text


def main(argv=None):
  args = _parse_args(argv)
  t0 = time.time()
  print('matmul peak ...', flush=True)
  peak = step_benchmark.matmul_peak()
  print('train steps ...', flush=True)
  steps = train_step_rows(args)
  print('scaling ...', flush=True)
  scaling = scaling_rows(args)
  print('memory ...', flush=True)
  memory = memory_rows(args)
  print('input pipeline, metrics, prediction ...', flush=True)
  pipeline_text, metrics_text = _pipeline_and_metrics_text(args)
  size, slices = args.pred_shape
  pred, _ = run_python(
    ['-m', 'benchmarks.prediction', '--size', str(size), '--slices', str(slices), '--batch', '16'],
    {'XLA_FLAGS': FAST_CONV},
  )
  raw = dict(peak=peak, steps=steps, scaling=scaling, memory=memory, prediction=pred)
  # The numbers behind the text, beside it.
  files.atomic_write(os.path.splitext(args.out)[0] + '.json', json.dumps(raw, indent=1))
  text = write_report(args, peak, steps, scaling, memory, pipeline_text, metrics_text, pred)
  text += kept_sections(args.out)
  files.atomic_write(
    args.out, text + f'\nThe whole report took {time.time() - t0:.0f} s to generate.\n'
  )
  # The multi-process rows (1x4 vs 2x2 processes x devices), as their own section.
  multihost.main(['--out', args.out] + (['--size', '32', '--steps', '2'] if args.quick else []))
  print(f'wrote {args.out} in {time.time() - t0:.0f} s')


if __name__ == '__main__':
  main()
