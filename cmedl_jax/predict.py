r"""Segments NIfTI volumes with a trained run and writes label NIfTIs on the input's grid.

  python -m cmedl_jax.predict --workdir=runs/demo --input=data/phantoms/thorax_ct/imagesTs \
      --output=runs/demo/predictions [--probabilities] [--pseudo-target] [--overwrite]
  python -m cmedl_jax.predict --checkpoint=runs/demo/best/400 --input=case.nii.gz --output=out

Each input goes through the same preparation as the run's training data (reorient, resample
in-plane, normalise; `data_prep.prepare.prepare_volume`) except the training crop: the whole
in-plane field of view is kept (padded to a multiple of 32 pixels), the test-time network runs on
all slices in batches sharded over all devices, its class probabilities are mapped back onto
the input's voxel grid (`data_prep.geometry.invert_image`, linear) and their argmax is written
as uint8 with the input's affine and header. Optional: class probabilities (float32,
[X,Y,Z,K]), the translator's pseudo-target image, and (--teacher) the teacher's segmentation of
it. Outputs are written atomically; existing ones are kept unless --overwrite; an unreadable
input is reported and the other cases go on (exit code 1).
"""

import argparse
import os
import sys

import nibabel as nib
import numpy as np
from tqdm import tqdm

from cmedl_jax import inference
from cmedl_jax.inference import Predictor
from data_prep import files
from data_prep import nifti_io
from data_prep import prepare


def check_unique_cases(inputs):
  """Raises ValueError naming two inputs of one case id (they would write one output)."""
  seen = {}
  for path in inputs:
    case = nifti_io.case_id(path, image=True)
    if case in seen:
      raise ValueError(
        f'{seen[case]} and {path} are both case {case!r} (one output '
        f'{case}.nii.gz); rename or remove one'
      )
    seen[case] = path


def list_inputs(path):
  """NIfTI images of a file or folder path (channel 0 of each case), sorted by case id."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such file or directory')
  return list(nifti_io.list_cases(path, image=True).values())


def predict_files(
  predictor,
  inputs,
  output_dir,
  overwrite=False,
  probabilities=False,
  pseudo_target=False,
  progress=True,
):
  """Predicts every input file into output_dir/{case}.nii.gz. Returns {'written', 'skipped',
  'failed': [(path, message)], 'warned': [(path, why its intensities look like another
  modality)]}."""
  check_unique_cases(inputs)
  os.makedirs(output_dir, exist_ok=True)
  # NIfTI temporaries of atomic writes left by a killed run.
  files.remove_stale_temporaries(output_dir, files.TEMPORARY_PATTERN + r'\.nii(\.gz)?')
  result = {'written': [], 'skipped': [], 'failed': [], 'warned': []}
  for path in tqdm(inputs, desc='predict', unit='case', disable=not progress):
    case = nifti_io.case_id(path, image=True)
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
    extras = {'probabilities': probabilities, 'pseudo_target': pseudo_target}
    for name in [name for name, wanted in extras.items() if wanted]:
      path = os.path.join(output_dir, f'{case}_{name}.nii.gz')
      nifti_io.save_nifti_like(pred[name], reference, path, np.float32)
    nifti_io.save_nifti_like(pred['labels'], reference, out, np.uint8)
    result['written'].append(out)
  return result


def _parser():
  parser = argparse.ArgumentParser(
    prog='python -m cmedl_jax.predict',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  inference.add_run_arguments(parser)
  parser.add_argument('--input', required=True, help='a NIfTI file or a folder of them')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--batch-size', type=int, default=None, help='slices per batch')
  parser.add_argument('--probabilities', action='store_true', help='also write probabilities')
  parser.add_argument(
    '--pseudo-target',
    action='store_true',
    help="also write the translator's output (e.g. pseudo-MRI)",
  )
  parser.add_argument(
    '--teacher',
    action='store_true',
    help="segment with the run's teacher on the translator's output (latest "
    'checkpoint, or --checkpoint)',
  )
  parser.add_argument(
    '--tta',
    action='store_true',
    help='test-time augmentation: average over the mirrorings training used (2x the compute)',
  )
  parser.add_argument(
    '--no-postprocessing',
    action='store_true',
    help="skip the run's post-processing chosen on validation (WORKDIR/postprocessing.json)",
  )
  parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  return parser


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    parser.exit(2, f'predict: error: --output {args.output}: exists and is not a folder\n')
  try:
    inputs = list_inputs(args.input)
    check_unique_cases(inputs)
    predictor = Predictor(
      workdir=args.workdir,
      checkpoint_path=args.checkpoint,
      batch_size=args.batch_size,
      pseudo_target=args.pseudo_target,
      teacher=args.teacher,
      postprocessing=not args.no_postprocessing,
      tta=args.tta,
    )
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f'predict: error: {e}\n')
  try:
    result = predict_files(
      predictor,
      inputs,
      args.output,
      overwrite=args.overwrite,
      probabilities=args.probabilities,
      pseudo_target=args.pseudo_target,
    )
  except OSError as e:
    message = files.disk_full(e)
    if message is None:
      raise
    parser.exit(1, f'predict: error: {message}\n')
  print(
    f'predict: {len(result["written"])} written, {len(result["skipped"])} kept '
    f'(exist; --overwrite replaces), {len(result["failed"])} failed -> {args.output}'
  )
  for path, message in result['failed']:
    print(f'  failed: {path}: {message}')
  return 1 if result['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
