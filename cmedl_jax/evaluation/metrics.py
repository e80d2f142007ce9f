"""Segmentation metrics on label volumes, 2D or 3D, in millimetres.

Dice, surface Dice (normalised surface distance) at a tolerance in mm, Hausdorff
distance (HD, and HD95 or any percentile) in mm, average symmetric surface distance
(ASSD) in mm, and per-tumor evaluation over 3D connected components.

Arrays: masks are boolean (or 0/1) numpy arrays of shape (H, W) or (D, H, W);
`spacing_mm` gives the voxel size in mm in *array axis order* (one value per axis).
Everything is computed inside the bounding box of both masks plus a 1-voxel zero margin,
never over the whole volume; that crop is exact (see `_crop`). Distances, weights and the
comparison with a tolerance are float64 (in float32 a distance equal to the tolerance can
flip to the other side).

Two surface conventions, selected by `convention=`:

* ``"area"`` (Nikolov et al. 2018, DeepMind's ``surface-distance``; default for surface
  Dice): surface elements are the marching-cubes faces of every 2x2(x2) neighbourhood,
  located at voxel corners and weighted by their area in mm^2 (contour length in mm in
  2D). Percentiles are area-weighted with surface-distance's rule (first element whose
  cumulative area fraction reaches p/100, elements sorted by (distance, area)). Results
  equal ``surface_distance.compute_*`` for non-empty masks.
* ``"voxel"`` (MONAI and medpy; default for HD/HD95/ASSD): surface elements are boundary
  voxels, ``mask XOR binary_erosion(mask)`` with face connectivity (the cross structuring
  element: scipy's default, used by MONAI's ``get_mask_edges``, and medpy's
  ``connectivity=1``), outside the array counted as background, each weighing 1.
  Directed distances come from ``distance_transform_edt(~border, sampling=spacing)``;
  the percentile is ``np.percentile`` (linear) per direction and HD95 is the max of the
  two directed 95th percentiles (MONAI's ``compute_hausdorff_distance``; note medpy's
  ``hd95`` instead pools both directions).

Definitions (S_p, S_r: surface elements of prediction and reference; w: weights;
d(s, S): distance from element s to the nearest element of S):

* ``dice`` = 2|P∩R| / (|P| + |R|).
* ``surface_dice`` = (Σ_{s∈S_p, d(s,S_r)≤τ} w_s + Σ_{s∈S_r, d(s,S_p)≤τ} w_s) / (Σ_{S_p} w + Σ_{S_r} w).
* ``hausdorff(percentile=q)`` = max(q-th percentile of d(S_p, S_r), q-th of d(S_r, S_p)).
* ``assd`` = (Σ_{S_p} w d(s,S_r) + Σ_{S_r} w d(s,S_p)) / (Σ_{S_p} w + Σ_{S_r} w)
  (Heimann et al. 2009 and MONAI's symmetric mean; medpy instead averages the two
  directed means).

Empty masks (the libraries disagree; this is our one documented result):

=====================  =====  ============  ===================
case                   dice   surface_dice  hd, hd95, assd (mm)
=====================  =====  ============  ===================
both empty             1.0    1.0           0.0
exactly one empty      0.0    0.0           inf
=====================  =====  ============  ===================

Summaries (`cmedl_jax.evaluation.statistics`) compute mean/sd/median/IQR over finite
values and report the number of infinite values separately.

Per-tumor rule (`evaluate_tumors`): the reference is split into connected components
(default full connectivity: 26-neighbourhood in 3D, 8 in 2D). For each reference
component, its *matched prediction* is the union of the predicted connected components
that overlap it by at least one voxel; it is `detected` when that union is non-empty.
All metrics of the component are computed between the component and its matched
prediction (a predicted component touching two tumors counts for both). Predicted
components that touch no reference component are false positives
(`count_false_positive_components`).

Public API (used by the trainer's validation, prediction and `cmedl_jax.evaluate`):
`dice`, `surface_distances`, `surface_dice`, `hausdorff`, `assd`, `evaluate_pair`,
`evaluate_case`, `evaluate_tumors`, `count_false_positive_components`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

CONVENTIONS = ('area', 'voxel')
METRIC_NAMES = ('dice', 'surface_dice', 'hd95', 'hd', 'assd')

# ----------------------------------------------------------------------------------------
# Input checks and cropping.


def _as_mask(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != bool:
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
      raise TypeError(f'{name}: expected a boolean or 0/1 array, got dtype {mask.dtype}')
    mask = mask != 0
  if mask.ndim not in (2, 3):
    raise ValueError(f'{name}: expected a 2D or 3D array, got shape {mask.shape}')
  return mask


def _check_pair(pred, ref, spacing_mm=None):
  pred, ref = _as_mask(pred, 'pred'), _as_mask(ref, 'ref')
  if pred.shape != ref.shape:
    raise ValueError(f'pred shape {pred.shape} != ref shape {ref.shape}')
  if spacing_mm is None:
    return pred, ref, None
  spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing_mm, np.float64)))
  if len(spacing) != pred.ndim:
    raise ValueError(
      f'spacing_mm {spacing} has {len(spacing)} values for a {pred.ndim}D '
      f'array of shape {pred.shape} (one value per array axis)'
    )
  if not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f'spacing_mm must be positive and finite, got {spacing}')
  return pred, ref, spacing


def _nonzero_range(flags: np.ndarray):
  idx = np.flatnonzero(flags)
  return (int(idx[0]), int(idx[-1]) + 1) if idx.size else None


def bounding_box(mask: np.ndarray):
  """Bounding box of the nonzero elements of `mask`, any shape and integer/bool dtype.

  Returns a tuple of (start, stop) per axis (stop exclusive), or None if all zero.
  One fast pass over the array (rows tested as uint64 words), then the slab of nonzero
  rows is projected along axis 0 and the rest found recursively on that projection.
  """
  mask = np.asarray(mask)
  if mask.size == 0:
    return None
  if mask.ndim == 1:
    r0 = _nonzero_range(mask)
    return None if r0 is None else (r0,)
  rows = mask.reshape(mask.shape[0], -1)
  row_bytes = rows.shape[1] * rows.itemsize
  if rows.flags.c_contiguous and row_bytes % 8 == 0 and mask.dtype.kind in 'biu':
    any0 = rows.view(np.uint8).view(np.uint64).max(axis=1) != 0
  else:
    any0 = rows.any(axis=1)
  r0 = _nonzero_range(any0)
  if r0 is None:
    return None
  return (r0,) + bounding_box(mask[r0[0] : r0[1]].any(axis=0))


def _union_box(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))


def _crop(mask: np.ndarray, box, margin: int = 1) -> np.ndarray:
  """mask[box] surrounded by `margin` zero voxels on every side.

  Exact for every metric here: all surface elements of both masks lie inside `box`;
  voxels outside `box` are background, as is the outside of the array for erosion and
  marching cubes (surface-distance, MONAI and medpy all treat it so); and Euclidean
  distance transforms between points inside the crop do not depend on the crop.
  """
  shape = tuple(hi - lo + 2 * margin for lo, hi in box)
  out = np.zeros(shape, bool)
  inner = tuple(slice(margin, margin + hi - lo) for lo, hi in box)
  out[inner] = mask[tuple(slice(lo, hi) for lo, hi in box)]
  return out


# ----------------------------------------------------------------------------------------
# Dice.


def dice(pred, ref) -> float:
  """Dice similarity coefficient of two masks of equal shape (any dims).

  Both empty: 1.0; exactly one empty: 0.0. Computed inside the union bounding box.
  """
  pred, ref = np.asarray(pred), np.asarray(ref)
  if pred.shape != ref.shape:
    raise ValueError(f'pred shape {pred.shape} != ref shape {ref.shape}')
  pred = pred if pred.dtype == bool else pred != 0
  ref = ref if ref.dtype == bool else ref != 0
  box = _union_box(bounding_box(pred), bounding_box(ref))
  if box is None:
    return 1.0
  sl = tuple(slice(lo, hi) for lo, hi in box)
  p, r = pred[sl], ref[sl]
  n_p, n_r = int(np.count_nonzero(p)), int(np.count_nonzero(r))
  return 2.0 * int(np.count_nonzero(p & r)) / (n_p + n_r)


# ----------------------------------------------------------------------------------------
# Surface elements.

# Surface normals of the marching-cubes triangles of each 2x2x2 neighbour code, in units
# of 1/8, from DeepMind's surface-distance (lookup_tables.py, Apache License 2.0,
# Copyright 2018 Google Inc.). One code per "|"-separated entry, triangles separated by
# ";"; the length of a normal is the triangle's area for unit spacing.
_NORMALS_X8 = """
0,0,0 | 1,1,1 | -1,-1,1 | -2,-2,0;2,2,0 | 1,-1,1 | -2,0,-2;2,0,2 | 1,-1,1;-1,-1,1 | 4,0,0;2,2,2;1,1,1
-1,1,1 | 1,1,1;-1,1,1 | -2,0,2;-2,0,2 | 4,0,0;-2,-2,2;-1,-1,1 | 2,-2,0;2,-2,0 | 4,0,0;2,-2,2;-1,1,-1 | -4,0,0;-2,2,2;-1,1,1 | 4,0,0;4,0,0
1,-1,-1 | 0,-2,-2;0,2,2 | -1,-1,1;1,-1,-1 | 0,-4,0;2,2,2;1,1,1 | 1,-1,1;1,-1,-1 | 0,0,-4;2,2,2;-1,-1,-1 | -1,-1,1;1,-1,1;1,-1,-1 | -1,-1,-1;-2,-2,-2;2,2,2;1,1,1
-1,1,1;1,-1,-1 | 0,-2,-2;0,2,2;-1,1,1 | -2,0,2;-2,0,2;1,-1,-1 | 1,1,1;3,3,3;0,-2,2;-2,0,2 | 1,-1,-1;2,-2,0;2,-2,0 | 3,3,3;0,2,-2;-1,-1,-1;-2,2,0 | -4,0,0;-1,-1,-1;-2,-2,-2;1,1,1 | -4,0,0;-1,-1,-1;-2,-2,-2
1,-1,1 | 1,1,1;1,-1,1 | 0,-2,2;0,2,-2 | 0,-4,0;1,1,-1;2,2,-2 | 1,-1,1;1,-1,1 | 1,-1,1;-2,0,-2;2,0,2 | 0,-2,2;0,2,-2;1,-1,1 | -3,-3,3;0,2,2;1,1,-1;-2,0,-2
-1,1,1;1,-1,1 | 1,1,1;1,-1,1;-1,1,1 | 0,0,4;-2,-2,2;-1,-1,1 | 2,2,-2;2,2,-2;1,1,-1;-1,-1,1 | 1,-1,1;2,-2,0;2,-2,0 | 4,0,0;2,-2,2;-1,1,-1;1,-1,1 | 0,2,-2;3,-3,-3;-1,1,1;2,2,0 | -4,0,0;-2,-2,2;-1,-1,1
2,-2,0;-2,2,0 | 0,4,0;-2,2,2;1,-1,-1 | 0,4,0;1,-1,1;-2,2,-2 | 0,4,0;0,-4,0 | 2,-2,0;-2,2,0;1,-1,1 | -3,-3,-3;-2,0,2;-1,-1,-1;-2,2,0 | 1,1,1;0,-4,0;-2,-2,-2;-1,-1,-1 | 0,-4,0;-2,-2,-2;-1,-1,-1
-1,1,1;2,-2,0;-2,2,0 | 0,4,0;2,2,-2;-1,-1,1;-1,-1,1 | -3,3,-3;-2,-2,0;-1,1,-1;-2,0,2 | 0,4,0;2,2,-2;-1,-1,1 | 2,-2,0;-2,2,0;2,-2,0;2,-2,0 | -2,-2,0;-2,-2,0;-1,-1,1 | 1,1,1;-2,-2,0;-2,-2,0 | -2,-2,0;-2,-2,0
-1,-1,1 | 1,1,1;-1,-1,1 | -1,-1,1;-1,-1,1 | -1,-1,1;-2,-2,0;2,2,0 | 0,-2,2;0,-2,2 | 0,0,4;2,-2,2;1,-1,1 | 0,-2,2;0,-2,2;-1,-1,1 | 3,-3,3;0,-2,-2;-1,1,-1;2,2,0
-1,-1,1;-1,1,1 | 1,1,1;-1,-1,1;-1,1,1 | -1,-1,1;-2,0,2;-2,0,2 | 4,0,0;-2,-2,2;-1,-1,1;-1,-1,1 | 0,4,0;-2,2,-2;1,-1,1 | -2,2,-2;-2,2,-2;-1,1,-1;-1,1,-1 | -2,0,-2;3,-3,-3;0,2,-2;-1,1,1 | 4,0,0;-2,2,-2;1,-1,1
-2,0,2;2,0,-2 | 0,0,4;-2,2,2;-1,1,1 | -1,-1,1;-2,0,2;2,0,-2 | -2,0,-2;-3,3,3;-2,-2,0;-1,1,1 | 0,0,-4;2,2,-2;-1,-1,1 | 0,0,4;0,0,4 | 1,1,1;1,1,1;2,2,2;0,0,4 | 1,1,1;2,2,2;0,0,4
-2,0,2;2,0,-2;-1,1,1 | 0,0,4;2,-2,2;1,-1,1;1,-1,1 | -2,0,2;-2,0,2;-2,0,2;2,0,-2 | 1,-1,1;2,0,2;2,0,2 | 2,0,2;-3,-3,3;-2,2,0;-1,-1,1 | 0,0,4;2,-2,2;1,-1,1 | 1,1,1;2,0,2;2,0,2 | 2,0,2;2,0,2
-1,-1,1;1,-1,1 | 1,1,1;-1,-1,1;1,-1,1 | -1,-1,1;0,-2,2;0,2,-2 | 0,-4,0;1,1,-1;2,2,-2;-1,-1,1 | 0,-2,2;0,-2,2;1,-1,1 | 0,0,4;2,-2,2;1,-1,1;1,-1,1 | 0,-2,2;0,-2,2;0,-2,2;0,2,-2 | 0,2,2;0,2,2;1,-1,-1
-1,1,1;1,-1,1;-1,-1,1 | -1,1,1;1,-1,1;-1,-1,1;1,1,1 | 0,0,4;-2,-2,2;-1,-1,1;-1,-1,1 | 1,1,1;1,-1,1;1,-1,-1 | 0,4,0;-2,2,-2;1,-1,1;1,-1,1 | 1,1,1;-1,-1,1;1,-1,-1 | 0,-2,-2;0,2,2;1,1,1 | 1,1,1;1,-1,-1
4,0,0;2,-2,-2;1,-1,-1 | -2,2,2;-1,1,1;-2,2,2;1,-1,-1 | 3,-3,3;0,2,2;-1,1,-1;-2,0,2 | 0,-4,0;-2,2,2;-1,1,1 | -3,-3,3;2,-2,0;0,2,2;-1,-1,1 | -1,1,1;-2,2,2;0,0,4 | 1,1,1;0,2,2;0,2,2 | 0,2,2;0,2,2
4,0,0;2,2,2;1,1,1;1,1,1 | 1,-1,1;-1,-1,1;1,1,1 | -2,0,-2;2,0,2;1,1,1 | 1,1,1;1,-1,1 | -2,-2,0;2,2,0;1,1,1 | 1,1,1;-1,-1,1 | 1,1,1;1,1,1 | 1,1,1
1,1,1 | 1,1,1;1,1,1 | 1,1,1;-1,-1,1 | -2,-2,0;2,2,0;1,1,1 | 1,1,1;1,-1,1 | -2,0,-2;2,0,2;1,1,1 | 1,-1,1;-1,-1,1;1,1,1 | 4,0,0;2,2,2;1,1,1;1,1,1
0,2,2;0,2,2 | 1,1,1;0,2,2;0,2,2 | -1,1,1;-2,2,2;0,0,4 | -3,-3,3;2,-2,0;0,2,2;-1,-1,1 | 0,-4,0;-2,2,2;-1,1,1 | 3,-3,3;0,2,2;-1,1,-1;-2,0,2 | -2,2,2;-1,1,1;-2,2,2;1,-1,-1 | 4,0,0;2,-2,-2;1,-1,-1
1,1,1;1,-1,-1 | 0,-2,-2;0,2,2;1,1,1 | 1,1,1;-1,-1,1;1,-1,-1 | 0,4,0;-2,2,-2;1,-1,1;1,-1,1 | 1,1,1;1,-1,1;1,-1,-1 | 0,0,4;-2,-2,2;-1,-1,1;-1,-1,1 | -1,1,1;1,-1,1;-1,-1,1;1,1,1 | -1,1,1;1,-1,1;-1,-1,1
0,2,2;0,2,2;1,-1,-1 | 0,-2,-2;0,2,2;0,2,2;0,2,2 | 0,0,4;2,-2,2;1,-1,1;1,-1,1 | 0,-2,2;0,-2,2;1,-1,1 | 0,-4,0;1,1,-1;2,2,-2;-1,-1,1 | -1,-1,1;0,-2,2;0,2,-2 | 1,1,1;-1,-1,1;1,-1,1 | -1,-1,1;1,-1,1
2,0,2;2,0,2 | 1,1,1;2,0,2;2,0,2 | 0,0,4;2,-2,2;1,-1,1 | 2,0,2;-3,-3,3;-2,2,0;-1,-1,1 | 1,-1,1;2,0,2;2,0,2 | -2,0,-2;2,0,2;2,0,2;2,0,2 | 0,0,4;2,-2,2;1,-1,1;1,-1,1 | -2,0,2;2,0,-2;-1,1,1
1,1,1;2,2,2;0,0,4 | 1,1,1;1,1,1;2,2,2;0,0,4 | 0,0,4;0,0,4 | 0,0,-4;2,2,-2;-1,-1,1 | -2,0,-2;-3,3,3;-2,-2,0;-1,1,1 | -1,-1,1;-2,0,2;2,0,-2 | 0,0,4;-2,2,2;-1,1,1 | -2,0,2;2,0,-2
4,0,0;-2,2,-2;1,-1,1 | -2,0,-2;3,-3,-3;0,2,-2;-1,1,1 | -2,2,-2;-2,2,-2;-1,1,-1;-1,1,-1 | 0,4,0;-2,2,-2;1,-1,1 | 4,0,0;-2,-2,2;-1,-1,1;-1,-1,1 | -1,-1,1;-2,0,2;-2,0,2 | 1,1,1;-1,-1,1;-1,1,1 | -1,-1,1;-1,1,1
3,-3,3;0,-2,-2;-1,1,-1;2,2,0 | 0,-2,2;0,-2,2;-1,-1,1 | 0,0,4;2,-2,2;1,-1,1 | 0,-2,2;0,-2,2 | -1,-1,1;-2,-2,0;2,2,0 | -1,-1,1;-1,-1,1 | 1,1,1;-1,-1,1 | -1,-1,1
-2,-2,0;-2,-2,0 | 1,1,1;-2,-2,0;-2,-2,0 | -2,-2,0;-2,-2,0;-1,-1,1 | -2,-2,0;-2,-2,0;-2,-2,0;2,2,0 | 0,4,0;2,2,-2;-1,-1,1 | -3,3,-3;-2,-2,0;-1,1,-1;-2,0,2 | 0,4,0;2,2,-2;-1,-1,1;-1,-1,1 | -1,1,1;2,-2,0;-2,2,0
0,-4,0;-2,-2,-2;-1,-1,-1 | 1,1,1;0,-4,0;-2,-2,-2;-1,-1,-1 | -3,-3,-3;-2,0,2;-1,-1,-1;-2,2,0 | 2,-2,0;-2,2,0;1,-1,1 | 0,4,0;0,-4,0 | 0,4,0;1,-1,1;-2,2,-2 | 0,4,0;-2,2,2;1,-1,-1 | 2,-2,0;-2,2,0
-4,0,0;-2,-2,2;-1,-1,1 | 0,2,-2;3,-3,-3;-1,1,1;2,2,0 | 4,0,0;2,-2,2;-1,1,-1;1,-1,1 | 1,-1,1;2,-2,0;2,-2,0 | 2,2,-2;2,2,-2;1,1,-1;-1,-1,1 | 0,0,4;-2,-2,2;-1,-1,1 | 1,1,1;1,-1,1;-1,1,1 | -1,1,1;1,-1,1
-3,-3,3;0,2,2;1,1,-1;-2,0,-2 | 0,-2,2;0,2,-2;1,-1,1 | 1,-1,1;-2,0,-2;2,0,2 | 1,-1,1;1,-1,1 | 0,-4,0;1,1,-1;2,2,-2 | 0,-2,2;0,2,-2 | 1,1,1;1,-1,1 | 1,-1,1
-4,0,0;-1,-1,-1;-2,-2,-2 | -4,0,0;-1,-1,-1;-2,-2,-2;1,1,1 | 3,3,3;0,2,-2;-1,-1,-1;-2,2,0 | 1,-1,-1;2,-2,0;2,-2,0 | 1,1,1;3,3,3;0,-2,2;-2,0,2 | -2,0,2;-2,0,2;1,-1,-1 | 0,-2,-2;0,2,2;-1,1,1 | -1,1,1;1,-1,-1
-1,-1,-1;-2,-2,-2;2,2,2;1,1,1 | -1,-1,1;1,-1,1;1,-1,-1 | 0,0,-4;2,2,2;-1,-1,-1 | 1,-1,1;1,-1,-1 | 0,-4,0;2,2,2;1,1,1 | -1,-1,1;1,-1,-1 | 0,-2,-2;0,2,2 | 1,-1,-1
4,0,0;4,0,0 | -4,0,0;-2,2,2;-1,1,1 | 4,0,0;2,-2,2;-1,1,-1 | 2,-2,0;2,-2,0 | 4,0,0;-2,-2,2;-1,-1,1 | -2,0,2;-2,0,2 | 1,1,1;-1,1,1 | -1,1,1
4,0,0;2,2,2;1,1,1 | 1,-1,1;-1,-1,1 | -2,0,-2;2,0,2 | 1,-1,1 | -2,-2,0;2,2,0 | -1,-1,1 | 1,1,1 | 0,0,0
"""


def _normals_table():
  entries = [e.strip() for line in _NORMALS_X8.strip().splitlines() for e in line.split('|')]
  assert len(entries) == 256, len(entries)
  return [
    np.array([[int(v) / 8.0 for v in tri.split(',')] for tri in e.split(';')]) for e in entries
  ]


@functools.lru_cache(maxsize=64)
def _area_table_3d(spacing: tuple) -> np.ndarray:
  """(256,) float64 surface area in mm^2 per neighbour code (surface-distance's table)."""
  table = np.zeros([256])
  for code, normals in enumerate(_normals_table()):
    total = 0
    for k in range(normals.shape[0]):
      n = np.zeros([3])
      n[0] = normals[k, 0] * spacing[1] * spacing[2]
      n[1] = normals[k, 1] * spacing[0] * spacing[2]
      n[2] = normals[k, 2] * spacing[0] * spacing[1]
      total += np.linalg.norm(n)
    table[code] = total
  table.setflags(write=False)
  return table


@functools.lru_cache(maxsize=64)
def _length_table_2d(spacing: tuple) -> np.ndarray:
  """(16,) float64 contour length in mm per 2x2 neighbour code (surface-distance's table)."""
  vertical, horizontal = spacing[0], spacing[1]
  diag = 0.5 * math.sqrt(spacing[0] ** 2 + spacing[1] ** 2)
  table = np.zeros([16])
  for code, length in {
    0b0001: diag,
    0b0010: diag,
    0b0011: horizontal,
    0b0100: diag,
    0b0101: vertical,
    0b0110: 2 * diag,
    0b0111: diag,
    0b1000: diag,
    0b1001: 2 * diag,
    0b1010: vertical,
    0b1011: diag,
    0b1100: horizontal,
    0b1101: diag,
    0b1110: diag,
  }.items():
    table[code] = length
  table.setflags(write=False)
  return table


def _neighbour_codes(padded: np.ndarray) -> np.ndarray:
  """Neighbour code of every voxel corner; shape = padded.shape - 1.

  `padded` has a zero margin of 1. The code at corner i encodes voxels i-1..i (of the
  unpadded mask) per axis with surface-distance's bit order (its correlate kernel
  [[[128, 64], [32, 16]], [[8, 4], [2, 1]]]).
  """
  ndim = padded.ndim
  p = padded.view(np.uint8)
  out_shape = tuple(s - 1 for s in padded.shape)
  codes = np.zeros(out_shape, np.uint8)
  for offset in np.ndindex(*(2,) * ndim):
    bit = (2**ndim - 1) - int(np.dot(offset, [2 ** (ndim - 1 - a) for a in range(ndim)]))
    sl = tuple(slice(o, o + s) for o, s in zip(offset, out_shape))
    codes |= p[sl] << np.uint8(bit)
  return codes


def _area_elements(padded: np.ndarray, spacing: tuple):
  """Area convention: (border corners mask, neighbour codes, code -> area/length table)."""
  codes = _neighbour_codes(padded)
  full = 2 ** (2**padded.ndim) - 1
  border = (codes != 0) & (codes != full)
  table = _area_table_3d(spacing) if padded.ndim == 3 else _length_table_2d(spacing)
  return border, codes, table


def _erode_face(padded: np.ndarray) -> np.ndarray:
  """binary_erosion with the face-connectivity cross; `padded` has a zero margin of 1."""
  inner = tuple(slice(1, -1) for _ in range(padded.ndim))
  eroded = padded[inner].copy()
  for axis in range(padded.ndim):
    for shift in (0, 2):
      sl = list(inner)
      sl[axis] = slice(shift, shift + padded.shape[axis] - 2)
      eroded &= padded[tuple(sl)]
  out = np.zeros_like(padded)
  out[inner] = eroded
  return out


def _voxel_border(padded: np.ndarray) -> np.ndarray:
  return padded & ~_erode_face(padded)


@dataclasses.dataclass(frozen=True)
class SurfaceDistances:
  """Directed distances between the surface elements of two masks.

  pred_to_ref: (Np,) float64 mm, distance from each predicted surface element to the
    reference surface (inf if the reference is empty).
  pred_weights: (Np,) float64 weight of each element (mm^2 in 3D / mm in 2D for the area
    convention; 1.0 for the voxel convention).
  ref_to_pred, ref_weights: the same for the reference surface.
  For the area convention each direction is sorted by (distance, weight), as
  surface-distance returns them.
  """

  pred_to_ref: np.ndarray
  pred_weights: np.ndarray
  ref_to_pred: np.ndarray
  ref_weights: np.ndarray
  convention: str

  @property
  def pred_empty(self) -> bool:
    return self.pred_to_ref.size == 0

  @property
  def ref_empty(self) -> bool:
    return self.ref_to_pred.size == 0


def _empty_f64():
  return np.zeros([0], np.float64)


def _distances_to(target: np.ndarray, query: np.ndarray, spacing: tuple) -> np.ndarray:
  """Distance in mm from each True voxel of `query` (C order) to the nearest of `target`.

  Same float64 arithmetic as `distance_transform_edt(~target, sampling=spacing)[query]`
  (bit-identical), but the distances are only formed at the query voxels.
  inf for every query voxel if `target` is empty.
  """
  points = np.nonzero(query)
  if not target.any():
    return np.full(points[0].size, np.inf)
  nearest = ndimage.distance_transform_edt(
    ~target, sampling=spacing, return_distances=False, return_indices=True
  )
  delta = nearest[(slice(None),) + points] - np.stack(points).astype(np.int32)
  delta = delta.astype(np.float64)
  for axis, step in enumerate(spacing):
    delta[axis] *= step
  np.multiply(delta, delta, delta)
  return np.sqrt(np.add.reduce(delta, axis=0))


def _surface_distances_cropped(
  p: np.ndarray, r: np.ndarray, spacing: tuple, convention: str
) -> SurfaceDistances:
  """As surface_distances, on masks already cropped with a zero margin of 1."""
  if convention == 'area':
    border_p, codes_p, table = _area_elements(p, spacing)
    border_r, codes_r, _ = _area_elements(r, spacing)
    w_p, w_r = table[codes_p[border_p]], table[codes_r[border_r]]
  elif convention == 'voxel':
    border_p, border_r = _voxel_border(p), _voxel_border(r)
    w_p = w_r = None
  else:
    raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
  d_p = _distances_to(border_r, border_p, spacing)
  d_r = _distances_to(border_p, border_r, spacing)
  if convention == 'voxel':
    w_p, w_r = np.ones(d_p.shape), np.ones(d_r.shape)
  else:
    order_p, order_r = np.lexsort((w_p, d_p)), np.lexsort((w_r, d_r))
    d_p, w_p, d_r, w_r = d_p[order_p], w_p[order_p], d_r[order_r], w_r[order_r]
  return SurfaceDistances(
    d_p.astype(np.float64),
    w_p.astype(np.float64),
    d_r.astype(np.float64),
    w_r.astype(np.float64),
    convention,
  )


def surface_distances(
  pred, ref, spacing_mm: Sequence[float], convention: str = 'area'
) -> SurfaceDistances:
  """Distances between the surfaces of `pred` and `ref` (2D or 3D masks, same shape).

  spacing_mm: voxel size in mm per array axis. convention: "area" (surface-distance) or
  "voxel" (MONAI/medpy boundary voxels); see the module docstring.
  """
  pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
  if convention not in CONVENTIONS:
    raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
  box = _union_box(bounding_box(pred), bounding_box(ref))
  if box is None:
    e = _empty_f64()
    return SurfaceDistances(e, e, e, e, convention)
  return _surface_distances_cropped(_crop(pred, box), _crop(ref, box), spacing, convention)


# ----------------------------------------------------------------------------------------
# Metrics from surface distances.


def _tolerance(tolerance_mm) -> np.float64:
  tol = np.float64(tolerance_mm)
  if not tol >= 0:
    raise ValueError(f'tolerance_mm must be >= 0, got {tolerance_mm}')
  return tol


def surface_dice_from(sd: SurfaceDistances, tolerance_mm: float) -> float:
  """Surface Dice at `tolerance_mm` (float64 comparison d <= tolerance)."""
  tol = _tolerance(tolerance_mm)
  if sd.pred_empty and sd.ref_empty:
    return 1.0
  if sd.pred_empty or sd.ref_empty:
    return 0.0
  overlap_r = np.sum(sd.ref_weights[sd.ref_to_pred <= tol])
  overlap_p = np.sum(sd.pred_weights[sd.pred_to_ref <= tol])
  return float((overlap_r + overlap_p) / (np.sum(sd.ref_weights) + np.sum(sd.pred_weights)))


def _directed_percentile(distances, weights, percentile, convention) -> float:
  if convention == 'voxel':
    return float(np.percentile(distances, percentile))
  cum = np.cumsum(weights) / np.sum(weights)  # sorted by (distance, weight)
  idx = np.searchsorted(cum, percentile / 100.0)
  return float(distances[min(idx, len(distances) - 1)])


def hausdorff_from(sd: SurfaceDistances, percentile: float = 95.0) -> float:
  """Max of the two directed `percentile`-th surface distances in mm (100 = HD)."""
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f'percentile must be in [0, 100], got {percentile}')
  if sd.pred_empty and sd.ref_empty:
    return 0.0
  if sd.pred_empty or sd.ref_empty:
    return math.inf
  return max(
    _directed_percentile(sd.ref_to_pred, sd.ref_weights, percentile, sd.convention),
    _directed_percentile(sd.pred_to_ref, sd.pred_weights, percentile, sd.convention),
  )


