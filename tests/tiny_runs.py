"""Tiny CMEDL trainings for the tests: phantom data, the tiny config pointed at it, and the
trainer run as a subprocess (`python -m cmedl_jax.main`), optionally interrupted.

All tiny runs train NUM_STEPS steps: the step count is part of the learning-rate schedule, so
one count means one compiled step, shared through the session's compilation cache.
"""

import io
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.util import tensor_util

from cmedl_jax import checkpoint
from configs import tiny
from data_prep import phantoms

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8


def write_phantoms(root, n, seed, slices):
  """ROOT/raw/thorax_ct and ROOT/raw/thorax_t2w: n training + 1 test case, 48x48 at 8 mm."""
  for kind in ('thorax_ct', 'thorax_t2w'):
    phantoms.write_dataset(
      kind, n, seed, root / 'raw' / kind, n_test=1, size=48, spacing=8.0, slices=slices
    )


def overrides(root, **train_fields):
  """(field, value) pairs of the tiny config that point it at `root` and set train fields."""
  fields = {
    'data.spacing_mm': 12.0,
    'data.source.raw_dir': root / 'raw' / 'thorax_ct',
    'data.source.prepared_dir': root / 'prepared' / 'thorax_ct',
    'data.target.raw_dir': root / 'raw' / 'thorax_t2w',
    'data.target.prepared_dir': root / 'prepared' / 'thorax_t2w',
    'train.num_steps': NUM_STEPS,
    'train.checkpoint_every': 3,
    'train.eval_every': 4,
    'train.image_every': 4,
    'train.log_every': 2,
  }
  fields.update({f'train.{k}': v for k, v in train_fields.items()})
  return fields


def small_config(root, **train_fields):
  config = tiny.get_config('unet,cyclegan')
  for field, value in overrides(root, **train_fields).items():
    *parents, leaf = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value if not isinstance(value, pathlib.Path) else str(value)
  return config


# A `python -m cmedl_jax.main` that kills or interrupts itself: SIGNAL when the training loop
# asks for the batch of step STEP (after STEP steps have run), or, with SAVE as the signal,
# SIGKILL while orbax saves checkpoint STEP: its files written, its rename not yet done.
_INTERRUPTING_MAIN = """
import os, signal, sys
from absl import app
from cmedl_jax import input_pipeline, main
how, at_step = sys.argv.pop(1), int(sys.argv.pop(1))
if how == 'SAVE':
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize_or_die(self):
    final = self.get_final()
    if final.name == str(at_step) and final.parent.name == 'checkpoints':
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
else:
  sig = getattr(signal, how)
  create = input_pipeline.create_train_iterator
  def create_interrupting(*args, **kwargs):
    it, step = create(*args, **kwargs), kwargs['start_step']
    class Interrupting:
      def __next__(self):
        nonlocal step
        if step == at_step:
          os.kill(os.getpid(), sig)
        step += 1
        return next(it)
      def close(self):
        it.close()
    return Interrupting()
  input_pipeline.create_train_iterator = create_interrupting
app.run(main.main)
"""


def run_main(root, workdir, interrupt=None, extra=()):
  """Runs the trainer in a subprocess; interrupt=(signal name or 'SAVE', step).

  The subprocess inherits the session's XLA flags and compilation cache (tests/conftest.py).
  Returns the CompletedProcess.
  """
  program = ['-m', 'cmedl_jax.main']
  if interrupt:
    program = ['-c', _INTERRUPTING_MAIN, interrupt[0], str(interrupt[1])]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(
    [sys.executable, *program, *main_args(root, workdir, extra)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


def main_args(root, workdir, extra=()):
  """Flags of `python -m cmedl_jax.main` for the tiny config on `root`, then `extra`."""
  args = [f'--config={ROOT / "configs" / "tiny.py"}:unet,cyclegan', f'--workdir={workdir}']
  return args + [f'--config.{k}={v}' for k, v in overrides(root).items()] + list(extra)


def final_state(workdir, directory='checkpoints'):
  return checkpoint.restore_state(os.path.join(workdir, directory), None)


def steps_saved(workdir, directory='checkpoints'):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, directory)) if d.isdigit())


def read_images(workdir):
  """{tag: {step: uint8 [N, H, W] (grey) or [N, H, W, C]}} of the image summaries in WORKDIR's
  event files (tensorboard's EventAccumulator, the PNGs decoded by PIL)."""
  events = event_accumulator.EventAccumulator(
    str(workdir), size_guidance={event_accumulator.TENSORS: 0}
  ).Reload()
  images = {}
  for tag in events.Tags()['tensors']:
    if events.SummaryMetadata(tag).plugin_data.plugin_name == image_metadata.PLUGIN_NAME:
      for event in events.Tensors(tag):
        pngs = tensor_util.make_ndarray(event.tensor_proto)[2:]  # After width and height.
        images.setdefault(tag, {})[event.step] = np.stack(
          [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
        )
  return images


# Python code that makes `import tensorflow` fail as where it is not installed: the path finder
# no longer finds it (importlib.util.find_spec('tensorflow') is None, as libraries check), so
# code run after it in the same process runs as without TensorFlow.
WITHOUT_TENSORFLOW = """
import importlib.machinery, sys
class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition('.')[0] == 'tensorflow':
      return None
    return super().find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _PathFinderWithoutTensorFlow
assert 'tensorflow' not in sys.modules
"""
