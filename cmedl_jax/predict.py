r"""Segments NIfTI volumes with a trained run and writes label NIfTIs on the input's grid.

  python -m cmedl_jax.predict --workdir=runs/demo --input=data/phantoms/thorax_ct/imagesTs \
      --output=runs/demo/predictions [--probabilities] [--pseudo-target] [--overwrite]
  python -m cmedl_jax.predict --checkpoint=runs/demo/best/400 --input=case.nii.gz --output=out

Each input goes through the same preparation as the run's training data (reorient, resample
in-plane, normalise, crop; `data_prep.prepare.prepare_volume`), the test-time network runs on
all slices in batches sharded over all devices, its class probabilities are mapped back onto
the input's voxel grid (`data_prep.geometry.invert_image`, linear) and their argmax is written
as uint8 with the input's affine and header. Optional: class probabilities (float32,
[X,Y,Z,K]), the translator's pseudo-target image, and (--teacher) the teacher's segmentation of
it. Outputs are written atomically; existing ones are kept unless --overwrite; an unreadable
input is reported and the other cases go on (exit code 1).
"""

import argparse
import glob
import json
import os
import sys

import jax
import nibabel as nib
import numpy as np
from tqdm import tqdm

from cmedl_jax import checkpoint
from cmedl_jax import input_pipeline
from cmedl_jax import sharding
from cmedl_jax import train_step as ts
from data_prep import nifti_io
from data_prep import prepare

NIFTI_ENDINGS = ('.nii.gz', '.nii')


def predict_volume(infer_fn, volume, batch_size, context_slices, mesh):
  """Labels [Z,H,W] uint8 and probabilities [Z,H,W,K] of a prepared volume [Z,H,W].

  infer_fn: [B,H,W,C] sharded batch -> probabilities [B,H,W,K]. Slices go in batches of
  `batch_size` (rounded up to a multiple of the mesh size; the last one zero-padded). With
  several processes every process calls this with the whole volume and gets the whole result.
  """
  slices = input_pipeline.context_stack(volume, context_slices)
  batch_size = sharding.round_up(batch_size, mesh.size)
  data = sharding.data_sharded(mesh)
  probs = []
  for i in range(0, slices.shape[0], batch_size):
    chunk = slices[i:i + batch_size]
    n = chunk.shape[0]
    chunk = np.pad(chunk, [(0, batch_size - n), (0, 0), (0, 0), (0, 0)])
    probs.append(sharding.to_host(infer_fn(sharding.from_host(chunk, data)))[:n])
  probs = np.concatenate(probs, 0)
  return probs.argmax(-1).astype(np.uint8), probs


