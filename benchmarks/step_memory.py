r"""XLA's memory for the default config's train step (U-Net + CycleGAN), compiled only.

  python -m benchmarks.step_memory [--size 256] [--batch 1] [--remat]

Prints one 'RESULT <json>' line: the compiled step's argument, output, temporary and aliased
bytes (buffer assignment), the generator-side forward pass's residuals (what JAX keeps for its
backward pass, parameters included, counted before XLA optimises) and the generator parameters'
bytes. benchmarks/performance.py's memory table runs it once per (size, batch, remat).
"""

from __future__ import annotations

import argparse
import functools

from benchmarks import train_step as step_benchmark


def step_memory(size, batch, remat):
  """{'size', 'batch', 'remat', 'argument', 'output', 'temp', 'alias', 'residual',
  'generator_params'}: bytes of the step at size x size, batch `batch`."""
  import jax
  import numpy as np

  from cmedl_jax import method, train_state, train_step as ts
  from configs import cmedl

  config = cmedl.get_config('unet,cyclegan')
  config.data.image_size, config.train.global_batch_size = size, batch
  config.model.remat = remat
  nets = method.build_networks(config, in_channels=1)
  state = jax.eval_shape(
    lambda r: train_state.create_train_state(config, nets, r, (size, size, 1))[0],
    jax.random.PRNGKey(0),
  )
  tx = train_state.make_optimizer(config)
  img = jax.ShapeDtypeStruct((batch, size, size, 1), 'float32')
  lab = jax.ShapeDtypeStruct((batch, size, size), 'int32')
  has = jax.ShapeDtypeStruct((batch,), 'float32')
  b = {'image': img, 'label': lab, 'has_label': has}
  compiled = (
    jax.jit(functools.partial(ts.train_step, config=config, nets=nets, tx=tx), donate_argnums=0)
    .lower(state, b, b)
    .compile()
  )
  m = compiled.memory_analysis()
  # What JAX keeps from the generator-side forward pass for its backward pass (the VJP's
  # residuals, parameters included): the activation memory an accelerator has to hold.
  g = {k: v for k, v in state.params.items() if k not in method.DISCRIMINATORS}
  d = {k: v for k, v in state.params.items() if k in method.DISCRIMINATORS}

  def residuals(g, d, stats, src, tgt):
    loss = lambda p: ts.generator_losses(
      p, d, stats, config, nets, src, tgt, jax.random.PRNGKey(0)
    )[0]
    return jax.tree.leaves(jax.vjp(loss, g)[1])

  leaves = jax.eval_shape(residuals, g, d, state.batch_stats, b, b)
  nbytes = lambda arrays: sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)
  return dict(
    size=size,
    batch=batch,
    remat=remat,
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    temp=m.temp_size_in_bytes,
    alias=m.alias_size_in_bytes,
    residual=nbytes(leaves),
    generator_params=nbytes(jax.tree.leaves(g)),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--remat', action='store_true', help='nn.remat around the blocks')
  args = ap.parse_args(argv)
  step_benchmark.print_result(step_memory(args.size, args.batch, args.remat))


if __name__ == '__main__':
  main()
