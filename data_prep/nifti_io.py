"""NIfTI I/O: endings, case ids, dataset folders, reading and (atomic) writing of volumes.

Case ids (one rule, everywhere): a NIfTI file's case id is its name without `.nii.gz` / `.nii`;
an image file (not a label or prediction) may also carry nnU-Net's channel suffix `_XXXX` (four
digits), which is dropped, and of several channels only `_0000` is read.
NIfTI files are written atomically as every file (data_prep/files.py).

Dataset folders (MSD / nnU-Net v2):

A dataset folder holds `dataset.json`, `imagesTr/`, `labelsTr/`, optionally `imagesTs/` and
`labelsTs/`. Two `dataset.json` dialects are understood:

* nnU-Net v2: `channel_names` {"0": "CT"}, `labels` {"background": 0, "tumor": 1} (name -> int),
  `file_ending` ".nii.gz"; images are `imagesTr/{case}_0000.nii.gz`, labels `labelsTr/{case}...`.
* MSD: `modality` {"0": "CT"}, `labels` {"0": "background", "1": "tumor"} (int-string -> name),
  `training` [{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}], `test` [...].

Every problem raises `DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import nibabel as nib
import numpy as np

from data_prep import files

NIFTI_ENDINGS = ('.nii.gz', '.nii')
# Plausible voxel spacing of a medical volume, mm: outside it the header is wrong (units).
SPACING_RANGE_MM = (0.01, 100.0)
AFFINE_ATOL_MM = 1e-3  # image/label affines must agree to this (mm), plus 1e-5 relative.


class DataError(ValueError):
  """A dataset or case is unusable; the message names the file and the problem."""

  def __init__(self, path, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f'{path}: {problem}')


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  case_id: str
  image: str
  label: Optional[str]  # None when the split has no labels.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What `dataset.json` and the folder listing say about a raw dataset."""

  root: str
  name: str
  modality: str  # channel 0's name, e.g. "CT", "T2".
  labels: dict  # {int value: str name}, as declared.
  training: tuple  # tuple[CaseFiles], sorted by case id.
  test: tuple  # tuple[CaseFiles]; label None when there is no labelsTs.


def strip_ending(name: str, ending: Optional[str] = None) -> Optional[str]:
  """File name without its NIfTI ending (or the given one); None if it has none."""
  for e in (ending,) if ending else NIFTI_ENDINGS:
    if name.endswith(e):
      return name[: -len(e)]
  return None


_CHANNEL_SUFFIX = re.compile(r'_(\d{4})$')


def case_id(filename, image: bool = False, ending: Optional[str] = None) -> Optional[str]:
  """Case id of a NIfTI file name (None if not NIfTI): 'x/lung_001_0000.nii.gz' -> 'lung_001'
  with image=True (nnU-Net channel suffix dropped); labels and predictions keep their name."""
  stem = strip_ending(os.path.basename(os.fspath(filename)), ending)
  if stem is not None and image:
    stem = _CHANNEL_SUFFIX.sub('', stem)
  return stem


def channel_of(filename) -> int:
  """nnU-Net channel of an image file name (`_0001` -> 1); 0 without a suffix."""
  m = _CHANNEL_SUFFIX.search(strip_ending(os.path.basename(os.fspath(filename))) or '')
  return int(m.group(1)) if m else 0


