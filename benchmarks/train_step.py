"""Time the joint CMEDL train step under XLA:CPU against an equivalent eager PyTorch step.

For each segmenter x translator pairing (configs/cmedl.py full-size networks) at --size and
--batch, prints: compile time, median step time, XLA FLOPs per step (XLA's cost analysis:
compile_counted), achieved GFLOP/s and its fraction of this machine's float32 matmul peak
(measured here: best of a few 4096^3 products), peak memory (XLA buffer assignment:
arguments + outputs + temporaries - aliased; and the worker's peak RSS), and, unless
--no-torch or torch is missing, the same figures of the eager PyTorch step from
benchmarks/torch_reference.py (same architectures, parameter counts, losses, batch and Adam)
and the time ratio JAX / torch. Parameter counts of both implementations are printed and
compared per network.

Each (pairing, framework) runs in its own worker process so that peak RSS, XLA_FLAGS and
thread pools do not leak between runs.

  python -m benchmarks.train_step [--size 256] [--batch 1]
      [--pairs unet:cyclegan,unet:cut,densefcn:cyclegan,pspnet:cyclegan] [--steps 5]
      [--no-torch] [--xla-flags "--xla_cpu_use_onednn=true ..."] [--breakdown] [--dtype bfloat16]
      [--shared-machine] [--precision highest|default] [--torch-device auto|cpu|cuda]
      [--config tiny] [--no-peak]

--breakdown additionally times the parts of the JAX step one by one (generator fwd+bwd,
discriminator fwd+bwd, segmenter fwd+bwd on the teacher batch, losses) to show where time
goes. Torch is an optional, benchmark-only dependency: `pip install torch==2.13.0` (CPU build).

--precision sets both sides alike: 'highest' is true float32 (JAX_DEFAULT_MATMUL_PRECISION=highest;
torch allow_tf32 off for matmuls and cuDNN), 'default' is each framework's fast float32 on a GPU
(JAX's default precision, TF32 on recent NVIDIA GPUs; torch allow_tf32 on). Without it the
environment and torch's own defaults stand. On CPU both are float32. The torch step runs on
--torch-device (auto: cuda when torch sees a GPU), with cudnn.benchmark there. --config tiny
takes the networks of configs/tiny.py (seconds to compile on CPU; benchmarks/gpu.sh --tiny).
The last lines, 'jax/torch PAIR ...: RATIO', give the wall-time ratio per pairing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PAIRS = 'unet:cyclegan,unet:cut,densefcn:cyclegan,pspnet:cyclegan'


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_batch(n, size, seed):
  """make_batch-style images in [-1, 1] (NHWC) with bright discs labelled 1."""
  import numpy as np

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  images, labels = [], []
  for _ in range(n):
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    r = rng.uniform(0.1 * size, 0.25 * size)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    images.append(
      np.clip(np.where(disc, 0.6, -0.4) + 0.1 * rng.standard_normal((size, size)), -1, 1)
    )
    labels.append(disc)
  return {
    'image': np.stack(images)[..., None].astype(np.float32),
    'label': np.stack(labels).astype(np.int32),
    'has_label': np.ones((n,), np.float32),
  }


# ------------------------------------------------------------------------------ matmul peak


def matmul_peak(n=4096, repeats=3):
  """Best float32 GFLOP/s of an n^3 product: numpy and jnp.dot."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  out = {}
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t0)
  out['numpy'] = 2 * n**3 / best / 1e9
  aj = jnp.asarray(a)
  dot = jax.jit(jnp.dot)
  dot(aj, aj).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(aj, aj).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  out['jax'] = 2 * n**3 / best / 1e9
  return out


# ------------------------------------------------------------------------------ JAX worker


def config_for(pair, size, batch, dtype='float32', module='cmedl'):
  """configs/MODULE.py's config of `pair` (SEGMENTER:TRANSLATOR) at size x size, batch."""
  import importlib

  seg, trans = pair.split(':')
  config = importlib.import_module(f'configs.{module}').get_config(f'{seg},{trans}')
  config.data.image_size = size
  config.train.global_batch_size = batch
  config.model.dtype = dtype
  return config