def assd_from(sd: SurfaceDistances) -> float:
  """Average symmetric surface distance in mm (weighted mean over both surfaces)."""
  if sd.pred_empty and sd.ref_empty:
    return 0.0
  if sd.pred_empty or sd.ref_empty:
    return math.inf
  total = np.sum(sd.ref_to_pred * sd.ref_weights) + np.sum(sd.pred_to_ref * sd.pred_weights)
  return float(total / (np.sum(sd.ref_weights) + np.sum(sd.pred_weights)))


def surface_dice(pred, ref, spacing_mm, tolerance_mm: float, convention: str = 'area') -> float:
  """Surface Dice (normalised surface distance) at `tolerance_mm`, in [0, 1]."""
  return surface_dice_from(surface_distances(pred, ref, spacing_mm, convention), tolerance_mm)


def hausdorff(pred, ref, spacing_mm, percentile: float = 95.0, convention: str = 'voxel') -> float:
  """Hausdorff distance in mm: percentile=95 gives HD95, 100 the maximum (HD)."""
  return hausdorff_from(surface_distances(pred, ref, spacing_mm, convention), percentile)


def assd(pred, ref, spacing_mm, convention: str = 'voxel') -> float:
  """Average symmetric surface distance in mm."""
  return assd_from(surface_distances(pred, ref, spacing_mm, convention))


