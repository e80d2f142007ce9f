r"""Where the time of a study-size train step goes, and what makes it faster (issue 17, "Speed").

The phantom study (configs/study.py, "informative,cmedl": 64x64 slices, batch 8, U-Net width
8 depth 3, CycleGAN ngf 8 with 3 residual blocks, PatchGAN ndf 8, contextual loss on image
patches, hint loss) trains many small runs on 2 CPU cores. This measures, in one run:

  * the float32 matmul peak (numpy and jnp 4096^3, best of 3; benchmarks/train_step.py);
  * per XLA_FLAGS variant (each in its own worker process, since XLA reads its flags once):
    the study CMEDL and student_only train steps (compile excluded, median of --steps);
  * in the baseline-flags worker also code variants and parts, all compiled first and then
    timed interleaved (one call of each per round, medians over rounds), so that load from
    other users hits every item alike:
      - the step with other layer formulations (reflection padding, transposed convolution),
        without the contextual loss, with fewer contextual points, batch 16 and 32;
      - parts: generator-side loss fwd+bwd, translator-side terms alone, contextual loss
        alone, one generator / discriminator / segmenter fwd+bwd, the discriminator
        update, the optimizer update;
      - jax.vmap of the pure train_step over S stacked seeds (states and batches) — what
        multi-seed training would give in slices/s.
  FLOPs are XLA's cost_analysis of each program (benchmarks/train_step.py's compile_counted).

  python -m benchmarks.study_speed [--steps 15] [--flags baseline,jax_default,...]
      [--no-parts] [--no-variants] [--vmap 2,4] [--repeat 2] [--out study_speed.json]

--repeat runs the flag sweep that many times (A B C A B C) to show drift under load.
--concurrent K additionally runs one steps-only worker pinned to core 0 (taskset), then K such
workers at once, one per core: the throughput of K independent runs vs one run on all cores.
The K workers start timing together (after each has compiled and warmed up). --methods picks
the step items (default cmedl,student_only). The last lines give study runs per hour at
configs/study.py's STEPS from the cmedl step times (train steps only): one process, K
processes at once, jax.vmap over S seeds.
--set FIELD=VALUE overrides a field of every study config (benchmarks/gpu.sh --tiny:
data.image_size=32, train.global_batch_size=2); --networks tiny takes the networks of
configs/tiny.py (seconds to compile on CPU) instead of configs/study.py's.
--profile instead traces --steps steps of one method (jax.profiler) and sums XLA:CPU thunk
times per HLO opcode, with the slowest instructions.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import train_step as step_benchmark
from benchmarks.train_step import ROOT

YNN = '--xla_cpu_experimental_ynn_fusion_type'
# Named XLA_FLAGS settings. 'baseline' is what `import cmedl_jax` sets.
FLAG_SETS = {
  'baseline': f'{YNN}=-individual_convolution',
  'jax_default': '',  # jax 0.10.2's own defaults (YNNPACK convolutions).
  # jax 0.10.2 sends reductions (and more) to YNNPACK fusions by default, whatever its
  # flag help says; these take them back to XLA's own loops.
  'ynn_no_reduce': f'{YNN}=-individual_convolution,-reduce',
  'ynn_no_eltwise': f'{YNN}=-individual_convolution,-eltwise',
  'ynn_none': f'{YNN}=-individual_convolution,-individual_dot,-dot,-eltwise,-reduce',
  'onednn': f'{YNN}=-individual_convolution --xla_cpu_use_onednn=true',
  'onednn_fusion': f'{YNN}=-individual_convolution --xla_cpu_use_onednn=true '
  '--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce',
  'xnn_dot': f'{YNN}=-individual_convolution --xla_cpu_experimental_xnn_fusion_type=dot',
  'xnn_greedy': f'{YNN}=-individual_convolution '
  '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
  'concurrency_sched': f'{YNN}=-individual_convolution '
  '--xla_cpu_enable_concurrency_optimized_scheduler=true',
  'no_eigen_mt': f'{YNN}=-individual_convolution --xla_cpu_multi_thread_eigen=false',
}
DEFAULT_FLAGS = 'baseline,ynn_no_reduce,jax_default'


# ------------------------------------------------------------------------------ worker


SETS = {}  # --set FIELD=VALUE overrides of every study config (configs/study.py), e.g. for --tiny.
NETWORKS = ['study']  # --networks: 'tiny' takes configs/tiny.py's networks.


def study_config(method='cmedl', **overrides):
  from configs import study, tiny

  config = study.get_config(f'informative,{method}')
  if NETWORKS[0] == 'tiny':
    small = tiny.get_config()
    for name in ('student', 'teacher', 'translator', 'discriminator', 'nce'):
      config.model[name].update(small.model[name].to_dict())
    config.method.contextual_points = small.method.contextual_points
    config.method.contextual_patch = small.method.contextual_patch
  for field, value in {**SETS, **overrides}.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


class Item:
  """A compiled program and how to call it once (state threaded through for steps)."""

  def __init__(self, name, group, lowered, args, slices, carry_state, t0):
    """lowered: the program, compiled here; t0: perf_counter() before it was lowered."""
    self.name, self.group, self.args = name, group, list(args)
    self.compiled, self.flops = step_benchmark.compile_counted(lowered)
    self.slices, self.carry_state = slices, carry_state
    self.compile_s = time.perf_counter() - t0
    self.times = []

  def call(self):
    import jax

    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    if self.carry_state:
      self.args[0] = out[0]
    return dt

  def result(self):
    s = statistics.median(self.times)
    return dict(
      name=self.name,
      group=self.group,
      step_s=s,
      times=self.times,
      flops=self.flops,
      gflops_s=self.flops / s / 1e9,
      slices=self.slices,
      slices_s=self.slices / s if self.slices else None,
      compile_s=self.compile_s,
    )


def _batches(config, batch, seed=1):
  import jax

  size = config.data.image_size
  return jax.device_put(step_benchmark.synthetic_batch(batch, size, seed)), jax.device_put(
    step_benchmark.synthetic_batch(batch, size, seed + 1)
  )


def step_item(name, config, group='step', seed=0):
  """The jitted, donated pure train step of `config` (as benchmarks/train_step.py)."""
  import jax
  from cmedl_jax import method, train_state, train_step as ts

  size, batch = config.data.image_size, config.train.global_batch_size
  nets = method.build_networks(config, in_channels=1)
  state, tx = train_state.create_train_state(
    config, nets, jax.random.PRNGKey(seed), (size, size, 1)
  )
  src, tgt = _batches(config, batch)
  fn = jax.jit(functools.partial(ts.train_step, config=config, nets=nets, tx=tx), donate_argnums=0)
  t0 = time.perf_counter()
  item = Item(name, group, fn.lower(state, src, tgt), (state, src, tgt), batch, True, t0)
  item.extra = dict(nets=nets, tx=tx)
  return item


def vmap_item(config, seeds):
  """jax.vmap of the pure train step over `seeds` stacked states and batches."""
  import jax
  import jax.numpy as jnp
  from cmedl_jax import method, train_state, train_step as ts

  size, batch = config.data.image_size, config.train.global_batch_size
  nets = method.build_networks(config, in_channels=1)
  states = []
  for s in range(seeds):
    state, tx = train_state.create_train_state(config, nets, jax.random.PRNGKey(s), (size, size, 1))
    states.append(state)
  stack = lambda *xs: jnp.stack(xs)
  state = jax.tree.map(stack, *states)
  pairs = [_batches(config, batch, seed=1 + 2 * s) for s in range(seeds)]
  src = jax.tree.map(stack, *[p[0] for p in pairs])
  tgt = jax.tree.map(stack, *[p[1] for p in pairs])
  step = functools.partial(ts.train_step, config=config, nets=nets, tx=tx)
  fn = jax.jit(jax.vmap(step), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = fn.lower(state, src, tgt)
  return Item(
    f'cmedl vmap x{seeds} seeds', 'vmap', lowered, (state, src, tgt), seeds * batch, True, t0
  )


def _part(name, fn, *args, slices):
  """An Item of the jitted `fn` on `args` (not a step: no state threaded through)."""
  import jax

  t0 = time.perf_counter()
  return Item(name, 'part', jax.jit(fn).lower(*args), args, slices, False, t0)


def _sq_grad(apply):
  """The gradient of sum(apply(q, *v)^2) in q: a network's fwd+bwd."""
  import jax
  import jax.numpy as jnp

  return lambda q, *v: jax.grad(lambda q: jnp.sum(jnp.square(apply(q, *v))))(q)