def compile_counted(lowered):
  """(compiled program, FLOPs of one call by XLA's cost analysis). The count is the compiled
  program's on CPU and the lowered program's elsewhere: a GPU program's cuDNN convolutions are
  left out of its compiled count (an H200 reported 53 of the full-size step's 16,003 GFLOP at
  batch 8). On CPU the two agree to 0.3 % (that step: 15,965 lowered, 16,003 compiled)."""
  import jax

  compiled = lowered.compile()
  cost = (compiled if jax.default_backend() == 'cpu' else lowered).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return compiled, float((cost or {}).get('flops', float('nan')))


def count(tree):
  import jax

  return int(sum(x.size for x in jax.tree.leaves(tree)))


def jax_worker(pair, size, batch, steps, breakdown, dtype='float32', module='cmedl'):
  import functools
  import jax

  from cmedl_jax import method, train_state, train_step as ts

  config = config_for(pair, size, batch, dtype, module)
  nets = method.build_networks(config, in_channels=1)
  state, tx = train_state.create_train_state(config, nets, jax.random.PRNGKey(0), (size, size, 1))
  src = jax.device_put(synthetic_batch(batch, size, 1))
  tgt = jax.device_put(synthetic_batch(batch, size, 2))
  step = jax.jit(
    functools.partial(ts.train_step, config=config, nets=nets, tx=tx), donate_argnums=0
  )
  t0 = time.perf_counter()
  compiled, flops = compile_counted(step.lower(state, src, tgt))
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_bytes = None
  if mem is not None:
    xla_bytes = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  times, cpu = [], []
  for i in range(steps + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, src, tgt)
    jax.block_until_ready((state, metrics))
    if i:  # The first call also pays one-off allocation; not counted.
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
  result = dict(
    framework='jax',
    pair=pair,
    dtype=dtype,
    device=str(jax.devices()[0].device_kind),
    precision=jax.config.jax_default_matmul_precision or 'default',
    compile_s=compile_s,
    step_s=statistics.median(times),
    times=times,
    cpu_s=statistics.median(cpu),
    flops=flops,
    xla_bytes=xla_bytes,
    rss_mb=peak_rss_mb(),
    params={k: count(v) for k, v in state.params.items() if count(v)},
    finite=bool(all(float(v) == float(v) for v in jax.device_get(metrics).values())),
  )
  if breakdown:
    result['breakdown'] = jax_breakdown(config, nets, state, src, tgt, steps)
  return result


def _time_fn(fn, args, steps):
  import jax

  compiled, flops = compile_counted(jax.jit(fn).lower(*args))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return dict(s=statistics.median(times), flops=flops)


def jax_breakdown(config, nets, state, src, tgt, steps):
  """Times the parts of the step separately (forward + backward of each network)."""
  import jax
  import jax.numpy as jnp

  from cmedl_jax import losses

  x, t = src['image'], tgt['image']
  p = state.params
  out = {}

  def grad_of(apply, params, *inputs):
    return jax.grad(lambda q: jnp.sum(jnp.square(apply(q, *inputs))))(params)

  g_apply = lambda q, v: nets.translator.apply({'params': q}, v)
  out['generator fwd+bwd (N)'] = _time_fn(
    lambda q, v: grad_of(g_apply, q, v), (p['translator'], x), steps
  )
  out['generator fwd (N)'] = _time_fn(g_apply, (p['translator'], x), steps)
  d_apply = lambda q, v: nets.disc_target.apply({'params': q}, v)
  out['discriminator fwd+bwd (N)'] = _time_fn(
    lambda q, v: grad_of(d_apply, q, v), (p['disc_target'], x), steps
  )

  def seg_apply(q, v):
    (logits, feats), _ = nets.teacher.apply(
      {'params': q, 'batch_stats': state.batch_stats['teacher']},
      v,
      train=True,
      mutable=['batch_stats'],
    )
    return logits

  xt = jnp.concatenate([x, t], 0)
  out['segmenter fwd+bwd (2N)'] = _time_fn(
    lambda q, v: grad_of(seg_apply, q, v), (p['teacher'], xt), steps
  )
  ctx = lambda a, b, r: losses.contextual_loss(
    a, b, max_points=config.method.contextual_points, rng=r
  )
  out['contextual loss fwd+bwd'] = _time_fn(
    lambda a, b, r: jax.grad(ctx)(a, b, r), (x, t, jax.random.PRNGKey(0)), steps
  )
  return out