# ----------------------------------------------------------------------------------------
# Everything at once: one pair, one case (multi-class), per tumor.


def evaluate_pair(
  pred,
  ref,
  spacing_mm,
  tolerance_mm: float = 2.0,
  surface_dice_convention: str = 'area',
  distance_convention: str = 'voxel',
) -> dict:
  """All metrics of one binary pair, sharing the crop and the distance transforms.

  Returns {"dice", "surface_dice", "hd95", "hd", "assd" (mm), "pred_volume_mm3",
  "ref_volume_mm3"} as floats. surface_dice uses `surface_dice_convention`; hd95, hd and
  assd use `distance_convention`.
  """
  pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
  voxel_mm3 = float(np.prod(spacing))
  box = _union_box(bounding_box(pred), bounding_box(ref))
  if box is None:
    e = _empty_f64()
    sds = {c: SurfaceDistances(e, e, e, e, c) for c in CONVENTIONS}
    n_p = n_r = n_pr = 0
  else:
    p, r = _crop(pred, box), _crop(ref, box)
    n_p, n_r = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    n_pr = int(np.count_nonzero(p & r))
    sds = {
      c: _surface_distances_cropped(p, r, spacing, c)
      for c in {surface_dice_convention, distance_convention}
    }
  sd_surf, sd_dist = sds[surface_dice_convention], sds[distance_convention]
  return {
    'dice': 1.0 if n_p + n_r == 0 else 2.0 * n_pr / (n_p + n_r),
    'surface_dice': surface_dice_from(sd_surf, tolerance_mm),
    'hd95': hausdorff_from(sd_dist, 95.0),
    'hd': hausdorff_from(sd_dist, 100.0),
    'assd': assd_from(sd_dist),
    'pred_volume_mm3': n_p * voxel_mm3,
    'ref_volume_mm3': n_r * voxel_mm3,
  }