def list_cases(
  directory, image: bool = False, ending: Optional[str] = None, missing_ok: bool = False
) -> dict:
  """{case id: path} of the NIfTI files in `directory`, sorted by name.

  image=True: only channel 0 of each case (`_0000`, or no suffix). Hidden files (e.g. macOS
  `._lung_001.nii.gz`) are skipped. Raises DataError for a missing folder (unless missing_ok),
  one without NIfTI files, or two files of one case.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    if missing_ok:
      return {}
    raise DataError(directory, 'folder does not exist')
  cases = {}
  for name in sorted(os.listdir(directory)):
    cid = case_id(name, image, ending)
    if cid is None or name.startswith('.') or (image and channel_of(name) != 0):
      continue
    if cid in cases:
      raise DataError(
        os.path.join(directory, name),
        f'case {cid!r} has a second {"image" if image else "file"}; the first is {cases[cid]}',
      )
    cases[cid] = os.path.join(directory, name)
  if not cases and not missing_ok:
    raise DataError(
      directory, f'no NIfTI files ({", ".join(ending and [ending] or NIFTI_ENDINGS)})'
    )
  return cases


def save_nifti_like(array, reference, path, dtype) -> None:
  """Writes `array` as NIfTI with the affine and header of nibabel image `reference`, atomically.

  The header's data type becomes `dtype`, its scaling is reset (slope 1, intercept 0).
  """
  header = reference.header.copy()
  header.set_data_dtype(dtype)
  img = nib.Nifti1Image(np.asarray(array, dtype), reference.affine, header)
  img.header.set_slope_inter(1.0, 0.0)
  tmp = files.temporary_path(path)
  try:
    nib.save(img, tmp)  # Same ending as `path`: nibabel compresses by the name.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _parse_labels(raw, path) -> dict:
  """Both directions: {"tumor": 1} (nnU-Net) and {"1": "tumor"} (MSD) -> {1: "tumor"}."""
  if not isinstance(raw, dict) or not raw:
    raise DataError(path, "'labels' must be a non-empty mapping")
  out = {}
  for key, value in raw.items():
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      out_value, name = int(value), str(key)  # nnU-Net: name -> int
    elif isinstance(value, (list, tuple)):  # nnU-Net region labels: not supported
      raise DataError(path, f'label {key!r} is a region (list of values); not supported')
    else:
      try:
        out_value, name = int(key), str(value)  # MSD: "1" -> name
      except ValueError:
        raise DataError(path, f'cannot read label entry {key!r}: {value!r}') from None
    if out_value in out:
      raise DataError(path, f'label value {out_value} declared twice')
    out[out_value] = name
  if 0 not in out:
    raise DataError(path, 'labels do not declare background value 0')
  return dict(sorted(out.items()))


def _resolve(root: str, rel, json_path: str) -> str:
  """A dataset.json path, which must stay inside the dataset folder (no absolute or ../)."""
  if not isinstance(rel, str) or not rel:
    raise DataError(json_path, f'path {rel!r} is not a file name')
  path = os.path.normpath(os.path.join(root, rel))
  if os.path.isabs(rel) or os.path.relpath(path, root).split(os.sep)[0] == os.pardir:
    raise DataError(json_path, f'path {rel!r} points outside the dataset folder')
  return path


def _label_path(folder: str, case: str, ending: Optional[str]) -> Optional[str]:
  for e in (ending,) if ending else NIFTI_ENDINGS:
    path = os.path.join(folder, case + e)
    if os.path.exists(path):
      return path
  return None


def _load_dataset_json(root: str):
  """(path, object) of `root/dataset.json`; DataError when missing, malformed or without labels."""
  if not os.path.isdir(root):
    raise DataError(root, 'dataset folder does not exist')
  json_path = os.path.join(root, 'dataset.json')
  if not os.path.isfile(json_path):
    raise DataError(json_path, 'missing dataset.json')
  try:
    with open(json_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(json_path, f'malformed JSON ({e})') from None
  if not isinstance(meta, dict):
    raise DataError(json_path, 'top level must be an object')
  if 'labels' not in meta:
    raise DataError(json_path, "missing key 'labels'")
  return json_path, meta


def _image_case(image_path) -> str:
  """Case id of an image path (its file name when it is not NIfTI)."""
  return case_id(image_path, image=True) or os.path.basename(image_path)


def _scan_images(folder, ending) -> dict:
  """{case id: channel-0 image} of `folder`; {} when it does not exist."""
  return list_cases(folder, image=True, ending=ending, missing_ok=True)


def _training_cases(root: str, meta: dict, json_path: str, ending) -> list:
  """[CaseFiles] of the MSD 'training' listing, or of a scan of imagesTr/ (nnU-Net)."""
  if not (isinstance(meta.get('training'), list) and meta['training']):
    return [
      CaseFiles(
        case,
        image,
        _label_path(os.path.join(root, 'labelsTr'), case, ending)
        or os.path.join(root, 'labelsTr', case + (ending or '.nii.gz')),
      )
      for case, image in _scan_images(os.path.join(root, 'imagesTr'), ending).items()
    ]
  training = []
  for entry in meta['training']:
    if not isinstance(entry, dict) or 'image' not in entry:
      raise DataError(json_path, f"malformed 'training' entry {entry!r}")
    image = _resolve(root, entry['image'], json_path)
    if not os.path.exists(image):  # nnU-Net-converted MSD: X.nii.gz listed, X_0000 on disk
      alt = _scan_images(os.path.dirname(image), ending).get(_image_case(image))
      image = alt or image
    label = _resolve(root, entry['label'], json_path) if entry.get('label') else None
    training.append(CaseFiles(_image_case(image), image, label))
  return training


def _test_cases(root: str, meta: dict, json_path: str, ending) -> list:
  """[CaseFiles] of the 'test' listing or of imagesTs/; labels from labelsTs/ when it exists."""
  labels_ts = os.path.join(root, 'labelsTs')
  if isinstance(meta.get('test'), list) and meta['test']:
    paths = [
      _resolve(root, t if isinstance(t, str) else t.get('image', ''), json_path)
      for t in meta['test']
    ]
  else:
    paths = list(_scan_images(os.path.join(root, 'imagesTs'), ending).values())
  has_labels = os.path.isdir(labels_ts)
  cases = []
  for image in paths:
    case = _image_case(image)
    label = _label_path(labels_ts, case, ending) if has_labels else None
    cases.append(CaseFiles(case, image, label))
  return cases


def read_dataset(root) -> DatasetInfo:
  """Reads `root/dataset.json` and lists the cases. Raises DataError on any problem."""
  root = os.fspath(root)
  json_path, meta = _load_dataset_json(root)
  labels = _parse_labels(meta['labels'], json_path)
  channels = meta.get('channel_names', meta.get('modality'))
  if not isinstance(channels, dict) or '0' not in channels:
    raise DataError(json_path, "missing 'channel_names' (nnU-Net) or 'modality' (MSD) with key '0'")
  ending = meta.get('file_ending')
  if ending is not None and ending not in NIFTI_ENDINGS:
    raise DataError(json_path, f'file_ending {ending!r} is not NIfTI (.nii/.nii.gz)')
  training = _training_cases(root, meta, json_path, ending)
  test = _test_cases(root, meta, json_path, ending)
  ids = [c.case_id for c in training] + [c.case_id for c in test]
  dupes = sorted({i for i in ids if ids.count(i) > 1})
  if dupes:
    raise DataError(json_path, f'case ids used more than once: {dupes[:5]}')
  return DatasetInfo(
    root=root,
    name=str(meta.get('name', os.path.basename(os.path.normpath(root)))),
    modality=str(channels['0']),
    labels=labels,
    training=tuple(sorted(training, key=lambda c: c.case_id)),
    test=tuple(sorted(test, key=lambda c: c.case_id)),
  )


def read_nifti(path, what: str = 'image', ndims=(3,)):
  """(nibabel image, data array) of a NIfTI file, a trailing singleton 4th axis dropped.

  Raises DataError for a missing or unreadable file and for data whose number of dimensions is
  not in `ndims`. The only place a NIfTI file is opened.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, f'{what} file does not exist')
  try:
    img = nib.load(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
      shape = shape[:3]
    if len(shape) not in ndims:
      dims = ' or '.join(f'{n}D' for n in ndims)
      raise DataError(
        path, f'{what} must be a {dims} volume, got {len(img.shape)}D shape {img.shape}'
      )
    data = np.asanyarray(img.dataobj)
  except DataError:
    raise
  except Exception as e:  # nibabel raises several types for corrupt files
    raise DataError(path, f'cannot read {what} as NIfTI ({type(e).__name__}: {e})') from None
  return img, data.reshape(shape)


def load_volume(path, what: str = 'image', spacing_range_mm=SPACING_RANGE_MM):
  """Loads a 3D NIfTI volume. Returns (array float32 or label int64 [X,Y,Z], affine 4x4).

  A trailing singleton 4th axis is dropped. Raises DataError for a missing or unreadable
  file, 2D or 4D data, non-finite voxels and a voxel spacing outside `spacing_range_mm`.
  """
  img, data = read_nifti(path, what)
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)):
    raise DataError(path, 'affine is not finite')
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  lo, hi = spacing_range_mm
  if spacing.min() < lo or spacing.max() > hi:
    raise DataError(
      path,
      f'voxel spacing {[float(f"{v:.4g}") for v in spacing]} mm is outside '
      f'the plausible {lo}..{hi} mm (wrong header units?); fix the header '
      'or widen the range (prepare --spacing-range)',
    )
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(path, 'affine is singular')
  if what == 'label':
    if np.issubdtype(data.dtype, np.floating):
      if not np.all(np.isfinite(data)):
        raise DataError(path, 'label has NaN/Inf voxels')
      if not np.all(data == np.round(data)):
        raise DataError(path, 'label has non-integer values')
    return data.astype(np.int64), affine
  data = data.astype(np.float32)
  bad = ~np.isfinite(data)
  if bad.any():
    raise DataError(path, f'image has {int(bad.sum())} NaN/Inf voxels')
  return data, affine


def check_pair(image, image_affine, label, label_affine, label_path) -> None:
  """Image and label must share shape and affine (within AFFINE_ATOL_MM)."""
  if image.shape != label.shape:
    raise DataError(label_path, f'label shape {label.shape} != image shape {image.shape}')
  if not np.allclose(image_affine, label_affine, rtol=1e-5, atol=AFFINE_ATOL_MM):
    raise DataError(
      label_path,
      'label affine differs from the image affine:\n'
      f'image {np.round(image_affine, 4).tolist()}\n'
      f'label {np.round(label_affine, 4).tolist()}',
    )


def check_label_values(label, declared, label_path) -> None:
  values = np.unique(label)
  unknown = sorted(set(values.tolist()) - set(declared))
  if unknown:
    raise DataError(
      label_path,
      f'label values {unknown} are not declared in dataset.json (declared: {sorted(declared)})',
    )