# ---------------------------------------------------------------------------- torch worker


def torch_reference_step(pair, size, batch, device, module='cmedl'):
  """benchmarks/torch_reference.py's CMEDLStep of `pair` with configs/MODULE.py's widths."""
  import inspect

  import torch

  from benchmarks import torch_reference

  seg, trans = pair.split(':')
  config = config_for(pair, size, batch, module=module)
  torch.manual_seed(0)
  seg_cfg = config.model.student.to_dict()
  accepted = inspect.signature(torch_reference.SEGMENTERS[seg]).parameters
  seg_kwargs = {
    k: v
    for k, v in seg_cfg.items()
    if k in accepted and k not in ('in_ch', 'num_classes') and v is not None
  }
  return torch_reference.CMEDLStep(
    seg,
    trans,
    seg_kwargs=seg_kwargs,
    ngf=config.model.translator.ngf,
    n_blocks=config.model.translator.n_blocks,
    ndf=config.model.discriminator.ndf,
    n_layers=config.model.discriminator.n_layers,
    num_classes=config.data.num_classes,
    nce_layers=config.model.nce.layers,
    num_patches=config.model.nce.num_patches,
    nce_features=config.model.nce.num_features,
    contextual_points=config.method.contextual_points,
    contextual_patch=config.method.contextual_patch,
    taps=tuple(config.method.hint_taps),
    device=device,
  )


