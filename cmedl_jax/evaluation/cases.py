"""Prediction and reference label files, matched by case and compared: rows of metrics.

Files follow `data_prep.nifti_io` (case id: the file name without `.nii.gz` / `.nii`).
Prediction and reference of a case must have the same shape and affine (within
`nifti_io.AFFINE_ATOL_MM`); voxel spacing comes from the reference header (zooms, mm), in
array axis order. A row is a dict: method, case, class and the metrics of
`metrics.METRIC_NAMES` (per case), or of one reference connected component (per tumor).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from cmedl_jax.evaluation import metrics
from data_prep import nifti_io

DEFAULT_TOLERANCE_MM = 2.0  # Surface Dice tolerance, mm.


def load_nifti(path: str, labels: bool = True):
  """(array, spacing_mm per array axis, affine 4x4) of a 2D or 3D NIfTI file.

  labels=True: the array must hold integers (stored as int or float) and is returned
  as an integer array. A trailing singleton 4th axis is dropped.
  """
  img, data = nifti_io.read_nifti(path, 'label' if labels else 'image', ndims=(2, 3))
  # NIfTI stores zooms as float32 (0.8 -> 0.800000011920929); take the shortest decimal
  # that float32 value stands for, so that a distance equal to a tolerance given in mm
  # (e.g. 0.8 mm = one voxel) is not pushed above it.
  spacing = tuple(
    float(np.format_float_positional(np.float32(z), unique=True))
    for z in img.header.get_zooms()[: data.ndim]
  )
  if labels:
    data = _integer_labels(data, path)
  return data, spacing, np.asarray(img.affine, np.float64)


def _integer_labels(data, path):
  """Label array as uint8 (all labels < 256) or int32; DataError if non-integer or < 0."""
  if not np.issubdtype(data.dtype, np.integer):
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
      raise nifti_io.DataError(path, 'label volume holds non-integer values')
    data = rounded
  lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
  if lo < 0:
    raise nifti_io.DataError(path, f'negative label {lo}')
  return data.astype(np.uint8 if hi < 256 else np.int32)


def check_same_grid(path_a: str, shape_a, affine_a, path_b: str, shape_b, affine_b) -> None:
  """Raises ValueError naming both files if their shapes or affines differ."""
  if tuple(shape_a) != tuple(shape_b):
    raise ValueError(
      f'shape mismatch: {path_a} has {tuple(shape_a)}, {path_b} has {tuple(shape_b)}'
    )
  if not np.allclose(affine_a, affine_b, atol=nifti_io.AFFINE_ATOL_MM, rtol=0):
    raise ValueError(
      f'affine mismatch (> {nifti_io.AFFINE_ATOL_MM}): {path_a} vs {path_b}:\n'
      f'{np.round(affine_a, 4)}\nvs\n{np.round(affine_b, 4)}'
    )


def parse_classes(spec) -> dict[str, int] | None:
  """Classes {name: label} from None, a dict, a dataset.json path or 'a=1,b=2'."""
  if spec is None or isinstance(spec, Mapping):
    return None if spec is None else {str(k): int(v) for k, v in spec.items()}
  spec = str(spec)
  if os.path.isfile(spec):
    with open(spec, encoding='utf-8') as f:
      table = json.load(f).get('labels')
    if not isinstance(table, Mapping) or not table:
      raise ValueError(f"{spec}: no 'labels' table")
    classes = {}
    for key, value in table.items():
      if str(key).isdigit():  # MSD: {"1": "tumor"}
        name, label = str(value), int(key)
      elif isinstance(value, (int, str)) and str(value).isdigit():  # nnU-Net v2
        name, label = str(key), int(value)
      else:
        raise ValueError(
          f'{spec}: label {key!r}: {value!r} is not a single integer label '
          f'(region-based labels are not supported)'
        )
      if label != 0:
        classes[name] = label
    return classes
  classes = {}
  for item in spec.split(','):
    name, sep, label = item.partition('=')
    if not sep or not label.strip().isdigit():
      raise ValueError(f'--classes: expected a dataset.json path or name=label,..., got {spec!r}')
    classes[name.strip()] = int(label)
  return classes


def classes_present(ref_files: Mapping[str, str], folder: str) -> dict[str, int]:
  """{'label_<k>': k} of every nonzero label in the reference files, ascending.

  Raises ValueError (naming `folder`) when there is none.
  """
  present = set()
  for path in ref_files.values():
    present |= set(np.unique(load_nifti(path)[0]).tolist())
  classes = {f'label_{k}': int(k) for k in sorted(present - {0})}
  if not classes:
    raise ValueError(f'no foreground label in any reference of {folder}; pass --classes')
  return classes


def match_cases(method: str, pred_files: Mapping[str, str], ref_files: Mapping[str, str]) -> None:
  """Every reference case needs a prediction (else ValueError); extra ones get a warning."""
  missing = sorted(set(ref_files) - set(pred_files))
  if missing:
    raise ValueError(
      f'{method}: no prediction for {len(missing)} reference case(s): '
      f'{", ".join(missing[:10])}{" ..." if len(missing) > 10 else ""}'
    )
  extra = sorted(set(pred_files) - set(ref_files))
  if extra:
    print(
      f'warning: {method}: {len(extra)} prediction(s) without reference ignored: '
      f'{", ".join(extra[:10])}',
      file=sys.stderr,
    )


def _warn_unknown_labels(path: str, volume, classes: Mapping[str, int]) -> None:
  """Warns (stderr) about labels of `volume` that are neither 0 nor one of `classes`."""
  unknown = sorted(set(np.unique(volume).tolist()) - {0} - set(classes.values()))
  if unknown:
    print(
      f'warning: {path}: labels {unknown} are not among the evaluated classes '
      f'{dict(classes)}; their {int(np.isin(volume, unknown).sum())} voxels count as '
      'background',
      file=sys.stderr,
    )


def _read_case(pred_path: str, ref_path: str, classes: Mapping[str, int]):
  """(prediction, reference, spacing_mm) of one case, on one grid; warns of unknown labels."""
  ref, spacing, ref_affine = load_nifti(ref_path)
  pred, _, pred_affine = load_nifti(pred_path)
  check_same_grid(pred_path, pred.shape, pred_affine, ref_path, ref.shape, ref_affine)
  for path, volume in ((pred_path, pred), (ref_path, ref)):
    _warn_unknown_labels(path, volume, classes)
  return pred, ref, spacing


def _tumor_rows(
  method: str,
  cid: str,
  name: str,
  pred_mask,
  ref_mask,
  spacing,
  tolerance_mm: float,
  connectivity: int | None,
) -> list[dict]:
  """Rows of the reference components of one class; centroid (voxels) in one column an axis."""
  rows = []
  for t in metrics.evaluate_tumors(pred_mask, ref_mask, spacing, tolerance_mm, connectivity):
    centroid = t.pop('centroid_vox')
    t.update({f'centroid_vox_{a}': round(c, 2) for a, c in enumerate(centroid)})
    rows.append({'method': method, 'case': cid, 'class': name, **t})
  return rows


def evaluate_method(
  method: str,
  pred_files: Mapping[str, str],
  ref_files: Mapping[str, str],
  classes: Mapping[str, int],
  tolerance_mm: float,
  connectivity: int | None = None,
  tumor_classes: Sequence[str] | None = None,
):
  """(case rows, tumor rows) of one prediction set against the reference set."""
  match_cases(method, pred_files, ref_files)
  tumor_classes = list(classes) if tumor_classes is None else list(tumor_classes)
  case_rows, tumor_rows = [], []
  for cid in sorted(ref_files):
    pred, ref, spacing = _read_case(pred_files[cid], ref_files[cid], classes)
    per_class = metrics.evaluate_case(pred, ref, spacing, classes, tolerance_mm)
    for name, label in classes.items():
      row = {'method': method, 'case': cid, 'class': name, **per_class[name]}
      row['n_fp_components'] = metrics.count_false_positive_components(
        pred == label, ref == label, connectivity
      )
      case_rows.append(row)
      if name in tumor_classes:
        tumor_rows += _tumor_rows(
          method, cid, name, pred == label, ref == label, spacing, tolerance_mm, connectivity
        )
  return case_rows, tumor_rows


def rater_agreement(
  rater_files: Mapping[str, Mapping[str, str]],
  pred_sets: Mapping[str, Mapping[str, str]],
  classes: Mapping[str, int],
  tolerance_mm: float,
) -> list[dict]:
  """Rows of pairwise metrics between raters and of each prediction set vs each rater.

  rater_files: {rater name: {case: path}}; only cases every rater labelled are used.
  Row "a" is the compared segmentation, "b" the one used as reference.
  """
  cases = sorted(set.intersection(*(set(f) for f in rater_files.values())))
  rows = []
  for cid in cases:
    loaded = {r: load_nifti(files[cid]) for r, files in rater_files.items()}
    first = next(iter(rater_files))
    for r in rater_files:
      check_same_grid(
        rater_files[r][cid],
        loaded[r][0].shape,
        loaded[r][2],
        rater_files[first][cid],
        loaded[first][0].shape,
        loaded[first][2],
      )
    pairs = list(itertools.combinations(rater_files, 2))
    for method, files in pred_sets.items():
      if cid in files:
        loaded[method] = load_nifti(files[cid])
        check_same_grid(
          files[cid],
          loaded[method][0].shape,
          loaded[method][2],
          rater_files[first][cid],
          loaded[first][0].shape,
          loaded[first][2],
        )
        pairs += [(method, r) for r in rater_files]
    for a, b in pairs:
      per_class = metrics.evaluate_case(
        loaded[a][0], loaded[b][0], loaded[b][1], classes, tolerance_mm
      )
      for name in classes:
        rows.append(
          {
            'a': a,
            'b': b,
            'pair': f'{a} vs {b}',
            'case': cid,
            'class': name,
            **{m: per_class[name][m] for m in metrics.METRIC_NAMES},
          }
        )
  return rows