def _loss_part_items(config, nets, state, src, tgt, g_params, d_params):
  """The generator-side losses, the translator-side terms and the contextual loss alone."""
  import jax
  from cmedl_jax import losses, method, train_step as ts

  x, t = src['image'], tgt['image']
  n = x.shape[0]
  rng = jax.random.PRNGKey(0)
  items = []
  gen_loss = lambda g: ts.generator_losses(
    g, d_params, state.batch_stats, config, nets, src, tgt, rng
  )
  items.append(
    _part(
      'generator-side losses fwd+bwd',
      lambda g: jax.value_and_grad(gen_loss, has_aux=True)(g),
      g_params,
      slices=n,
    )
  )
  items.append(_part('generator-side losses fwd', lambda g: gen_loss(g)[0], g_params, slices=n))
  u = method.parts(config)

  def translator_terms(g):
    context = ts.StepContext(config, nets, u, g, d_params, state.batch_stats, src, tgt)
    return ts.translation_terms(context, rng, rng)[0].terms

  def translator_side(g):
    return sum(translator_terms(g).values())

  items.append(
    _part('translator-side terms fwd+bwd', jax.grad(translator_side), g_params, slices=n)
  )

  def translator_side_no_ctx(g):
    terms = dict(translator_terms(g))
    terms.pop('contextual', None)
    return sum(terms.values())

  # XLA removes the unused contextual branch: the difference is its cost in this program.
  name = 'translator-side terms w/o contextual fwd+bwd'
  items.append(_part(name, jax.grad(translator_side_no_ctx), g_params, slices=n))
  ctx = lambda a, b, r: losses.contextual_loss(
    a,
    b,
    feature_fn=losses.contextual_feature_fn(
      method.switch(config, 'contextual_features'), config.method.contextual_patch
    ),
    max_points=config.method.contextual_points,
    rng=r,
  )
  name = 'contextual loss fwd+bwd'
  items.append(_part(name, lambda a, b, r: jax.grad(ctx)(a, b, r), t, x, rng, slices=n))
  return items


