r"""Prepares an MSD / nnU-Net NIfTI dataset into fixed-size 2D-slice arrays for training.

For every case: load image and label (nibabel) and check they agree; reorient to the canonical
grid; normalise intensity by modality; resample in-plane to `spacing_mm` (image linear or cubic,
label nearest; the slice axis is kept); crop/pad in-plane to `size` around the body; remap labels
through a table. The `Geometry` of each case is kept so predictions can be written back onto the
original grid (`invert_labels`, `invert_image`).

Output (`out_dir`, written to a hidden sibling temp folder and renamed when complete):

  prepared.json                 manifest, written last: spec, classes, splits, per-case geometry
  {train,validation,test}/
    images.npy   float32 [N, H, W] in [-1, 1]      (N = all slices of the split's cases)
    labels.npy   uint8   [N, H, W] class indices   (zeros where a split has no labels)
    case_index.npy int32 [N]  index into the split's case list in prepared.json
    slice_index.npy int32 [N] z index of the slice in its case
    has_foreground.npy bool [N]
  tfds/prepared_slices/VERSION/  the train split's slices as a TFDS dataset (ArrayRecord;
                                 data_prep.tfds_builder): what training reads, through grain

A folder without `prepared.json` is never complete; `ensure_prepared` prepares one unless it
is there already (and checks it then). Usage:

  python -m data_prep.prepare --dataset RAW_DIR --out OUT_DIR --modality ct \
      [--spacing 1.5] [--size 256] [--ct-window -1000 500] [--label-map tumor=1 ...] \
      [--skip-bad] [--val-fraction 0.2] [--seed 0] [--overwrite] [--tfds]

(--tfds: also the validation and test slices and the volumes as TFDS datasets.)

Defaults, chosen for thorax: CT window [-1000, 500] HU (air..soft tissue and cancellous bone;
lung parenchyma and the mediastinum both stay inside the window); MRI percentiles 0.5 / 99.5
over the whole volume; 1.5 mm in-plane spacing, 256 x 256 (a 384 mm field of view).
Body (for centring the crop): CT voxels above -500 HU; MRI voxels above 10% of the percentile
window; a pixel belongs to the body box when it is body in >= 10% of the slices. When the
resampled image fits into `size` it is centred whole (nothing is lost); otherwise the window is
centred on the body box and kept inside the image.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from typing import Mapping, Optional

import numpy as np
from scipy import ndimage

from data_prep import geometry as geo
from data_prep import files
from data_prep import nifti_io
from data_prep.geometry import Geometry, invert_image, invert_labels  # re-exported
from data_prep.manifest import (
  ARRAYS,
  FORMAT,
  FORMAT_VERSION,
  MANIFEST,
  SPLITS,  # re-exported
  is_prepared,
  read_manifest,
)
from data_prep.nifti_io import DataError

# Defaults, chosen for thorax (module doc); configs/default.py's data section uses these.
CT_WINDOW_HU = (-1000.0, 500.0)  # HU mapped to [-1, 1].
MRI_PERCENTILES = (0.5, 99.5)  # Per-volume percentiles mapped to [-1, 1].
SPACING_MM = 1.5  # In-plane spacing, mm.
IMAGE_SIZE = 256  # In-plane size, pixels (square).
VAL_FRACTION = 0.2  # Fraction of the imagesTr cases held out for validation.
# Whole-field-of-view prediction rounds its in-plane size up to a multiple of this: fewer
# distinct shapes to compile, and a multiple of every segmenter's total down-sampling.
WHOLE_FOV_MULTIPLE = 32

__all__ = [
  'PrepSpec',
  'Geometry',
  'DataError',
  'prepare_volume',
  'prepare_label',
  'invert_labels',
  'invert_image',
  'normalize_intensity',
  'resolve_label_map',
  'prepare_dataset',
  'read_manifest',
  'is_prepared',
  'ensure_prepared',
]


@dataclasses.dataclass(frozen=True, eq=True)
class PrepSpec:
  """How to prepare one dataset.

  Attributes:
    modality: "ct" (HU window) or "mri" (percentile window).
    spacing_mm: prepared in-plane spacing (row, col), mm.
    size: prepared in-plane size (H, W), pixels.
    ct_window_hu: (low, high) HU clipped and scaled to [-1, 1].
    mri_percentiles: (low, high) percentiles clipped and scaled to [-1, 1].
    label_map: {source label name | int value: class index}; declared labels not listed become
      background 0. None: declared values are mapped in order to 0..K-1.
    interpolation: "linear" or "cubic" (image); labels are always nearest.
    body_threshold_hu: CT body threshold (HU); body_threshold_mri: MRI body threshold as a
      fraction of the percentile window.
  """

  modality: str = 'ct'
  spacing_mm: tuple = (SPACING_MM, SPACING_MM)
  size: tuple = (IMAGE_SIZE, IMAGE_SIZE)
  ct_window_hu: tuple = CT_WINDOW_HU
  mri_percentiles: tuple = MRI_PERCENTILES
  label_map: Optional[Mapping] = None
  interpolation: str = 'linear'
  body_threshold_hu: float = -500.0
  body_threshold_mri: float = 0.1

  def __post_init__(self):
    def pair(x):
      x = tuple(x) if isinstance(x, (tuple, list, np.ndarray)) else (x, x)
      if len(x) != 2:
        raise ValueError(f'expected a pair, got {x}')
      return x

    object.__setattr__(self, 'modality', str(self.modality).lower())
    object.__setattr__(self, 'spacing_mm', tuple(float(v) for v in pair(self.spacing_mm)))
    object.__setattr__(self, 'size', tuple(int(v) for v in pair(self.size)))
    object.__setattr__(self, 'ct_window_hu', tuple(float(v) for v in self.ct_window_hu))
    object.__setattr__(self, 'mri_percentiles', tuple(float(v) for v in self.mri_percentiles))
    if self.label_map is not None:
      object.__setattr__(self, 'label_map', dict(self.label_map))
    if self.modality not in ('ct', 'mri'):
      raise ValueError(f"modality must be 'ct' or 'mri', got {self.modality!r}")
    if self.interpolation not in ('linear', 'cubic'):
      raise ValueError(f"interpolation must be 'linear' or 'cubic', got {self.interpolation!r}")
    if not min(self.spacing_mm) > 0:
      raise ValueError(f'spacing must be > 0 mm, got {self.spacing_mm}')
    if min(self.size) <= 0:
      raise ValueError(f'size must be >= 1 pixel, got {self.size}')
    lo, hi = self.ct_window_hu
    plo, phi = self.mri_percentiles
    if not (lo < hi and 0 <= plo < phi <= 100):
      raise ValueError(f'bad windows: ct {self.ct_window_hu}, mri {self.mri_percentiles}')

  def __hash__(self):
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['spacing_mm'], d['size'] = list(self.spacing_mm), list(self.size)
    d['ct_window_hu'], d['mri_percentiles'] = list(self.ct_window_hu), list(self.mri_percentiles)
    if self.label_map is not None:
      d['label_map'] = {str(k): int(v) for k, v in self.label_map.items()}
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> 'PrepSpec':
    return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

  @property
  def order(self) -> int:
    return 1 if self.interpolation == 'linear' else 3


# ---------------------------------------------------------------------------------------------
# Intensity and labels.


def intensity_window(image: np.ndarray, spec: PrepSpec) -> tuple:
  """(low, high) raw intensities mapped to -1 and 1 for this volume."""
  if spec.modality == 'ct':
    return spec.ct_window_hu
  lo, hi = np.percentile(image, spec.mri_percentiles)
  if not hi > lo:
    hi = lo + 1.0  # constant image: everything maps to -1
  return float(lo), float(hi)


# CT in HU holds air (about -1000 HU) in any scan of a body; magnitude MRI is >= 0.
CT_AIR_CEILING_HU = -500.0
MRI_FLOOR = -100.0


def modality_mismatch(image: np.ndarray, spec: PrepSpec) -> Optional[str]:
  """Why `image` [X,Y,Z] does not look like the modality `spec` prepares, or None."""
  lowest = float(np.percentile(image, 1))
  if spec.modality == 'ct' and lowest > CT_AIR_CEILING_HU:
    return (
      f'1 % of its voxels are below {lowest:.0f}, but CT in HU has air near -1000 HU: '
      'is this CT? The model was trained on CT'
    )
  if spec.modality == 'mri' and lowest < MRI_FLOOR:
    return (
      f'1 % of its voxels are below {lowest:.0f} (like CT in HU): is this MRI? The model '
      'was trained on MRI'
    )
  return None


def normalize_intensity(image: np.ndarray, window) -> np.ndarray:
  """Clips to window (low, high) and scales linearly to [-1, 1]; float32."""
  lo, hi = float(window[0]), float(window[1])
  out = np.clip(image.astype(np.float32), lo, hi)
  return ((out - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def resolve_label_map(declared: Mapping[int, str], label_map: Optional[Mapping], where='label_map'):
  """Builds the source-value -> class lookup.

  Args:
    declared: {value: name} from dataset.json.
    label_map: {name | value | "value": class}; None maps declared values in order to 0..K-1.
  Returns:
    (lut: {source value: class}, class_names: list of K names, class 0 first).
  """
  declared = {int(k): str(v) for k, v in declared.items()}
  if not label_map:
    lut = {v: c for c, v in enumerate(sorted(declared))}
    return lut, [declared[v] for v in sorted(declared)]
  by_name = {n: v for v, n in declared.items()}
  by_lower = {n.lower(): v for v, n in declared.items()}
  lut = {v: 0 for v in declared}
  names = {0: ['background']}
  for key, cls in label_map.items():
    cls = int(cls)
    if not 0 <= cls <= 255:
      raise DataError(where, f'class index {cls} for {key!r} is outside 0..255')
    if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.strip().isdigit()):
      value = int(key)
      if value not in declared:
        raise DataError(where, f'label value {value} is not declared (declared: {declared})')
    elif key in by_name or str(key).lower() in by_lower:
      value = by_name.get(key, by_lower.get(str(key).lower()))
    else:
      raise DataError(
        where,
        f'label {key!r} is not declared in dataset.json (declared: {sorted(declared.values())})',
      )
    lut[value] = cls
    if cls:
      names.setdefault(cls, []).append(declared[value])
  num_classes = max(lut.values()) + 1
  class_names = ['+'.join(names.get(c, [f'class_{c}'])) for c in range(num_classes)]
  return lut, class_names


def apply_label_map(label: np.ndarray, lut: Mapping[int, int]) -> np.ndarray:
  """Maps declared source values through `lut` (values must all be declared); uint8."""
  table = np.zeros(max(lut) + 1, np.uint8)
  for value, cls in lut.items():
    table[value] = cls
  return table[label]


# ---------------------------------------------------------------------------------------------
# One volume.


def prepare_volume(image: np.ndarray, affine: np.ndarray, spec: PrepSpec, whole_fov=False):
  """Prepares one image volume.

  Args:
    image: [X, Y, Z] raw intensities (HU for CT), any orientation.
    affine: its 4x4 voxel -> world (mm) affine.
    spec: PrepSpec.
    whole_fov: keep the whole in-plane field of view (for prediction): the size grows from
      `spec.size` to cover the resampled image, rounded up to WHOLE_FOV_MULTIPLE pixels.
  Returns:
    (prepared float32 [Z, H, W] in [-1, 1], Geometry).
  """
  prepared, geometry, _ = _prepare_volume(image, affine, spec, whole_fov)
  return prepared, geometry


def _prepare_volume(image, affine, spec: PrepSpec, whole_fov=False):
  """prepare_volume's (prepared, geometry) and the body mask, bool [Z, Y, X] canonical."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'image must be 3D, got shape {image.shape}')
  if not np.all(np.isfinite(image)):
    raise ValueError('image has NaN/Inf voxels')
  window = intensity_window(image, spec)
  normalized = normalize_intensity(image, window)
  canonical = np.ascontiguousarray(geo.to_canonical(normalized, affine)[0].transpose(2, 1, 0))
  if spec.modality == 'ct':
    lo, hi = spec.ct_window_hu
    body_level = (spec.body_threshold_hu - lo) * 2.0 / (hi - lo) - 1.0
  else:
    body_level = 2.0 * spec.body_threshold_mri - 1.0
  body = canonical > body_level
  geometry = geo.make_geometry(
    affine,
    image.shape,
    spec.spacing_mm,
    spec.size,
    body_mask_canonical=body,
    whole_fov_multiple=WHOLE_FOV_MULTIPLE if whole_fov else 0,
  )
  prepared = geo.resample_image(canonical, geometry, spec.order, fill_value=-1.0)
  np.clip(prepared, -1.0, 1.0, out=prepared)
  return prepared, geometry, body


