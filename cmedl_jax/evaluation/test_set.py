"""A trained run's final model on a test set: predictions and their per-case/per-tumour metrics.

  record = test_set.predict_and_evaluate(workdir, dataset_dir, out_dir)

dataset_dir is a dataset folder (imagesTs/, labelsTs/, dataset.json; phantom sets also
phantom_meta/ and instancesTs/, which give each reference tumour its type).
"""

from __future__ import annotations

import json
import os

import numpy as np

from cmedl_jax.evaluation import cases
from data_prep import nifti_io


def tumor_types(dataset_dir, case, ref):
  """Type ('peripheral' | 'juxta_mediastinal') of each reference component, in the order of
  metrics.evaluate_tumors (raster order of the 26-connected components of `ref`); None when
  the dataset has no phantom ground truth for `case`."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  meta_path = f'{dataset_dir}/phantom_meta/{case}.json'
  inst_path = f'{dataset_dir}/instancesTs/{case}.nii.gz'
  if not (os.path.isfile(meta_path) and os.path.isfile(inst_path)):
    return None
  with open(meta_path) as f:
    kinds = {t['instance_id']: t['type'] for t in json.load(f).get('tumors', [])}
  instances, _, _ = cases.load_nifti(inst_path)
  comps, _ = ndimage.label(ref > 0, np.ones((3,) * ref.ndim, bool))
  out = []
  for k, sl in enumerate(ndimage.find_objects(comps), start=1):
    ids = instances[sl][comps[sl] == k]
    ids = ids[ids > 0]
    out.append(kinds.get(int(np.bincount(ids).argmax()), 'unknown') if ids.size else 'unknown')
  return out


def _add_tumor_types(dataset_dir, refs, tumor_rows):
  """Sets each tumour row's 'type' (tumor_types; 'unknown' without ground truth)."""
  for case in refs:
    ref, _, _ = cases.load_nifti(refs[case])
    types = tumor_types(dataset_dir, case, ref)
    for t in tumor_rows:
      if t['case'] == case:
        t['type'] = types[t['tumor'] - 1] if types else 'unknown'


def predict_and_evaluate(workdir, dataset_dir, out_dir, name=None, teacher=False):
  """Predicts DATASET/imagesTs with the run's final model into out_dir and evaluates it against
  DATASET/labelsTs. teacher: the run's teacher segments its translator's output (CMEDL).

  Returns {'run': name, 'case_rows', 'tumor_rows' (with 'type' on thorax sets), 'predictions',
  'reference'}; raises RuntimeError when a prediction fails.
  """
  from cmedl_jax import inference, predict  # pylint: disable=g-import-not-at-top

  name = name or os.path.basename(os.path.normpath(workdir))
  predictor = inference.Predictor(workdir=workdir, teacher=teacher)
  inputs = predict.list_inputs(f'{dataset_dir}/imagesTs')
  result = predict.predict_files(predictor, inputs, out_dir, overwrite=True, progress=False)
  if result['failed']:
    raise RuntimeError(f'{name}: prediction failed: {result["failed"]}')
  classes = cases.parse_classes(f'{dataset_dir}/dataset.json')
  refs = nifti_io.list_cases(f'{dataset_dir}/labelsTs')
  preds = {c: f'{out_dir}/{c}.nii.gz' for c in refs}
  thorax = 'tumor' in classes
  case_rows, tumor_rows = cases.evaluate_method(
    name,
    preds,
    refs,
    classes,
    cases.DEFAULT_TOLERANCE_MM,
    tumor_classes=['tumor'] if thorax else [],
  )
  if thorax:
    _add_tumor_types(dataset_dir, refs, tumor_rows)
  return {
    'run': name,
    'case_rows': case_rows,
    'tumor_rows': tumor_rows,
    'predictions': out_dir,
    'reference': f'{dataset_dir}/labelsTs',
  }