def _network_part_items(nets, state, src, tgt, d_params, tx):
  """One network's fwd(+bwd) each, the discriminator losses and the optimizer update."""
  import jax
  import jax.numpy as jnp
  import optax
  from cmedl_jax import train_step as ts

  p = state.params
  x, t = src['image'], tgt['image']
  n = x.shape[0]
  g_apply = lambda q, v: nets.translator.apply({'params': q}, v)
  d_apply = lambda q, v: nets.disc_target.apply({'params': q}, v)

  def seg(q, v):
    (logits, _), _ = nets.teacher.apply(
      {'params': q, 'batch_stats': state.batch_stats['teacher']},
      v,
      train=True,
      mutable=['batch_stats'],
    )
    return logits

  def opt(params, opt_state):
    updates, new = tx.update(params, opt_state, params)
    return optax.apply_updates(params, updates), new

  fakes = {'fake_target': t, 'fake_source': x}
  disc_losses = lambda d: jax.value_and_grad(ts.discriminator_losses, has_aux=True)(
    d, nets, src, tgt, fakes
  )
  return [
    _part('one generator fwd+bwd', _sq_grad(g_apply), p['translator'], x, slices=n),
    _part('one generator fwd', g_apply, p['translator'], x, slices=n),
    _part('one discriminator fwd+bwd (N)', _sq_grad(d_apply), p['disc_target'], x, slices=n),
    _part(
      'teacher fwd+bwd (2N)', _sq_grad(seg), p['teacher'], jnp.concatenate([x, t], 0), slices=2 * n
    ),
    _part('student fwd+bwd (N)', _sq_grad(seg), p['student'], x, slices=n),
    _part('discriminator losses fwd+bwd', disc_losses, d_params, slices=n),
    _part('optimizer update (all groups)', opt, p, state.opt_state, slices=n),
  ]


def part_items(config, base):
  """Parts of the CMEDL step, each jitted alone (fwd+bwd unless said)."""
  import jax
  import jax.numpy as jnp
  from cmedl_jax import method

  nets, tx = base.extra['nets'], base.extra['tx']
  state, src, tgt = base.args
  # A copy: the step item donates (deletes) its state arrays when it is called.
  state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
  p = state.params
  g_params = {k: v for k, v in p.items() if k not in method.DISCRIMINATORS}
  d_params = {k: v for k, v in p.items() if k in method.DISCRIMINATORS}
  return _loss_part_items(config, nets, state, src, tgt, g_params, d_params) + (
    _network_part_items(nets, state, src, tgt, d_params, tx)
  )


