r"""Prediction speed of the full-size U-Net student on one volume (untrained parameters).

  python -m benchmarks.prediction [--size 256] [--slices 128] [--batch 16]

Compiles on the first `--batch` slices, then times cmedl_jax.inference.predict_volume over a
random volume of `--slices` slices of size x size, and prints one 'RESULT <json>' line:
{'seconds', 'slices'}. benchmarks/performance.py's prediction section runs it.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import train_step as step_benchmark


def prediction_seconds(size, slices, batch):
  """Seconds of predict_volume over `slices` slices of size x size, after compiling."""
  import jax
  import numpy as np

  from cmedl_jax import inference, method, sharding, train_state
  from configs import cmedl

  config = cmedl.get_config('unet,cyclegan')
  config.data.image_size = size
  nets = method.build_networks(config, in_channels=1)
  state, _ = train_state.create_train_state(config, nets, jax.random.PRNGKey(0), (size, size, 1))
  mesh = sharding.make_mesh()
  test_time = method.get(config).test_time
  infer = jax.jit(
    lambda x: jax.nn.softmax(
      method.infer_logits(state.params, state.batch_stats, x, nets=nets, test_time=test_time), -1
    )
  )
  volume = np.random.default_rng(0).uniform(-1, 1, (slices, size, size)).astype(np.float32)
  inference.predict_volume(infer, volume[:batch], batch, 1, mesh)  # Compile.
  t0 = time.perf_counter()
  inference.predict_volume(infer, volume, batch, 1, mesh)
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--slices', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  args = ap.parse_args(argv)
  seconds = prediction_seconds(args.size, args.slices, args.batch)
  step_benchmark.print_result(dict(seconds=seconds, slices=args.slices))


if __name__ == '__main__':
  main()