def evaluate_case(
  pred_labels,
  ref_labels,
  spacing_mm,
  classes: Mapping[str, int],
  tolerance_mm: float = 2.0,
  surface_dice_convention: str = 'area',
  distance_convention: str = 'voxel',
) -> dict:
  """All metrics per class of one case.

  pred_labels, ref_labels: integer label volumes of equal shape (2D or 3D).
  classes: {class name: label value}. Returns {class name: evaluate_pair(...) dict}.
  Each class is computed inside the bounding box of all foreground of both volumes.
  """
  pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
  if pred_labels.shape != ref_labels.shape:
    raise ValueError(f'pred shape {pred_labels.shape} != ref shape {ref_labels.shape}')
  box = _union_box(bounding_box(pred_labels), bounding_box(ref_labels))
  if box is not None:
    sl = tuple(slice(lo, hi) for lo, hi in box)
    pred_labels, ref_labels = pred_labels[sl], ref_labels[sl]
  return {
    name: evaluate_pair(
      pred_labels == label,
      ref_labels == label,
      spacing_mm,
      tolerance_mm,
      surface_dice_convention,
      distance_convention,
    )
    for name, label in classes.items()
  }


def _structure(ndim: int, connectivity):
  connectivity = ndim if connectivity is None else int(connectivity)
  if not 1 <= connectivity <= ndim:
    raise ValueError(f'connectivity must be in 1..{ndim} for {ndim}D, got {connectivity}')
  return ndimage.generate_binary_structure(ndim, connectivity)


