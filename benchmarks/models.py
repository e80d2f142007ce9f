"""Forward+backward time of each network at 256x256 (not a test).

For each network and batch size: one jitted step = loss (sum of squared outputs) and its
gradient with respect to all parameters (segmenters in train mode, batch statistics
updated); reports the median wall time of `--repeats` runs after one warm-up, XLA's FLOP
count of the step (train_step.py's compile_counted) and the achieved GFLOP/s.
`--variants` adds the CycleGAN generator with the direct XLA formulations
(`lax.conv_transpose`, `jnp.pad(mode="reflect")`) to compare with the defaults.

  python -m benchmarks.models [--batches 1,4] [--repeats 3] [--networks unet,...] [--variants]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import train_step as step_benchmark
from cmedl_jax import models

SIZE = 256
NUM_CLASSES = 2


def _networks(variants: bool):
  nets = {
    'unet': ('seg', models.get_segmenter({'name': 'unet', 'num_classes': NUM_CLASSES})),
    'densefcn103': (
      'seg',
      models.get_segmenter({'name': 'densefcn', 'num_classes': NUM_CLASSES, 'variant': 103}),
    ),
    'pspnet': ('seg', models.get_segmenter({'name': 'pspnet', 'num_classes': NUM_CLASSES})),
    'resnet_gen': ('gen', models.get_translator({'name': 'cyclegan'})),
    'patchgan': ('gen', models.get_discriminator({})),
  }
  if variants:
    nets['resnet_gen[xla convT, jnp.pad]'] = (
      'gen',
      models.ResnetGenerator(upsample_impl='xla', pad_impl='jnp'),
    )
    nets['resnet_gen[xla convT, concat pad]'] = (
      'gen',
      models.ResnetGenerator(upsample_impl='xla', pad_impl='concat'),
    )
    nets['resnet_gen[subpixel, jnp.pad]'] = (
      'gen',
      models.ResnetGenerator(upsample_impl='subpixel', pad_impl='jnp'),
    )
  return nets


def _step_fn(kind, net):
  if kind == 'seg':

    def loss(params, batch_stats, x):
      (logits, _), new = net.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits**2), new

    def step(variables, x):
      (value, new), grads = jax.value_and_grad(loss, has_aux=True)(
        variables['params'], variables['batch_stats'], x
      )
      return value, grads, new
  else:

    def step(variables, x):
      return jax.value_and_grad(lambda p: jnp.sum(net.apply({'params': p}, x) ** 2))(
        variables['params']
      )

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', default='1,4')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--networks', default='', help='comma-separated subset of names')
  parser.add_argument(
    '--variants', action='store_true', help="also time the generator's direct formulations"
  )
  args = parser.parse_args(argv)
  nets = _networks(args.variants)
  if args.networks:
    nets = {
      k: v
      for k, v in nets.items()
      if k in args.networks.split(',') or k.startswith(tuple(args.networks.split(',')))
    }
  print(
    f'jax {jax.__version__}, {jax.devices()[0].platform}, float32, {SIZE}x{SIZE}, 1 input channel'
  )
  print(f'| network | batch | fwd+bwd ms (median of {args.repeats}) | GFLOP/step (XLA) | GFLOP/s |')
  print('|---|---|---|---|---|')
  for name, (kind, net) in nets.items():
    for batch in [int(b) for b in args.batches.split(',')]:
      x = jnp.zeros((batch, SIZE, SIZE, 1), jnp.float32) + 0.1
      init_key = jax.random.key(0, impl='rbg')  # fast to compile on XLA:CPU
      if kind == 'seg':
        variables = jax.jit(lambda t: net.init(init_key, t, train=False))(x[:1])
      else:
        variables = jax.jit(lambda t: net.init(init_key, t))(x[:1])
      compiled, flops = step_benchmark.compile_counted(
        jax.jit(_step_fn(kind, net)).lower(variables, x)
      )
      gflop = flops / 1e9
      jax.block_until_ready(compiled(variables, x))
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - start)
      ms = 1e3 * statistics.median(times)
      print(f'| {name} | {batch} | {ms:.0f} | {gflop:.1f} | {gflop / (ms / 1e3):.1f} |', flush=True)


if __name__ == '__main__':
  main()