def _hlo_ops(hlo_text):
  """instruction name -> (opcode, result shape, text) of the optimized HLO module."""
  import re

  ops = {}
  pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)?) ([\w\-]+)\(')
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      name, shape, opcode = m.groups()
      if opcode == 'fusion':
        kind = re.search(r'kind=(\w+)', line)
        calls = re.search(r'calls=%?([\w.\-]+)', line)
        opcode = f'fusion:{kind.group(1) if kind else "?"}'
        if calls and (
          'ynn' in calls.group(1) or 'onednn' in calls.group(1) or 'xnn' in calls.group(1)
        ):
          opcode = f'fusion:{calls.group(1).split(".")[0]}'
      ops[name] = (opcode, shape, line.strip()[:300])
  return ops


def profile_worker(args):
  """Traces --steps CMEDL steps and sums the XLA:CPU thunk times per HLO opcode and per
  convolution (its shapes), from jax.profiler's trace (xplane), to show where time goes."""
  import glob
  import tempfile

  import cmedl_jax  # noqa: F401

  os.environ['XLA_FLAGS'] = args.xla_flags_exact
  import jax

  item = step_item(args.profile_method, study_config(args.profile_method))
  ops = _hlo_ops(item.compiled.as_text())
  for _ in range(3):
    item.call()
  tmp = tempfile.mkdtemp()
  with jax.profiler.trace(tmp):
    wall = [item.call() for _ in range(args.steps)]
  files = glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)
  data = jax.profiler.ProfileData.from_file(files[0])
  per_name, per_line = {}, {}
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        name = ev.name
        if name in ops:
          per_name[name] = per_name.get(name, 0.0) + ev.duration_ns / 1e6 / args.steps
          key = f'{plane.name}/{line.name}'
          per_line[key] = per_line.get(key, 0) + 1
  by_op = {}
  for name, ms in per_name.items():
    opcode = ops[name][0]
    by_op.setdefault(opcode, [0.0, 0])
    by_op[opcode][0] += ms
    by_op[opcode][1] += 1
  top = sorted(per_name.items(), key=lambda kv: -kv[1])[:40]
  step_benchmark.print_result(
    dict(
      flags=args.flag_name,
      xla_flags=os.environ['XLA_FLAGS'],
      method=args.profile_method,
      wall_ms=1e3 * statistics.median(wall),
      traced_ms=sum(per_name.values()),
      n_instructions=len(ops),
      n_traced=len(per_name),
      lines=per_line,
      by_opcode={k: v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])},
      top=[dict(name=n, ms=ms, op=ops[n][0], hlo=ops[n][2]) for n, ms in top],
    )
  )


def worker(args):
  """Compiles the items of this worker, times them interleaved, prints RESULT json."""
  import cmedl_jax  # noqa: F401  Sets XLA_FLAGS; overridden below before the backend starts.

  os.environ['XLA_FLAGS'] = args.xla_flags_exact
  import jax

  items = []
  base = study_config('cmedl')
  for m in args.methods:
    items.append(step_item(m, base if m == 'cmedl' else study_config(m)))
  if args.full:
    variants = [
      ('cmedl pad jnp', {'model.translator': dict(base.model.translator, pad_impl='jnp')}),
      (
        'cmedl upsample xla',
        {'model.translator': dict(base.model.translator, upsample_impl='xla')},
      ),
      ('cmedl no contextual', {'loss.contextual': 0.0}),
      ('cmedl contextual 64 pts', {'method.contextual_points': 64}),
      ('cmedl batch 32', {'train.global_batch_size': 32}),
      ('student_only batch 32', {'train.global_batch_size': 32, '_method': 'student_only'}),
    ]
    for name, over in [] if args.no_variants else variants:
      over = dict(over)
      m = over.pop('_method', 'cmedl')
      config = study_config(m)
      for field, value in over.items():
        section, key = field.split('.')
        if isinstance(value, dict):
          import ml_collections

          value = ml_collections.ConfigDict(value)
        config[section][key] = value
      items.append(step_item(name, config, group='variant'))
    if not args.no_parts:
      items += part_items(base, items[0])
    for s in args.vmap:
      items.append(vmap_item(base, s))
  for item in items:  # Warm-up (one-off allocations).
    item.call()
  if args._barrier:
    _wait_for_all(*args._barrier.split(','))
  for _ in range(args.steps):
    for item in items:
      item.times.append(item.call())
  step_benchmark.print_result(
    dict(
      flags=args.flag_name,
      xla_flags=os.environ['XLA_FLAGS'],
      jax=jax.__version__,
      items=[i.result() for i in items],
    )
  )