def prepare_label(label: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Original-grid class indices (already remapped) -> prepared uint8 [Z, H, W] (nearest)."""
  geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_dict(geometry)
  return geo.resample_labels(geo.canonical_zyx(np.asarray(label), geometry), geometry)


def prepare_case(
  case: nifti_io.CaseFiles,
  spec: PrepSpec,
  declared,
  lut,
  spacing_range_mm=nifti_io.SPACING_RANGE_MM,
):
  """Loads, checks and prepares one case.

  Returns (image, label or None, Geometry, cut): cut = None, or what the in-plane crop took
  away: {"fov_fraction": fraction of the in-plane field of view, "body_fraction": fraction of
  the body's voxels (above the body threshold, speckles opened away), "label_voxels": labelled
  (non-background) voxels}, counted on the original grid.
  """
  image, affine = nifti_io.load_volume(case.image, 'image', spacing_range_mm)
  label = None
  if case.label is not None:
    raw_label, label_affine = nifti_io.load_volume(case.label, 'label')
    nifti_io.check_pair(image, affine, raw_label, label_affine, case.label)
    nifti_io.check_label_values(raw_label, declared, case.label)
    label = apply_label_map(raw_label, lut)
  prepared, geometry, body = _prepare_volume(image, affine, spec)
  prepared_label = prepare_label(label, geometry) if label is not None else None
  return prepared, prepared_label, geometry, _cut_away(label, body, geometry)


def _cut_away(label, body, geometry: Geometry):
  """What the crop took away (prepare_case's `cut`), or None when it took nothing."""
  outside = geo.outside_window(geometry)
  if not outside.any():
    return None
  lost = 0 if label is None else int((geo.canonical_zyx(label, geometry)[:, outside] > 0).sum())
  # Speckles (MRI noise in air above the body threshold: ~11 % of the phantoms' air voxels)
  # are not body: an in-plane 3x3 opening removes them and keeps the body.
  body = ndimage.binary_opening(body, np.ones((1, 3, 3), bool))
  return {
    'fov_fraction': round(float(outside.mean()), 4),
    'body_fraction': round(float(body[:, outside].sum() / max(int(body.sum()), 1)), 4),
    'label_voxels': lost,
  }


# ---------------------------------------------------------------------------------------------
# Whole dataset.


def assign_splits(case_ids, val_fraction: float, seed: int) -> dict:
  """Deterministic train/validation split of sorted case ids for `seed`."""
  ids = sorted(case_ids)
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  n_val = int(round(val_fraction * len(ids)))
  if val_fraction > 0 and len(ids) >= 2:
    n_val = min(max(n_val, 1), len(ids) - 1)
  order = np.random.default_rng(seed).permutation(len(ids))
  val = {ids[i] for i in order[:n_val]}
  return {'train': [i for i in ids if i not in val], 'validation': [i for i in ids if i in val]}


def _progress(iterable, total, enabled):
  if not enabled:
    return iterable
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    return iterable
  return tqdm(iterable, total=total, desc='preparing', unit='case')


def _read_raw_dataset(raw_dir) -> nifti_io.DatasetInfo:
  """`read_dataset`, and its training cases are either all labelled or all unlabelled."""
  info = nifti_io.read_dataset(raw_dir)
  if not info.training:
    raise DataError(
      raw_dir, "empty dataset: no training cases (imagesTr/ or dataset.json 'training')"
    )
  unlabelled = [c.case_id for c in info.training if c.label is None]
  if unlabelled and len(unlabelled) < len(info.training):
    # A split is labelled or not: unlabelled cases would train as all background.
    raise DataError(
      raw_dir,
      f'{len(unlabelled)} of {len(info.training)} training cases have '
      f'no label (e.g. {unlabelled[:3]}); label them or remove them',
    )
  return info


def _assign_all_splits(info, splits, val_fraction: float, seed: int) -> dict:
  """{split: [case id]}: train / validation as given or drawn, test = the test cases."""
  train_ids = [c.case_id for c in info.training]
  if splits is None:
    assignment = assign_splits(train_ids, val_fraction, seed)
  else:
    assignment = {
      'train': list(splits.get('train', [])),
      'validation': list(splits.get('validation', [])),
    }
    unknown = set(assignment['train'] + assignment['validation']) - set(train_ids)
    if unknown:
      raise ValueError(f'splits name cases not in imagesTr: {sorted(unknown)}')
  assignment['test'] = [c.case_id for c in info.test]
  return assignment


def _sibling(out_dir: str, kind: str) -> str:
  """A fresh hidden sibling of `out_dir`: `.OUT.{kind}-{pid}-{8 hex}` (kind partial or old)."""
  name = f'.{os.path.basename(out_dir)}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  return os.path.join(os.path.dirname(out_dir), name)


def _case_record(case: nifti_io.CaseFiles, image, label, geometry: Geometry, cut) -> dict:
  """The manifest entry of one prepared case (image [Z,H,W], label [Z,H,W] or None; cut as
  prepare_case returns it)."""
  return {
    'case_id': case.case_id,
    'image_file': case.image,
    'label_file': case.label,
    'has_label': label is not None,
    'num_slices': int(image.shape[0]),
    'foreground_slices': int((label.reshape(label.shape[0], -1).max(1) > 0).sum())
    if label is not None
    else 0,
    'spacing_mm': list(geometry.spacing_mm),
    'geometry': geometry.to_dict(),
    'cut_away': cut,
  }


def _prepare_cases(
  cases, split_of: dict, prepare_one, case_dir: str, skip_bad: bool, progress: bool
):
  """Prepares each case into `case_dir` ({id}_image.npy, {id}_label.npy).

  Returns ({split: [case record]}, [skipped case]); `prepare_one(case)` -> prepare_case's
  (image, label, geometry, cut).
  """
  records = {s: [] for s in SPLITS}
  skipped = []
  for case in _progress(cases, len(cases), progress):
    try:
      image, label, geometry, cut = prepare_one(case)
    except DataError as e:
      if not skip_bad:
        raise
      logging.warning('skipping case %s: %s', case.case_id, e)
      skipped.append({'case_id': case.case_id, 'file': e.path, 'problem': e.problem})
      continue
    stem = os.path.join(case_dir, case.case_id)
    np.save(stem + '_image.npy', image)
    if label is not None:
      np.save(stem + '_label.npy', label)
    records[split_of[case.case_id]].append(_case_record(case, image, label, geometry, cut))
  return records, skipped


def _check_usable(raw_dir, assignment: dict, records: dict, skipped: list) -> None:
  """DataError when no case, or no train / validation case of an assigned split, is left."""
  if not any(records.values()):
    raise DataError(raw_dir, f'empty dataset: no usable cases ({len(skipped)} skipped)')
  for split in ('train', 'validation'):
    if assignment[split] and not records[split]:
      raise DataError(
        raw_dir,
        f'every {split} case was skipped as bad '
        f'({", ".join(sorted(assignment[split])[:5])}); fix or '
        'remove them',
      )


def _new_array(path: str, dtype, shape):
  """A .npy of `shape` memory-mapped for writing; an in-memory array when it is empty."""
  if shape[0]:
    return np.lib.format.open_memmap(path, 'w+', dtype, shape)
  return np.zeros(shape, dtype)


def _write_split(split_dir: str, case_dir: str, records: list, size) -> None:
  """Concatenates a split's prepared cases into its arrays (see the module doc).

  Sets each record's "offset" (its first row). size: (H, W) pixels.
  """
  os.makedirs(split_dir)
  path = {name: os.path.join(split_dir, f'{name}.npy') for name in ARRAYS}
  n = sum(r['num_slices'] for r in records)
  images = _new_array(path['images'], np.float32, (n,) + tuple(size))
  labels = _new_array(path['labels'], np.uint8, (n,) + tuple(size))
  case_index, slice_index = np.zeros(n, np.int32), np.zeros(n, np.int32)
  has_fg = np.zeros(n, bool)
  offset = 0
  for k, r in enumerate(records):
    stem, m = os.path.join(case_dir, r['case_id']), r['num_slices']
    images[offset : offset + m] = np.load(stem + '_image.npy')
    if r['has_label']:
      lab = np.load(stem + '_label.npy')
      labels[offset : offset + m] = lab
      has_fg[offset : offset + m] = lab.reshape(m, -1).max(1) > 0
    case_index[offset : offset + m] = k
    slice_index[offset : offset + m] = np.arange(m)
    r['offset'] = offset
    offset += m
  if n:
    images.flush()
    labels.flush()
  else:
    files.save_npy(path['images'], images)
    files.save_npy(path['labels'], labels)
  files.save_npy(path['case_index'], case_index)
  files.save_npy(path['slice_index'], slice_index)
  files.save_npy(path['has_foreground'], has_fg)


def _summary(
  info, out_dir: str, class_names: list, records: dict, skipped: list, seconds: float, size
) -> dict:
  """What `prepare_dataset` returns (and the manifest keeps under "summary")."""
  n_cases = sum(len(r) for r in records.values())
  return {
    'dataset': info.name,
    'modality': info.modality,
    'raw_dir': os.path.abspath(info.root),
    'out_dir': out_dir,
    'num_classes': len(class_names),
    'class_names': class_names,
    'cases': {s: len(records[s]) for s in SPLITS},
    'slices': {s: sum(r['num_slices'] for r in records[s]) for s in SPLITS},
    'foreground_slices': {s: sum(r['foreground_slices'] for r in records[s]) for s in SPLITS},
    'skipped': skipped,
    'cropped': _cropped(records, size),
    'seconds': round(seconds, 3),
    'seconds_per_case': round(seconds / max(n_cases, 1), 3),
  }


def _cropped(records: dict, size) -> dict:
  """How many cases the in-plane crop to `size` (H, W) cut into (body or labels), the largest
  fraction of a body it took and the labelled voxels it took (summed). A crop of air only is
  not counted."""
  cuts = [r['cut_away'] for rs in records.values() for r in rs if r.get('cut_away')]
  cuts = [c for c in cuts if c['body_fraction'] > 0 or c['label_voxels'] > 0]
  return {
    'size': list(size),
    'cases': len(cuts),
    'max_body_fraction': max((c['body_fraction'] for c in cuts), default=0.0),
    'label_voxels': sum(c['label_voxels'] for c in cuts),
  }


def crop_warning(summary: dict) -> Optional[str]:
  """One line saying that the crop cut into the body or labels of prepared cases, or None."""
  cropped = summary.get('cropped') or {}
  if not cropped.get('cases'):
    return None
  n_cases, (h, w) = sum(summary['cases'].values()), cropped['size']
  return (
    f'the {h}x{w} crop cut into the body of {cropped["cases"]} of {n_cases} cases (up to '
    f'{100 * cropped["max_body_fraction"]:.1f}% of its voxels, {cropped["label_voxels"]} '
    'labelled voxels in all): training never sees what was cut; prediction still covers the '
    'whole field of view. A larger data.size (or spacing_mm) keeps it.'
  )


def _manifest(
  spec: PrepSpec, info, lut: dict, class_names: list, records: dict, summary: dict
) -> dict:
  """The content of prepared.json."""
  return {
    'format': FORMAT,
    'version': FORMAT_VERSION,
    'spec': spec.to_dict(),
    'dataset': {
      'name': info.name,
      'modality': info.modality,
      'raw_dir': summary['raw_dir'],
      'labels': {str(k): v for k, v in info.labels.items()},
    },
    'label_lut': {str(k): v for k, v in lut.items()},
    'num_classes': len(class_names),
    'class_names': class_names,
    'channels': 1,
    'size': list(spec.size),
    'in_plane_spacing_mm': list(spec.spacing_mm),
    'splits': records,
    'summary': summary,
  }


def _finish(tmp_dir: str, manifest: dict, has_train: bool) -> None:
  """Writes the manifest and the training format: the train slices as a TFDS dataset."""
  files.write_json(os.path.join(tmp_dir, MANIFEST), manifest, indent=1)
  if has_train:
    from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

    tfds_builder.build(tmp_dir, volumes=False, splits=('train',), progress=False)


def _move_into_place(tmp_dir: str, out_dir: str) -> None:
  """Renames the complete `tmp_dir` to `out_dir`; an old `out_dir` is swapped out, then deleted."""
  if os.path.exists(out_dir):
    trash = _sibling(out_dir, 'old')
    os.rename(out_dir, trash)
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.rename(tmp_dir, out_dir)


def _make_partial(out_dir, overwrite):
  """(out_dir absolute, its hidden partial sibling, the partial's _cases folder), created."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir}: already exists (use overwrite=True / --overwrite)')
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp_dir = _sibling(out_dir, 'partial')
  case_dir = os.path.join(tmp_dir, '_cases')
  os.makedirs(case_dir)
  return out_dir, tmp_dir, case_dir


def prepare_dataset(
  raw_dir,
  out_dir,
  spec: PrepSpec,
  skip_bad: bool = False,
  splits=None,
  val_fraction: float = VAL_FRACTION,
  seed: int = 0,
  overwrite: bool = False,
  progress: bool = True,
  spacing_range_mm=nifti_io.SPACING_RANGE_MM,
) -> dict:
  """Prepares every case of a raw dataset folder into `out_dir` (atomically).

  Args:
    raw_dir: MSD / nnU-Net dataset folder.
    out_dir: output folder; must not exist unless `overwrite`.
    spec: PrepSpec.
    skip_bad: skip cases that fail with DataError (warning, listed in the summary) instead of
      stopping.
    splits: optional {"train": [case ids], "validation": [case ids]} for the imagesTr cases;
      default: a `val_fraction` split drawn with `seed`. Test = imagesTs.
    spacing_range_mm: (min, max) plausible voxel spacing; a case outside is a DataError.
  Returns:
    Summary dict (also stored in the manifest under "summary").
  Raises:
    DataError naming the file and the problem.
  """
  start_time = time.time()
  spec = spec if isinstance(spec, PrepSpec) else PrepSpec.from_dict(spec)
  remove_stale_partials(out_dir)
  info = _read_raw_dataset(raw_dir)
  where = f'label_map for {os.path.join(raw_dir, "dataset.json")}'
  lut, class_names = resolve_label_map(info.labels, spec.label_map, where=where)
  assignment = _assign_all_splits(info, splits, val_fraction, seed)
  split_of = {cid: s for s, ids in assignment.items() for cid in ids}
  cases = [c for c in info.training + info.test if c.case_id in split_of]
  out_dir, tmp_dir, case_dir = _make_partial(out_dir, overwrite)

  def prepare_one(case):
    return prepare_case(case, spec, info.labels, lut, spacing_range_mm)

  try:
    records, skipped = _prepare_cases(cases, split_of, prepare_one, case_dir, skip_bad, progress)
    _check_usable(raw_dir, assignment, records, skipped)
    for split, split_records in records.items():
      _write_split(os.path.join(tmp_dir, split), case_dir, split_records, spec.size)
    shutil.rmtree(case_dir)
    seconds = time.time() - start_time
    summary = _summary(info, out_dir, class_names, records, skipped, seconds, spec.size)
    manifest = _manifest(spec, info, lut, class_names, records, summary)
    _finish(tmp_dir, manifest, bool(records.get('train')))
    _move_into_place(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  warning = crop_warning(summary)
  if warning:
    logging.warning('%s: %s', raw_dir, warning)
  return summary


def remove_stale_partials(out_dir) -> list:
  """Deletes the .OUT.partial-* / .OUT.old-* folders killed preparations of `out_dir` left.

  Names hold the writer's pid: only those of a pid not running here, older than a minute
  (names of older versions, without a pid: older than a day). Returns the deleted paths.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  name = re.escape(os.path.basename(out_dir))
  return files.remove_stale_temporaries(
    os.path.dirname(out_dir), rf'\.{name}\.(partial|old)-((?P<pid>\d+)-)?[0-9a-f]{{8}}'
  )


class PreparedDirError(ValueError):
  """A prepared folder that is not the one asked for: another spec, another raw folder, or an
  incomplete one (no prepared.json)."""


def ensure_prepared(
  raw_dir, prepared_dir, spec: PrepSpec, *, val_fraction, seed, where, missing_error=None
) -> None:
  """Prepares `raw_dir` into `prepared_dir` with `spec` unless that is done already.

  A prepared folder is checked (made with `spec` from `raw_dir`, else PreparedDirError) and
  given its TFDS training slices if it predates them. An exclusive flock on the folder above
  `prepared_dir` is held meanwhile: callers started together prepare once, the others wait.
  where: the caller's name of the pair in messages (`{where}.raw_dir`, `{where}.prepared_dir`,
  e.g. 'data.source'). missing_error: when given, a folder not prepared yet is
  FileNotFoundError('{prepared_dir}: {missing_error}') instead of being prepared.
  """
  with _preparation_lock(prepared_dir):
    if is_prepared(prepared_dir):
      _check_prepared(raw_dir, prepared_dir, spec, where)
      _build_training_slices(prepared_dir)
      return
    if missing_error is not None:
      raise FileNotFoundError(f'{prepared_dir}: {missing_error}')
    if os.path.exists(prepared_dir):
      raise PreparedDirError(
        f'{prepared_dir} exists but is not a complete prepared dataset (no prepared.json); '
        f'delete it to prepare {where}.raw_dir there, or point {where}.prepared_dir elsewhere'
      )
    side = where.rpartition('.')[2]  # 'data.source' -> 'source'
    logging.info('Preparing %s dataset %s -> %s', side, raw_dir, prepared_dir)
    prepare_dataset(raw_dir, prepared_dir, spec, val_fraction=val_fraction, seed=seed)


@contextlib.contextmanager
def _preparation_lock(prepared_dir):
  """An exclusive flock on the folder that holds `prepared_dir` (no file left behind)."""
  parent = os.path.dirname(os.path.abspath(prepared_dir))
  os.makedirs(parent, exist_ok=True)
  fd = os.open(parent, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _build_training_slices(prepared_dir):
  """Builds the TFDS training slices of a folder prepared before they were part of it."""
  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(os.path.join(tfds_builder.slices_dir(prepared_dir), 'dataset_info.json')):
    logging.info('Building the TFDS training slices of %s', prepared_dir)
    tfds_builder.build(prepared_dir, volumes=False, splits=('train',), progress=False)


def _check_prepared(raw_dir, prepared_dir, spec, where):
  """PreparedDirError unless `prepared_dir` was made from `raw_dir` with `spec`."""
  manifest = read_manifest(prepared_dir)
  found = PrepSpec.from_dict(manifest['spec'])
  if found != spec:
    raise PreparedDirError(
      f'{prepared_dir} was prepared with {found.to_dict()}, but the config asks for '
      f'{spec.to_dict()}; point {where}.prepared_dir elsewhere or delete it'
    )
  made_from = manifest['dataset'].get('raw_dir')
  if made_from and os.path.realpath(made_from) != os.path.realpath(raw_dir):
    raise PreparedDirError(
      f'{prepared_dir} was prepared from {made_from}, but {where}.raw_dir is '
      f'{os.path.abspath(raw_dir)}; point {where}.prepared_dir elsewhere or delete '
      'it (it is prepared again at the next start)'
    )


# ---------------------------------------------------------------------------------------------
# CLI.


def parse_label_map(items, where='--label-map'):
  """['NAME=CLASS' or 'VALUE=CLASS', ...] -> {name or value: class}; None when empty."""
  if not items:
    return None
  out = {}
  for item in items:
    key, _, value = item.strip().rpartition('=')
    if not key or not value.strip().lstrip('-').isdigit():
      raise DataError(where, f'expects NAME=CLASS (CLASS an integer), got {item!r}')
    out[key.strip()] = int(value)
  return out


def format_summary(summary: dict) -> str:
  lines = [
    f'prepared {summary["dataset"]} ({summary["modality"]}) -> {summary["out_dir"]}',
    f'  classes ({summary["num_classes"]}): {", ".join(summary["class_names"])}',
  ]
  for s in SPLITS:
    lines.append(
      f'  {s:<10} {summary["cases"][s]:5d} cases {summary["slices"][s]:7d} slices '
      f'({summary["foreground_slices"][s]} with foreground)'
    )
  lines.append(f'  {summary["seconds"]:.1f} s ({summary["seconds_per_case"]:.2f} s/case)')
  warning = crop_warning(summary)
  if warning:
    lines.append(f'  warning: {warning}')
  if summary['skipped']:
    lines.append(f'  skipped {len(summary["skipped"])} bad cases:')
    lines += [f'    {s["case_id"]}: {s["file"]}: {s["problem"]}' for s in summary['skipped']]
  return '\n'.join(lines)


def _parser():
  p = argparse.ArgumentParser(
    prog='python -m data_prep.prepare', description=__doc__.split('\n')[0]
  )
  p.add_argument('--dataset', required=True, help='raw MSD / nnU-Net dataset folder')
  p.add_argument('--out', required=True, help='output folder (prepared dataset)')
  p.add_argument('--modality', required=True, choices=('ct', 'mri'))
  p.add_argument(
    '--spacing', type=float, nargs='+', default=[SPACING_MM], help='in-plane mm (1 or 2)'
  )
  p.add_argument('--size', type=int, nargs='+', default=[IMAGE_SIZE], help='in-plane size (1 or 2)')
  p.add_argument('--ct-window', type=float, nargs=2, default=list(CT_WINDOW_HU))
  p.add_argument('--mri-percentiles', type=float, nargs=2, default=list(MRI_PERCENTILES))
  p.add_argument('--label-map', nargs='*', help='NAME=CLASS or VALUE=CLASS, e.g. tumor=1')
  p.add_argument('--interpolation', choices=('linear', 'cubic'), default=PrepSpec.interpolation)
  p.add_argument('--skip-bad', action='store_true', help='skip bad cases with a warning')
  p.add_argument(
    '--spacing-range',
    type=float,
    nargs=2,
    default=list(nifti_io.SPACING_RANGE_MM),
    metavar=('MIN', 'MAX'),
    help='plausible voxel spacing of the inputs, mm',
  )
  p.add_argument('--val-fraction', type=float, default=VAL_FRACTION)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--overwrite', action='store_true')
  p.add_argument('--no-progress', action='store_true')
  p.add_argument(
    '--tfds',
    action='store_true',
    help='also build the validation and test slices and all volumes as TFDS datasets into '
    'OUT/tfds (data_prep.tfds_builder; the train slices are always built)',
  )
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  for flag in ('spacing', 'size'):
    if len(getattr(args, flag)) > 2:
      print(f'error: --{flag} takes 1 or 2 values, got {getattr(args, flag)}', file=sys.stderr)
      return 2
  try:
    spec = PrepSpec(
      modality=args.modality,
      spacing_mm=tuple(args.spacing * (3 - len(args.spacing)))[:2],
      size=tuple(args.size * (3 - len(args.size)))[:2],
      ct_window_hu=tuple(args.ct_window),
      mri_percentiles=tuple(args.mri_percentiles),
      label_map=parse_label_map(args.label_map),
      interpolation=args.interpolation,
    )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    summary = prepare_dataset(
      args.dataset,
      args.out,
      spec,
      skip_bad=args.skip_bad,
      val_fraction=args.val_fraction,
      seed=args.seed,
      overwrite=args.overwrite,
      progress=not args.no_progress,
      spacing_range_mm=tuple(args.spacing_range),
    )
  except (DataError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except OSError as e:
    message = files.disk_full(e)
    if message is None:
      raise
    print(f'error: {message}', file=sys.stderr)
    return 1
  print(format_summary(summary))
  if args.tfds:
    from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

    for name, builder in tfds_builder.build(args.out).items():
      print(f'TFDS {name}: {builder.data_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