def _run_dir_of(path):
  """The run directory (holding config.json) at or above `path`."""
  path = os.path.abspath(path)
  while True:
    if os.path.isfile(os.path.join(path, 'config.json')):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      raise FileNotFoundError('no config.json found at or above the checkpoint path')
    path = parent


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
  """

  def __init__(self, workdir=None, checkpoint_path=None, batch_size=None, pseudo_target=False,
               teacher=False):
    if (workdir is None) == (checkpoint_path is None):
      raise ValueError('give exactly one of workdir and checkpoint_path')
    run_dir = workdir if workdir is not None else _run_dir_of(checkpoint_path)
    for name in ('config.json', 'preparation.json'):
      if not os.path.isfile(os.path.join(run_dir, name)):
        raise FileNotFoundError(f'{run_dir}: no {name} (not a cmedl-jax run directory?)')
    self.config = checkpoint.load_config(run_dir)
    if teacher:
      parts = ts.uses(self.config)
      if not (parts['teacher'] and parts['translator']):
        raise ValueError(f'{run_dir}: method {self.config.method.name} has no teacher and '
                         'translator')
      if checkpoint_path is None:
        checkpoint_path = os.path.join(run_dir, 'checkpoints', str(self._latest_step(run_dir)))
      self.config.method.name = 'pmri_teacher'  # Test time = the teacher on G(x).
    with open(os.path.join(run_dir, 'preparation.json')) as f:
      record = json.load(f)
    self.spec = prepare.PrepSpec.from_dict(record['spec'])
    self.num_classes = self.config.data.num_classes
    self.context_slices = self.config.data.context_slices
    self.batch_size = batch_size or self.config.eval.batch_size
    self.mesh = sharding.make_mesh()
    self.nets = ts.build_networks(self.config, in_channels=self.context_slices)

    if checkpoint_path is None:
      export = checkpoint.export_dir(run_dir)
      if not os.path.isdir(export):
        raise FileNotFoundError(f'{export}: no inference export (did training finish?); '
                                'use --checkpoint with a saved state instead')
      variables = checkpoint.restore_tree(export)
      full = None
    else:
      full = checkpoint.restore_tree(checkpoint_path)
      variables = {'params': full['params'], 'batch_stats': full.get('batch_stats', {})}
    params, stats = variables['params'], variables.get('batch_stats', {})
    if pseudo_target:
      if 'translator' not in params:
        full = full or checkpoint.restore_tree(os.path.join(run_dir, 'checkpoints',
                                                  str(self._latest_step(run_dir))))
        if 'translator' not in full['params']:
          raise ValueError(f'{run_dir}: this method has no translator')
        params = dict(params, translator=full['params']['translator'])
    self.params = sharding.from_host(params, sharding.replicated(self.mesh))
    self.batch_stats = sharding.from_host(stats, sharding.replicated(self.mesh))
    config, nets = self.config, self.nets
    self._probs = jax.jit(lambda p, s, x: jax.nn.softmax(
        ts.infer_logits(p, s, x, config=config, nets=nets), -1))
    self._translate = None
    if pseudo_target:
      self._translate = jax.jit(lambda p, x: nets.translator.apply({'params': p['translator']}, x))

  @staticmethod
  def _latest_step(run_dir):
    steps = [int(d) for d in os.listdir(os.path.join(run_dir, 'checkpoints')) if d.isdigit()]
    if not steps:
      raise FileNotFoundError(f'{run_dir}/checkpoints: no checkpoint')
    return max(steps)

  def predict_array(self, image, affine):
    """Segments one volume.

    image: [X,Y,Z] raw intensities (HU for CT) in any orientation; affine: 4x4 voxel->mm.
    Returns {'labels': uint8 [X,Y,Z], 'probabilities': float32 [X,Y,Z,K],
             'pseudo_target': float32 [X,Y,Z] (only with pseudo_target=True)} on the input grid.
    """
    prepared, geometry = prepare.prepare_volume(image, affine, self.spec)
    _, probs = predict_volume(lambda x: self._probs(self.params, self.batch_stats, x),
                              prepared, self.batch_size, self.context_slices, self.mesh)
    # As nnU-Net: probabilities are resampled onto the input grid (linear; outside the prepared
    # field of view background has probability 1), and the labels are their argmax there.
    probs = np.stack([prepare.invert_image(probs[..., k], geometry, fill_value=float(k == 0))
                      for k in range(probs.shape[-1])], -1).astype(np.float32)
    out = {'labels': probs.argmax(-1).astype(np.uint8), 'probabilities': probs}
    if self._translate is not None:
      _, fake = predict_volume(lambda x: self._translate(self.params, x)[..., :1], prepared,
                               self.batch_size, self.context_slices, self.mesh)
      out['pseudo_target'] = prepare.invert_image(fake[..., 0], geometry,
                                                  fill_value=-1.0).astype(np.float32)
    return out


def case_id_of(path):
  """'x/case_0000.nii.gz' -> 'case' (nnU-Net channel suffix dropped)."""
  name = os.path.basename(path)
  for ending in NIFTI_ENDINGS:
    if name.endswith(ending):
      name = name[:-len(ending)]
      break
  return name[:-5] if name.endswith('_0000') else name


def check_unique_cases(inputs):
  """Raises ValueError naming two inputs of one case id (they would write one output)."""
  seen = {}
  for path in inputs:
    case = case_id_of(path)
    if case in seen:
      raise ValueError(f'{seen[case]} and {path} are both case {case!r} (one output '
                       f'{case}.nii.gz); rename or remove one')
    seen[case] = path


def list_inputs(path):
  """NIfTI files of a file or directory path, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such file or directory')
  files = sorted(f for ending in NIFTI_ENDINGS for f in glob.glob(os.path.join(path, '*' + ending)))
  if not files:
    raise FileNotFoundError(f'{path}: no .nii or .nii.gz files')
  return files