def _wait_for_all(folder, count, limit_s=600):
  """Marks this worker ready in `folder` and waits until `count` workers are (at most
  limit_s): concurrent workers compile at different speeds, and their timed steps should
  overlap."""
  open(os.path.join(folder, str(os.getpid())), 'w').close()
  t0 = time.time()
  while len(os.listdir(folder)) < int(count) and time.time() - t0 < limit_s:
    time.sleep(0.05)


# ------------------------------------------------------------------------------ driver


def run_worker(flag_name, args, full, cpu=None, background=False, barrier=None):
  pin = cpu is not None and shutil.which('taskset')  # Without taskset: not pinned.
  cmd = (['taskset', '-c', str(cpu)] if pin else []) + [
    sys.executable,
    '-m',
    'benchmarks.study_speed',
    '--_worker',
    flag_name,
    '--steps',
    str(args.steps),
    '--vmap',
    ','.join(map(str, args.vmap)) or 'none',
    '--methods',
    ','.join(args.methods),
    *[f'--set={field}={value!r}' for field, value in SETS.items()],
    '--networks',
    NETWORKS[0],
  ]
  if barrier:
    cmd += ['--_barrier', barrier]
  if full:
    cmd.append('--_full')
  if args.no_parts:
    cmd.append('--no-parts')
  if args.no_variants:
    cmd.append('--no-variants')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  t0 = time.perf_counter()
  if background:
    return subprocess.Popen(
      cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    ), t0
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  return _parse(proc, flag_name, t0)


def _parse(proc, flag_name, t0):
  stdout = getattr(proc, 'stdout_text', None) or proc.stdout
  stderr = getattr(proc, 'stderr_text', None) or proc.stderr
  out = step_benchmark.worker_result(stdout)
  if proc.returncode or out is None:
    tail = (stderr or '')[-1500:]
    print(f'  worker {flag_name} failed ({proc.returncode}): {tail}', flush=True)
    return dict(flags=flag_name, error=tail)
  out['wall_s'] = time.perf_counter() - t0
  out['load_after'] = os.getloadavg()
  return out


def concurrency(args, flag_name, peak):
  """Throughput of K runs at once, each pinned to one core (taskset), vs one process on all
  cores: the multi-run alternative to intra-op threading on a 2-core machine."""
  out = {}
  single = run_worker(flag_name, args, False, cpu=0)
  single['flags'] = f'{flag_name} 1 process on 1 core'
  print_table(single, peak)
  out['one_core'] = single
  folder = tempfile.mkdtemp(prefix='study_speed_barrier_')
  barrier = f'{folder},{args.concurrent}'
  procs = [
    run_worker(flag_name, args, False, cpu=i, background=True, barrier=barrier)
    for i in range(args.concurrent)
  ]
  results = []
  for i, (p, t0) in enumerate(procs):
    stdout, stderr = p.communicate()
    p.stdout_text, p.stderr_text = stdout, stderr
    r = _parse(p, flag_name, t0)
    if 'error' not in r:
      r['flags'] = f'{flag_name} {args.concurrent} processes, #{i} on core {i}'
      print_table(r, peak)
    results.append(r)
  shutil.rmtree(folder, ignore_errors=True)
  out['concurrent'] = results
  return out