def evaluate_tumors(
  pred,
  ref,
  spacing_mm,
  tolerance_mm: float = 2.0,
  connectivity: int | None = None,
  surface_dice_convention: str = 'area',
  distance_convention: str = 'voxel',
) -> list[dict]:
  """Per-tumor metrics: one dict per connected component of `ref`.

  pred, ref: binary masks (one class). connectivity: 1 (faces) .. ndim (full; default,
  26-neighbourhood in 3D). Matching rule: see the module docstring. Each dict has
  "tumor" (1-based, in scan order), "ref_volume_mm3", "centroid_vox" (array axes),
  "detected", "n_pred_components" (matched), "pred_volume_mm3" (of the matched
  prediction) and the metrics of evaluate_pair between the component and its match.
  """
  pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
  box = bounding_box(ref)
  if box is None:
    return []
  box = _union_box(box, bounding_box(pred))
  offset = np.array([lo for lo, _ in box]) - 1
  p, r = _crop(pred, box), _crop(ref, box)
  structure = _structure(ref.ndim, connectivity)
  ref_lab, n_ref = ndimage.label(r, structure)
  pred_lab, _ = ndimage.label(p, structure)
  rows = []
  for k, sl in enumerate(ndimage.find_objects(ref_lab), start=1):
    comp = ref_lab == k
    matched_ids = np.unique(pred_lab[sl][comp[sl]])
    matched_ids = matched_ids[matched_ids != 0]
    matched = np.isin(pred_lab, matched_ids) if matched_ids.size else np.zeros_like(p)
    row = {'tumor': k}
    metrics = evaluate_pair(
      matched, comp, spacing, tolerance_mm, surface_dice_convention, distance_convention
    )
    row['ref_volume_mm3'] = metrics.pop('ref_volume_mm3')
    row['centroid_vox'] = tuple(float(c) + o for c, o in zip(ndimage.center_of_mass(comp), offset))
    row['detected'] = bool(matched_ids.size)
    row['n_pred_components'] = int(matched_ids.size)
    row.update(metrics)
    rows.append(row)
  return rows


def count_false_positive_components(pred, ref, connectivity: int | None = None) -> int:
  """Number of predicted connected components that overlap no reference voxel."""
  pred, ref, _ = _check_pair(pred, ref)
  box = bounding_box(pred)
  if box is None:
    return 0
  sl = tuple(slice(lo, hi) for lo, hi in box)
  pred_lab, n = ndimage.label(pred[sl], _structure(pred.ndim, connectivity))
  hit = np.unique(pred_lab[ref[sl] & (pred_lab > 0)])
  return int(n - hit.size)