def save_nifti_atomic(array, reference, path, dtype):
  """Writes `array` with the affine and header of NIfTI image `reference`, atomically."""
  header = reference.header.copy()
  header.set_data_dtype(dtype)
  img = nib.Nifti1Image(np.asarray(array, dtype), reference.affine, header)
  img.header.set_slope_inter(1.0, 0.0)
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f'.tmp{os.getpid()}_{name}')
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def predict_files(predictor, inputs, output_dir, overwrite=False, probabilities=False,
                  pseudo_target=False, progress=True):
  """Predicts every input file into output_dir/{case}.nii.gz. Returns {'written', 'skipped',
  'failed': [(path, message)], 'warned': [(path, why its intensities look like another
  modality)]}."""
  check_unique_cases(inputs)
  os.makedirs(output_dir, exist_ok=True)
  # Temporaries of save_nifti_atomic left by a killed run.
  nifti_io.remove_stale_temporaries(output_dir, r'\.tmp(?P<pid>\d+)_.+\.nii(\.gz)?')
  result = {'written': [], 'skipped': [], 'failed': [], 'warned': []}
  for path in tqdm(inputs, desc='predict', unit='case', disable=not progress):
    case = case_id_of(path)
    out = os.path.join(output_dir, f'{case}.nii.gz')
    if os.path.exists(out) and not overwrite:
      result['skipped'].append(out)
      continue
    try:
      image, affine = nifti_io.load_volume(path, 'image')
      reference = nib.load(path)
      doubt = prepare.modality_mismatch(image, predictor.spec)
      if doubt:
        result['warned'].append((path, doubt))
        tqdm.write(f'warning: {path}: {doubt}', file=sys.stderr)
      pred = predictor.predict_array(image, affine)
    except (nifti_io.DataError, ValueError, OSError) as e:
      result['failed'].append((path, str(e)))
      tqdm.write(f'error: {path}: {e}', file=sys.stderr)
      continue
    if probabilities:
      save_nifti_atomic(pred['probabilities'], reference,
                        os.path.join(output_dir, f'{case}_probabilities.nii.gz'), np.float32)
    if pseudo_target:
      save_nifti_atomic(pred['pseudo_target'], reference,
                        os.path.join(output_dir, f'{case}_pseudo_target.nii.gz'), np.float32)
    save_nifti_atomic(pred['labels'], reference, out, np.uint8)
    result['written'].append(out)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m cmedl_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--workdir', help='run directory (uses its inference export)')
  which.add_argument('--checkpoint', help='a saved state, e.g. RUN/best/400')
  parser.add_argument('--input', required=True, help='a NIfTI file or a folder of them')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--batch-size', type=int, default=None, help='slices per batch')
  parser.add_argument('--probabilities', action='store_true', help='also write probabilities')
  parser.add_argument('--pseudo-target', action='store_true',
                      help="also write the translator's output (e.g. pseudo-MRI)")
  parser.add_argument('--teacher', action='store_true',
                      help="segment with the run's teacher on the translator's output (latest "
                           'checkpoint, or --checkpoint)')
  parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  args = parser.parse_args(argv)
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    parser.exit(2, f'predict: error: --output {args.output}: exists and is not a folder\n')
  try:
    inputs = list_inputs(args.input)
    check_unique_cases(inputs)
    predictor = Predictor(workdir=args.workdir, checkpoint_path=args.checkpoint,
                          batch_size=args.batch_size, pseudo_target=args.pseudo_target,
                          teacher=args.teacher)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f'predict: error: {e}\n')
  result = predict_files(predictor, inputs, args.output, overwrite=args.overwrite,
                         probabilities=args.probabilities, pseudo_target=args.pseudo_target)
  print(f"predict: {len(result['written'])} written, {len(result['skipped'])} kept "
        f"(exist; --overwrite replaces), {len(result['failed'])} failed -> {args.output}")
  for path, message in result['failed']:
    print(f'  failed: {path}: {message}')
  return 1 if result['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