def runs_per_hour(results, conc, vmap):
  """Prints study runs per hour (configs/study.py STEPS cmedl steps each) from the median cmedl
  step times: one process, one on 1 core and K at once (each process's rate, summed), and
  jax.vmap over S seeds in one process. Compile, validation and data are not counted."""
  from configs import study

  rate = lambda step_s, runs=1: runs * 3600.0 / (study.STEPS * step_s)
  cmedl = lambda res: {r['name']: r for r in res.get('items', [])}.get('cmedl')
  print(
    f'\n== study runs per hour at {study.STEPS} steps (configs/study.py; cmedl train steps only: '
    'compile, validation and data excluded)'
  )
  for res in results[:1]:
    if cmedl(res):
      print(f'runs/hour 1 process: {rate(cmedl(res)["step_s"]):.1f}')
    for r in res.get('items', []):
      if r['group'] == 'vmap':
        seeds = r['slices'] // study_config().train.global_batch_size
        print(
          f'runs/hour jax.vmap x{seeds} seeds (1 process): {rate(r["step_s"], seeds):.1f} '
          f'({1e3 * r["step_s"]:.1f} ms per step of all {seeds})'
        )
  if conc:
    one = cmedl(conc['one_core'])
    if one:
      print(f'runs/hour 1 process on 1 core: {rate(one["step_s"]):.1f}')
    each = [cmedl(r) for r in conc['concurrent']]
    if each and all(each):
      rates = [rate(e['step_s']) for e in each]
      ms = ', '.join(f'{1e3 * e["step_s"]:.1f}' for e in each)
      print(
        f'runs/hour {len(each)} processes at once: {sum(rates):.1f} '
        f'(each {", ".join(f"{x:.1f}" for x in rates)}; ms per step {ms})'
      )
    else:
      print(f'runs/hour {len(each)} processes at once: a worker failed')


def print_table(res, peak):
  print(
    f'\n== flags {res["flags"]}: XLA_FLAGS={res["xla_flags"]!r} (worker {res["wall_s"]:.0f} s, '
    f'load after {res["load_after"][0]:.2f})'
  )
  hdr = (
    f'{"item":48s} {"ms":>8s} {"min ms":>8s} {"GFLOP":>7s} {"GFLOP/s":>8s} {"%peak":>6s} '
    f'{"slices/s":>9s} {"compile s":>9s}'
  )
  print(hdr)
  print('-' * len(hdr))
  for r in res['items']:
    sl = f'{r["slices_s"]:9.1f}' if r['slices_s'] else ' ' * 9
    print(
      f'{r["name"]:48s} {1e3 * r["step_s"]:8.1f} {1e3 * min(r["times"]):8.1f} '
      f'{r["flops"] / 1e9:7.2f} {r["gflops_s"]:8.1f} {100 * r["gflops_s"] / peak:5.0f}% {sl} '
      f'{r["compile_s"]:9.1f}'
    )


