"""Inference: a trained network over whole volumes, sharded over all devices.

`context_stack` builds a volume's 2D(.5) inputs, `predict_volume` runs a jitted function over
them in batches split over the mesh, `Predictor` loads a run's test-time network (or its
teacher) with the run's data preparation and segments raw volumes on their own voxel grid.
The trainer's validation and the prediction CLI (`predict.py`) both use this module.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from cmedl_jax import checkpoint
from cmedl_jax import input_pipeline
from cmedl_jax import method
from cmedl_jax import postprocess
from cmedl_jax import sharding
from data_prep import geometry as geo
from data_prep import prepare


def context_stack(volume: np.ndarray, context_slices: int) -> np.ndarray:
  """Prepared volume [Z,H,W] -> [Z,H,W,k]: the k neighbouring slices (clamped) as channels."""
  if context_slices < 1 or context_slices % 2 == 0:
    raise ValueError(f'context_slices must be odd and >= 1, got {context_slices}')
  volume = np.asarray(volume, np.float32)
  half = context_slices // 2
  z = np.arange(volume.shape[0])
  nb = np.clip(z[:, None] + np.arange(-half, half + 1)[None, :], 0, volume.shape[0] - 1)
  return np.ascontiguousarray(volume[nb].transpose(0, 2, 3, 1))


def predict_volume(infer_fn, volume, batch_size, context_slices, mesh):
  """Labels [Z,H,W] uint8 and probabilities [Z,H,W,K] of a prepared volume [Z,H,W].

  infer_fn: [B,H,W,C] sharded batch -> probabilities [B,H,W,K]. Slices go in batches of
  `batch_size` (rounded up to a multiple of the mesh size; the last one zero-padded). With
  several processes every process calls this with the whole volume and gets the whole result.
  """
  slices = context_stack(volume, context_slices)
  batch_size = sharding.round_up(batch_size, mesh.size)
  data = sharding.data_sharded(mesh)
  probs = []
  for i in range(0, slices.shape[0], batch_size):
    chunk = slices[i : i + batch_size]
    n = chunk.shape[0]
    chunk = np.pad(chunk, [(0, batch_size - n), (0, 0), (0, 0), (0, 0)])
    probs.append(sharding.to_host(infer_fn(sharding.from_host(chunk, data)))[:n])
  probs = np.concatenate(probs, 0)
  return probs.argmax(-1).astype(np.uint8), probs


def mirror_axes(config):
  """Axes of [B,H,W,C] slices that training mirrored (data.augment): W for left-right flips,
  H for up-down flips."""
  augment = input_pipeline.augment_params(config.data.augment)
  if augment is None:
    return ()
  return tuple(axis for axis, key in ((2, 'flip'), (1, 'flip_ud')) if augment[key] > 0)


def mirrored_mean(probabilities, x, axes):
  """Mean of probabilities(x) over every combination of mirrorings along `axes`, each mirrored
  back (test-time augmentation, as nnU-Net's)."""
  total, count = probabilities(x), 1
  for n in range(1, len(axes) + 1):
    for combo in itertools.combinations(axes, n):
      total = total + jnp.flip(probabilities(jnp.flip(x, combo)), combo)
      count += 1
  return total if count == 1 else total / count


class Predictor:
  """A trained run's test-time network with the run's data preparation.

  Args:
    workdir: a run directory (uses WORKDIR/export); or
    checkpoint_path: a saved state (e.g. WORKDIR/best/400 or WORKDIR/checkpoints/800).
    batch_size: slices per batch (global, over all devices).
    pseudo_target: also compute the translator's output (needs a full checkpoint).
    teacher: segment with the run's teacher on the translator's output instead of the
      method's test-time network (e.g. how good a CMEDL run's teacher is); uses the latest
      checkpoint of `workdir` (or `checkpoint_path`).
    postprocessing: apply the run's post-processing chosen on validation (postprocess; the
      test-time network only), if it has one.
    tta: test-time augmentation: probabilities averaged over the mirrorings training used
      (left-right, and up-down when data.augment.flip_ud was on): 2 or 4 times the compute.
    whole_fov: segment the whole in-plane field of view (the networks are fully convolutional),
      not only the training crop of `data.size` around the body (prepare_volume's whole_fov).
  """

  def __init__(
    self,
    workdir=None,
    checkpoint_path=None,
    batch_size=None,
    pseudo_target=False,
    teacher=False,
    postprocessing=True,
    tta=False,
    whole_fov=True,
  ):
    if (workdir is None) == (checkpoint_path is None):
      raise ValueError('give exactly one of workdir and checkpoint_path')
    run_dir = workdir if workdir is not None else checkpoint.run_dir_of(checkpoint_path)
    self.config, record = checkpoint.load_run(run_dir)
    self.spec = prepare.PrepSpec.from_dict(record['spec'])
    self.test_time = method.get(self.config).test_time
    if teacher:
      u = method.parts(self.config)
      if not (u['teacher'] and u['translator']):
        raise ValueError(
          f'{run_dir}: method {self.config.method.name} has no teacher and translator'
        )
      self.test_time = method.TEACHER_ON_TRANSLATION
      checkpoint_path = checkpoint_path or checkpoint.latest_checkpoint(run_dir)
    self.postprocessing = postprocess.load(run_dir) if postprocessing and not teacher else None
    self.mirror_axes = mirror_axes(self.config) if tta else ()
    self.whole_fov = whole_fov
    self.num_classes = self.config.data.num_classes
    self.context_slices = self.config.data.context_slices
    self.batch_size = batch_size or self.config.eval.batch_size
    self.mesh = sharding.make_mesh()
    self.nets = method.build_networks(self.config, in_channels=self.context_slices)
    params, stats = load_variables(run_dir, checkpoint_path, pseudo_target)
    self.params = sharding.from_host(params, sharding.replicated(self.mesh))
    self.batch_stats = sharding.from_host(stats, sharding.replicated(self.mesh))
    nets, test_time = self.nets, self.test_time
    axes = self.mirror_axes

    def probabilities(p, s, x):
      return jax.nn.softmax(method.infer_logits(p, s, x, nets=nets, test_time=test_time), -1)

    self._probs = jax.jit(
      lambda p, s, x: mirrored_mean(functools.partial(probabilities, p, s), x, axes)
    )
    self._translate = None
    if pseudo_target:
      self._translate = jax.jit(lambda p, x: method.translate(nets, p, x))

  def predict_prepared(self, prepared):
    """Probabilities float32 [Z,H,W,K] of a prepared volume [Z,H,W] (in [-1, 1])."""
    _, probs = predict_volume(
      lambda x: self._probs(self.params, self.batch_stats, x),
      prepared,
      self.batch_size,
      self.context_slices,
      self.mesh,
    )
    return probs

  def predict_array(self, image, affine):
    """Segments one volume.

    image: [X,Y,Z] raw intensities (HU for CT) in any orientation; affine: 4x4 voxel->mm.
    Returns {'labels': uint8 [X,Y,Z], 'probabilities': float32 [X,Y,Z,K],
             'pseudo_target': float32 [X,Y,Z] (only with pseudo_target=True)} on the input grid.
    """
    prepared, geometry = prepare.prepare_volume(image, affine, self.spec, self.whole_fov)
    probs = self.predict_prepared(prepared)
    # As nnU-Net: probabilities are resampled onto the input grid (linear; outside the prepared
    # field of view, only without whole_fov, background has probability 1), and the labels are
    # their argmax there.
    probs = np.stack(
      [
        prepare.invert_image(probs[..., k], geometry, fill_value=float(k == 0))
        for k in range(probs.shape[-1])
      ],
      -1,
    ).astype(np.float32)
    labels = probs.argmax(-1).astype(np.uint8)
    if self.postprocessing:
      spacing_mm = geo.voxel_spacing(affine)
      labels = postprocess.remove_small_components(labels, spacing_mm, self.postprocessing)
    out = {'labels': labels, 'probabilities': probs}
    if self._translate is not None:
      _, fake = predict_volume(
        lambda x: self._translate(self.params, x)[..., :1],
        prepared,
        self.batch_size,
        self.context_slices,
        self.mesh,
      )
      out['pseudo_target'] = prepare.invert_image(fake[..., 0], geometry, fill_value=-1.0).astype(
        np.float32
      )
    return out


def add_run_arguments(parser):
  """The CLIs' choice of network: --workdir RUN (its inference export) or --checkpoint (a
  saved state), exactly one; `load_variables(run_dir, args.checkpoint)` reads it."""
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--workdir', help='run directory (uses its inference export)')
  which.add_argument('--checkpoint', help='a saved state, e.g. RUN/best/400')


def load_variables(run_dir, checkpoint_path=None, pseudo_target=False):
  """(params, batch_stats) from the run's export or `checkpoint_path`; with pseudo_target also
  the translator (from the latest checkpoint when the export lacks it)."""
  if checkpoint_path is None:
    variables = checkpoint.load_export(run_dir)
  else:
    variables = checkpoint.load_variables(checkpoint_path)
  params, stats = variables['params'], variables['batch_stats']
  if pseudo_target and 'translator' not in params:
    full = checkpoint.load_variables(checkpoint_path or checkpoint.latest_checkpoint(run_dir))
    if 'translator' not in full['params']:
      raise ValueError(f'{run_dir}: this method has no translator')
    params = dict(params, translator=full['params']['translator'])
  return params, stats