def torch_worker(pair, size, batch, steps, precision=None, device='auto', module='cmedl'):
  """The eager torch step on `device` (auto: cuda when available); precision 'highest' turns
  TF32 off for matmuls and cuDNN, 'default' on, None leaves torch's defaults."""
  import torch

  if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cuda = device.startswith('cuda')
  if precision is not None:
    torch.backends.cuda.matmul.allow_tf32 = precision == 'default'
    torch.backends.cudnn.allow_tf32 = precision == 'default'
  if cuda:
    torch.backends.cudnn.benchmark = True  # The JAX side autotunes its convolutions too.
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  ref = torch_reference_step(pair, size, batch, device, module)
  to_t = lambda b: (
    torch.from_numpy(b['image']).permute(0, 3, 1, 2).contiguous().to(device),
    torch.from_numpy(b['label']).long().to(device),
    torch.from_numpy(b['has_label']).to(device),
  )
  x, y, _ = to_t(synthetic_batch(batch, size, 1))
  t, ty, th = to_t(synthetic_batch(batch, size, 2))
  times, cpu, finite = [], [], True
  for i in range(steps + 1):
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    g_loss, d_loss = ref.step(x, y, t, ty, th)
    sync()
    if i:
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    finite = finite and g_loss == g_loss and d_loss == d_loss
  return dict(
    framework='torch',
    pair=pair,
    device=torch.cuda.get_device_name() if cuda else 'cpu',
    precision=precision or 'torch default',
    tf32=[torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    compile_s=0.0,
    step_s=statistics.median(times),
    times=times,
    cpu_s=statistics.median(cpu),
    rss_mb=peak_rss_mb(),
    params=ref.param_counts(),
    finite=finite,
    threads=torch.get_num_threads(),
  )


# -------------------------------------------------------------------------------- driver


def run_worker(kind, pair, args):
  cmd = [
    sys.executable,
    '-m',
    'benchmarks.train_step',
    '--_worker',
    kind,
    '--pairs',
    pair,
    '--size',
    str(args.size),
    '--batch',
    str(args.batch),
    '--steps',
    str(args.steps),
  ]
  if args.breakdown:
    cmd.append('--breakdown')
  if kind == 'jax':
    cmd += ['--dtype', getattr(args, 'dtype', 'float32')]
  precision = getattr(args, 'precision', None)
  if precision is not None:
    cmd += ['--precision', precision]
  cmd += ['--torch-device', getattr(args, 'torch_device', 'auto')]
  cmd += ['--config', getattr(args, 'config', 'cmedl')]
  env = dict(os.environ)
  if precision == 'highest':
    env['JAX_DEFAULT_MATMUL_PRECISION'] = 'highest'
  elif precision == 'default':
    env.pop('JAX_DEFAULT_MATMUL_PRECISION', None)
  # OpenMP's default (spin briefly, then sleep) is what plain PyTorch code runs with; passive
  # waiting made the torch step 9 % slower on a quiet 2-core machine (14.7 vs 13.4 s at 256x256,
  # batch 1) and is only for a shared machine, where spinning threads fight other jobs
  # (10-30 s instead of 1.7 s per 64x64 step at load 5). An OMP_WAIT_POLICY in the environment wins.
  if getattr(args, 'shared_machine', False):
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  if args.xla_flags is not None:
    env['XLA_FLAGS'] = args.xla_flags
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  result = worker_result(proc.stdout)
  if proc.returncode != 0 or result is None:
    sys.stderr.write(proc.stderr[-4000:])
    return dict(framework=kind, pair=pair, error=f'worker exited with {proc.returncode}')
  return result


def print_result(result):
  """A worker's result: one 'RESULT <json>' line on stdout (worker_result reads it)."""
  print('RESULT ' + json.dumps(result), flush=True)


def worker_result(stdout):
  """The last 'RESULT <json>' line of a worker's stdout, parsed; None without one."""
  lines = [l for l in stdout.splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT ') :]) if lines else None


def torch_available():
  try:
    import importlib.util

    return importlib.util.find_spec('torch') is not None
  except Exception:  # pylint: disable=broad-except
    return False


def _parser():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--pairs', default=DEFAULT_PAIRS)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--no-torch', action='store_true')
  ap.add_argument('--xla-flags', default=None, help='XLA_FLAGS for the JAX workers')
  ap.add_argument('--breakdown', action='store_true', help='also time parts of the JAX step')
  ap.add_argument('--dtype', default='float32', help='JAX compute dtype: float32 | bfloat16')
  ap.add_argument(
    '--shared-machine',
    action='store_true',
    help='torch workers wait passively (OMP_WAIT_POLICY=PASSIVE): only on a loaded machine',
  )
  ap.add_argument(
    '--precision',
    choices=('highest', 'default'),
    default=None,
    help='both sides: true float32 (highest) or TF32 on a GPU (default); unset: as the environment',
  )
  ap.add_argument('--torch-device', default='auto', help='auto (cuda when available) | cpu | cuda')
  ap.add_argument('--config', default='cmedl', help='networks of configs/NAME.py: cmedl | tiny')
  ap.add_argument('--no-peak', action='store_true', help='skip the matmul peak (no %%peak)')
  ap.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
  return ap


def _print_setting(args):
  """The run's sizes, flags and machine load; the matmul peak (GFLOP/s, nan with --no-peak)."""
  print(
    f'size {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps, '
    f'XLA_FLAGS={args.xla_flags if args.xla_flags is not None else os.environ.get("XLA_FLAGS", "")!r}'
    " (+ cmedl_jax's XLA:CPU default unless named), "
    f'torch OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "PASSIVE" if args.shared_machine else "default")}, '
    f'load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {os.cpu_count()} cpus'
  )
  if args.no_peak:
    return float('nan')
  peak = matmul_peak()
  peak_gflops = max(peak.values())
  print(
    f'float32 matmul peak (4096^3, best of 3): numpy {peak["numpy"]:.0f} GFLOP/s, '
    f'jax {peak["jax"]:.0f} GFLOP/s; using {peak_gflops:.0f}'
  )
  return peak_gflops


def _run_pairs(pairs, use_torch, args):
  """The workers' results, JAX (then torch) per pairing; prints parameter counts, breakdown."""
  rows = []
  for pair in pairs:
    j = run_worker('jax', pair, args)
    rows.append(j)
    if use_torch:
      rows.append(run_worker('torch', pair, args))
      tj = rows[-1]
      if 'error' not in j and 'error' not in tj:
        for net in sorted(set(j['params']) | set(tj['params'])):
          a, b = j['params'].get(net), tj['params'].get(net)
          flag = 'equal' if a == b else 'DIFFER'
          print(f'  params {pair:18s} {net:15s} jax {a} torch {b} {flag}')
    if 'breakdown' in j:
      for part, r in j['breakdown'].items():
        print(
          f'  breakdown {pair}: {part:28s} {r["s"]:.3f} s  {r["flops"] / 1e9:7.1f} GFLOP  '
          f'{r["flops"] / r["s"] / 1e9:6.1f} GFLOP/s'
        )
  return rows


def _print_table(pairs, by_pair, peak_gflops):
  """One row per (pairing, framework): compile and step time, FLOPs, %peak, memory, ratio."""
  print()
  hdr = (
    f'{"pairing":18s} {"impl":5s} {"compile s":>9s} {"step s":>8s} {"GFLOP":>8s} '
    f'{"GFLOP/s":>8s} {"%peak":>6s} {"cpu s":>7s} {"XLA MB":>8s} {"RSS MB":>8s} {"jax/torch":>9s}'
  )
  print(hdr)
  print('-' * len(hdr))
  for pair in pairs:
    flops = by_pair[pair].get('jax', {}).get('flops', float('nan'))
    for fw in ('jax', 'torch'):
      r = by_pair[pair].get(fw)
      if r is None:
        continue
      if 'error' in r:
        print(f'{pair:18s} {fw:5s} {r["error"]}')
        continue
      gfs = flops / r['step_s'] / 1e9
      ratio = ''
      if fw == 'torch' and 'step_s' in by_pair[pair].get('jax', {}):
        ratio = f'{by_pair[pair]["jax"]["step_s"] / r["step_s"]:.2f}'
      xla_mb = f'{r["xla_bytes"] / 2**20:.0f}' if r.get('xla_bytes') else '-'
      print(
        f'{pair:18s} {fw:5s} {r["compile_s"]:9.1f} {r["step_s"]:8.3f} {flops / 1e9:8.1f} '
        f'{gfs:8.1f} {100 * gfs / peak_gflops:5.0f}% {r["cpu_s"]:7.2f} {xla_mb:>8s} {r["rss_mb"]:8.0f} {ratio:>9s}'
      )
  print(
    '\nstep s = median wall time; cpu s = median process CPU time per step (more robust on a '
    'shared machine);\nGFLOP = XLA cost_analysis of the JAX step (used for both); '
    'jax/torch = wall-time ratio.'
  )


def _print_summary(pairs, by_pair, args):
  """The last lines: 'jax step PAIR ...' and 'jax/torch PAIR ...: RATIO' per pairing."""
  for pair in pairs:
    j, t = by_pair[pair].get('jax', {}), by_pair[pair].get('torch', {})
    if 'step_s' in j:
      print(
        f'jax step {pair} {args.size}x{args.size} batch {args.batch} precision '
        f'{j.get("precision")} {j.get("dtype")}: {1e3 * j["step_s"]:.1f} ms on {j.get("device")} '
        f'(compile {j["compile_s"]:.1f} s; median of {args.steps} steps)'
      )
    if 'step_s' in j and 'step_s' in t:
      print(
        f'jax/torch {pair} {args.size}x{args.size} batch {args.batch} precision '
        f'{args.precision or "as the environment"}: {j["step_s"] / t["step_s"]:.2f} '
        f'(jax {1e3 * j["step_s"]:.1f} ms on {j.get("device")}, torch {1e3 * t["step_s"]:.1f} ms '
        f'on {t.get("device")}, tf32 {t.get("tf32")}; median of {args.steps} steps)'
      )


def main(argv=None):
  ap = _parser()
  args = ap.parse_args(argv)

  if args._worker:
    common = (args.pairs, args.size, args.batch, args.steps)
    if args._worker == 'jax':
      result = jax_worker(*common, args.breakdown, args.dtype, args.config)
    else:
      result = torch_worker(*common, args.precision, args.torch_device, args.config)
    print_result(result)
    return

  pairs = [p.strip() for p in args.pairs.split(',') if p.strip()]
  for p in pairs:
    if p.count(':') != 1:
      ap.error(f'--pairs: {p!r} is not SEGMENTER:TRANSLATOR')
  use_torch = not args.no_torch
  if use_torch and not torch_available():
    print(
      'torch is not installed: running the JAX part only '
      '(for the comparison: pip install torch==2.13.0, a CPU build).'
    )
    use_torch = False
  peak_gflops = _print_setting(args)
  by_pair = {}
  for r in _run_pairs(pairs, use_torch, args):
    by_pair.setdefault(r['pair'], {})[r['framework']] = r
  _print_table(pairs, by_pair, peak_gflops)
  _print_summary(pairs, by_pair, args)


if __name__ == '__main__':
  main()