def _parser():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=15, help='timed calls per item (median)')
  ap.add_argument('--flags', default=DEFAULT_FLAGS, help=f'named flag sets: {", ".join(FLAG_SETS)}')
  ap.add_argument('--vmap', default='2,4', help="seed counts for the vmap figure ('none': skip)")
  ap.add_argument('--no-parts', action='store_true', help='skip the per-part breakdown')
  ap.add_argument('--no-variants', action='store_true', help='skip the code variants')
  ap.add_argument('--no-full', action='store_true', help='baseline worker: steps only')
  ap.add_argument('--repeat', type=int, default=1, help='run the flag sweep this many times')
  ap.add_argument('--out', default=None, help='write all results as JSON here')
  ap.add_argument(
    '--concurrent',
    type=int,
    default=0,
    help='also run this many steps-only workers at once, one per core (taskset)',
  )
  ap.add_argument(
    '--profile',
    action='store_true',
    help='instead: per-HLO-op thunk times of one step (first of --flags)',
  )
  ap.add_argument('--profile-method', default='cmedl', help='cmedl | student_only')
  ap.add_argument('--methods', default='cmedl,student_only', help='step items: cmedl,student_only')
  ap.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='override a study config field, e.g. data.image_size=32 (repeatable)',
  )
  ap.add_argument('--no-peak', action='store_true', help='skip the matmul peak (no %%peak)')
  ap.add_argument('--networks', default='study', choices=('study', 'tiny'), help='network sizes')
  ap.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
  ap.add_argument('--_full', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--_barrier', default=None, help=argparse.SUPPRESS)
  return ap


def _profile(args):
  """Runs --profile's worker and prints its per-opcode and slowest-instruction times."""
  cmd = [
    sys.executable,
    '-m',
    'benchmarks.study_speed',
    '--_worker',
    args.flags.split(',')[0],
    '--steps',
    str(args.steps),
    '--profile',
    '--profile-method',
    args.profile_method,
  ]
  proc = subprocess.run(
    cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  )
  res = step_benchmark.worker_result(proc.stdout)
  if res is None:
    sys.exit(proc.stderr[-3000:])
  print(
    f'profile of {res["method"]} under {res["xla_flags"]!r}: wall {res["wall_ms"]:.1f} ms/step, '
    f'thunks traced {res["traced_ms"]:.1f} ms/step ({res["n_traced"]} of {res["n_instructions"]} '
    f'instructions seen); trace lines {res["lines"]}'
  )
  print(f'{"opcode":40s} {"ms/step":>8s} {"count":>6s}')
  for op, (ms, n) in res['by_opcode'].items():
    print(f'{op:40s} {ms:8.2f} {n:6d}')
  print('top instructions:')
  for t in res['top']:
    print(f'  {t["ms"]:7.2f} ms  {t["op"]:22s} {t["hlo"][:200]}')
  if args.out:
    with open(args.out, 'w') as fh:
      json.dump(res, fh, indent=1)


def _print_peak(args):
  """The matmul peak ({'numpy', 'jax'} GFLOP/s, None with --no-peak) and the one used (nan)."""
  if args.no_peak:
    return None, float('nan')
  peak = step_benchmark.matmul_peak()
  peak_gflops = max(peak.values())
  print(
    f'float32 matmul peak (4096^3, best of 3): numpy {peak["numpy"]:.0f}, '
    f'jax {peak["jax"]:.0f} GFLOP/s; using {peak_gflops:.0f}',
    flush=True,
  )
  return peak, peak_gflops


def _sweep(flags, args, peak_gflops):
  """One worker per flag set, --repeat times; the first (full unless --no-full) also times the
  variants, parts and vmap items. Prints each worker's table."""
  results = []
  for rep in range(args.repeat):
    for f in flags:
      full = f == flags[0] and rep == 0 and not args.no_full
      res = run_worker(f, args, full)
      res['repeat'] = rep
      results.append(res)
      if 'error' not in res:
        print_table(res, peak_gflops)
        sys.stdout.flush()
  return results


def _print_summary(results, methods):
  print('\n== summary (median ms per step; cmedl / student_only)')
  for res in results:
    if 'error' in res:
      print(f'  {res["flags"]:18s} ERROR')
      continue
    by = {r['name']: r for r in res['items']}
    print(
      f'  {res["flags"]:18s} rep {res["repeat"]}: '
      + '  '.join(f'{m} {1e3 * by[m]["step_s"]:7.1f}' for m in methods if m in by)
    )


def _parse_args(ap, argv):
  """The parsed options, with --vmap and --methods as lists and --set/--networks applied."""
  args = ap.parse_args(argv)
  args.vmap = [] if args.vmap in ('', 'none') else [int(s) for s in args.vmap.split(',')]
  args.methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  NETWORKS[0] = args.networks
  for item in args.set:
    field, _, value = item.partition('=')
    try:
      SETS[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      SETS[field] = value
  return args


def main(argv=None):
  ap = _parser()
  args = _parse_args(ap, argv)
  if args._worker:
    args.flag_name = args._worker
    args.xla_flags_exact = FLAG_SETS[args._worker]
    args.full = args._full
    if args.profile:
      profile_worker(args)
    else:
      worker(args)
    return
  if args.profile:
    _profile(args)
    return
  flags = [f.strip() for f in args.flags.split(',') if f.strip()]
  for f in flags:
    if f not in FLAG_SETS:
      ap.error(f'--flags: unknown {f!r}; known: {", ".join(FLAG_SETS)}')
  print(
    f'{os.cpu_count()} cpus, load average {os.getloadavg()}, {args.steps} timed calls per item, '
    f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}'
  )
  peak, peak_gflops = _print_peak(args)
  results = _sweep(flags, args, peak_gflops)
  conc = concurrency(args, flags[0], peak_gflops) if args.concurrent else None
  _print_summary(results, args.methods)
  if conc or args.vmap:
    runs_per_hour(results, conc, args.vmap)
  peak2 = None
  if not args.no_peak:
    peak2 = step_benchmark.matmul_peak()
    print(
      f'matmul peak again at the end: numpy {peak2["numpy"]:.0f}, jax {peak2["jax"]:.0f} GFLOP/s'
    )
  if args.out:
    with open(args.out, 'w') as fh:
      json.dump(dict(peak=peak, peak_end=peak2, results=results, concurrency=conc), fh, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
