"""Volume geometry: reorientation, in-plane resampling, crop/pad, and their exact inverses.

Prepared grid conventions (the same for every dataset):

* Canonical orientation: nibabel's closest-canonical RAS+ grid, stored for display as arrays
  `[Z, H, W]` with Z = inferior->superior, H = anterior->posterior (rows), W = patient right->left
  (columns). So `plt.imshow(prepared[z])` shows the usual radiological axial view. (This is RAS+
  with the two in-plane axes flipped, i.e. the LPS+ DICOM/ITK grid transposed to [Z, Y, X].)
* In-plane resampling to `spacing_mm` (row, col) keeps the field of view: prepared-grid voxel j
  covers canonical continuous index `i = (j + 0.5) / f - 0.5`, `f = canonical_spacing / spacing`.
  The slice axis is kept (no resampling along Z).
* Crop/pad to `size` (H, W): prepared row h is resampled row `h + crop_offset[0]` (offsets may be
  negative = padding).

`Geometry` records all of it (JSON-serialisable) so predictions can be written back onto the
original voxel grid: labels by nearest neighbour (exact inverse when `spacing_mm` <= the original
in-plane spacing and nothing was cropped away), float maps by linear interpolation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import nibabel.orientations as nio
import numpy as np
import scipy.ndimage as ndi

CANONICAL_AXCODES = ('L', 'P', 'S')  # array axes of the canonical grid before the [Z,H,W] transpose


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Everything needed to map between an original NIfTI grid and its prepared [Z, H, W] grid.

  Attributes:
    original_affine: 4x4 voxel->world (mm) affine of the original file.
    original_shape: (3,) original array shape.
    original_spacing_mm: (3,) voxel sizes along the original array axes.
    orientation: (3, 2) nibabel ornt transform original -> canonical (L, P, S) array.
    canonical_shape: (3,) shape of the canonical (L, P, S) array.
    canonical_spacing_mm: (3,) its voxel sizes (mm).
    zoom: (fy, fx) = canonical in-plane spacing / prepared spacing (rows, cols).
    resampled_shape: (Z, H', W') of the resampled grid before crop/pad.
    crop_offset: (y0, x0): prepared (h, w) is resampled (h + y0, w + x0).
    size: (H, W) prepared in-plane size.
    spacing_mm: (z, y, x) voxel sizes of the prepared grid.
    affine: 4x4 prepared voxel (z, h, w) -> world (mm) affine.
  """

  original_affine: tuple
  original_shape: tuple
  original_spacing_mm: tuple
  orientation: tuple
  canonical_shape: tuple
  canonical_spacing_mm: tuple
  zoom: tuple
  resampled_shape: tuple
  crop_offset: tuple
  size: tuple
  spacing_mm: tuple
  affine: tuple

  def to_dict(self) -> dict:
    return {f.name: _to_lists(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict) -> 'Geometry':
    return cls(**{f.name: _to_tuples(d[f.name]) for f in dataclasses.fields(cls)})


def _to_lists(x):
  if isinstance(x, (tuple, list, np.ndarray)):
    return [_to_lists(v) for v in x]
  return x.item() if isinstance(x, np.generic) else x


def _to_tuples(x):
  if isinstance(x, (list, tuple, np.ndarray)):
    return tuple(_to_tuples(v) for v in x)
  return x.item() if isinstance(x, np.generic) else x


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
  """(3,) voxel sizes in mm = column norms of the affine's 3x3 part."""
  return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def to_canonical(volume: np.ndarray, affine: np.ndarray):
  """Reorients `volume` [X,Y,Z] to the canonical (L, P, S) array; returns (array, ornt, affine)."""
  transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(CANONICAL_AXCODES))
  canonical = nio.apply_orientation(volume, transform)
  canonical_affine = np.asarray(affine, np.float64) @ nio.inv_ornt_aff(transform, volume.shape)
  return canonical, transform, canonical_affine


def _crop_start(lo: float, hi: float, n_resampled: int, size: int) -> int:
  """Start of a `size` window on a resampled axis of length n, around the body extent [lo, hi)."""
  if n_resampled <= size:  # whole image fits: centre it, nothing is lost
    return -((size - n_resampled) // 2)
  start = int(math.floor((lo + hi) / 2.0 - size / 2.0))
  return min(max(start, 0), n_resampled - size)


def _body_box(body_mask_canonical, fy: float, fx: float, ry: int, rx: int):
  """(y_lo, y_hi, x_lo, x_hi) on the resampled grid: the in-plane box of the pixels that are
  body in >= 10% of the slices (any body if none is), or the whole image without a body."""
  if body_mask_canonical is None or not body_mask_canonical.any():
    return 0.0, float(ry), 0.0, float(rx)
  frac = body_mask_canonical.mean(axis=0)  # [Y, X]: fraction of slices with body
  proj = frac >= 0.1 if (frac >= 0.1).any() else frac > 0
  rows, cols = np.nonzero(proj.any(axis=1))[0], np.nonzero(proj.any(axis=0))[0]
  return rows[0] * fy, (rows[-1] + 1) * fy, cols[0] * fx, (cols[-1] + 1) * fx


def make_geometry(
  affine,
  shape,
  spacing_mm: Sequence[float],
  size: Sequence[int],
  body_mask_canonical=None,
  whole_fov_multiple: int = 0,
) -> Geometry:
  """Builds the Geometry of one volume.

  Args:
    affine: original 4x4 affine; shape: original (3,) shape.
    spacing_mm: prepared in-plane spacing (row, col) in mm.
    size: prepared in-plane size (H, W).
    body_mask_canonical: optional bool [Z, Y, X] body mask on the canonical [Z,H,W]-ordered grid;
      the crop window is centred on its in-plane bounding box (projection over slices).
    whole_fov_multiple: if > 0, the size grows to cover the whole resampled image (nothing is
      cropped away), rounded up to this multiple; `size` is then a minimum.
  """
  shape = tuple(int(s) for s in shape)
  transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(CANONICAL_AXCODES))
  canonical_affine = np.asarray(affine, np.float64) @ nio.inv_ornt_aff(transform, shape)
  canonical_shape = tuple(int(shape[int(a)]) for a in np.argsort(transform[:, 0]))
  sx, sy, sz = voxel_spacing(canonical_affine)
  nx, ny, nz = canonical_shape
  fy, fx = sy / float(spacing_mm[0]), sx / float(spacing_mm[1])
  ry, rx = max(1, int(round(ny * fy))), max(1, int(round(nx * fx)))
  H, W = int(size[0]), int(size[1])
  if whole_fov_multiple > 0:
    m = int(whole_fov_multiple)
    H, W = -(-max(H, ry) // m) * m, -(-max(W, rx) // m) * m
  y_lo, y_hi, x_lo, x_hi = _body_box(body_mask_canonical, fy, fx, ry, rx)
  y0, x0 = _crop_start(y_lo, y_hi, ry, H), _crop_start(x_lo, x_hi, rx, W)
  # prepared (z, h, w, 1) -> canonical (i_x, i_y, i_z, 1) -> world.
  to_canonical_index = np.array(
    [
      [0.0, 0.0, 1.0 / fx, (x0 + 0.5) / fx - 0.5],
      [0.0, 1.0 / fy, 0.0, (y0 + 0.5) / fy - 0.5],
      [1.0, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 1.0],
    ]
  )
  return Geometry(
    original_affine=_to_tuples(np.asarray(affine, np.float64)),
    original_shape=shape,
    original_spacing_mm=_to_tuples(voxel_spacing(affine)),
    orientation=_to_tuples(transform.astype(int)),
    canonical_shape=canonical_shape,
    canonical_spacing_mm=(float(sx), float(sy), float(sz)),
    zoom=(float(fy), float(fx)),
    resampled_shape=(nz, ry, rx),
    crop_offset=(int(y0), int(x0)),
    size=(H, W),
    spacing_mm=(float(sz), float(spacing_mm[0]), float(spacing_mm[1])),
    affine=_to_tuples(canonical_affine @ to_canonical_index),
  )


def canonical_zyx(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Original-grid volume -> canonical [Z, Y, X] array (contiguous)."""
  transform = np.asarray(geometry.orientation, np.float64)
  if tuple(volume.shape[:3]) != tuple(geometry.original_shape):
    raise ValueError(f"volume shape {volume.shape} != geometry's {geometry.original_shape}")
  return np.ascontiguousarray(nio.apply_orientation(volume, transform).transpose(2, 1, 0))


def _source_index(n_out: int, start: int, zoom: float, n_resampled: int, n_in: int):
  """Nearest canonical index for each prepared position and whether it lies on the image."""
  j = np.arange(n_out) + start
  inside = (j >= 0) & (j < n_resampled)
  i = np.clip(np.rint((j + 0.5) / zoom - 0.5).astype(np.int64), 0, n_in - 1)
  return i, inside


def resample_labels(canonical: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Canonical [Z,Y,X] integer labels -> prepared [Z,H,W] uint8 (nearest; 0 outside)."""
  (_, ry, rx), (y0, x0), (H, W) = geometry.resampled_shape, geometry.crop_offset, geometry.size
  iy, in_y = _source_index(H, y0, geometry.zoom[0], ry, canonical.shape[1])
  ix, in_x = _source_index(W, x0, geometry.zoom[1], rx, canonical.shape[2])
  out = canonical[:, iy[:, None], ix[None, :]].astype(np.uint8)
  out[:, ~(in_y[:, None] & in_x[None, :])] = 0
  return out


def resample_image(
  canonical: np.ndarray, geometry: Geometry, order: int, fill_value: float
) -> np.ndarray:
  """Canonical [Z,Y,X] float image -> prepared [Z,H,W] float32 (spline `order`; pad `fill_value`)."""
  (_, ry, rx), (y0, x0), (H, W) = geometry.resampled_shape, geometry.crop_offset, geometry.size
  fy, fx = geometry.zoom
  matrix = np.array([1.0 / fy, 1.0 / fx])
  offset = np.array([(y0 + 0.5) / fy - 0.5, (x0 + 0.5) / fx - 0.5])
  out = np.empty((canonical.shape[0], H, W), np.float32)
  for z in range(canonical.shape[0]):  # 2D per slice: no spline prefiltering across slices
    out[z] = ndi.affine_transform(
      canonical[z].astype(np.float32, copy=False),
      matrix,
      offset,
      output_shape=(H, W),
      order=order,
      mode='nearest',
    )
  h, w = np.arange(H) + y0, np.arange(W) + x0
  outside = ~(((h >= 0) & (h < ry))[:, None] & ((w >= 0) & (w < rx))[None, :])
  out[:, outside] = fill_value
  return out


def _to_original(canonical_zyx_arr: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Canonical [Z,Y,X,...] -> original grid [X0,Y0,Z0,...] (inverse reorientation)."""
  axes = (2, 1, 0) + tuple(range(3, canonical_zyx_arr.ndim))
  lps = canonical_zyx_arr.transpose(axes)
  original_ornt = nio.io_orientation(np.asarray(geometry.original_affine))
  inverse = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), original_ornt)
  out = nio.apply_orientation(lps, inverse)
  assert out.shape[:3] == tuple(geometry.original_shape), (out.shape, geometry.original_shape)
  return np.ascontiguousarray(out)


def _prepared_index(n_canonical: int, start: int, zoom: float, n_resampled: int, size: int):
  """Nearest prepared position for each canonical index, and whether it exists there."""
  j = np.rint((np.arange(n_canonical) + 0.5) * zoom - 0.5).astype(np.int64)
  h = j - start
  valid = (j >= 0) & (j < n_resampled) & (h >= 0) & (h < size)
  return np.clip(h, 0, size - 1), valid


def outside_window(geometry: Geometry) -> np.ndarray:
  """bool [Y, X] on the canonical in-plane grid: positions the crop cut away (no prepared
  voxel holds them)."""
  (_, ry, rx), (y0, x0), (H, W) = geometry.resampled_shape, geometry.crop_offset, geometry.size
  nx, ny, _ = geometry.canonical_shape
  _, vy = _prepared_index(ny, y0, geometry.zoom[0], ry, H)
  _, vx = _prepared_index(nx, x0, geometry.zoom[1], rx, W)
  return ~(vy[:, None] & vx[None, :])


def invert_labels(pred_prepared: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Prepared [Z,H,W] labels -> original grid (nearest; 0 where the crop cut the image).

  Returns an array of the original shape (dtype of the input) aligned with `original_affine`.
  """
  geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_dict(geometry)
  pred = np.asarray(pred_prepared)
  (nz, ry, rx), (y0, x0), (H, W) = geometry.resampled_shape, geometry.crop_offset, geometry.size
  if pred.shape[:3] != (nz, H, W):
    raise ValueError(f'prediction shape {pred.shape} != prepared shape {(nz, H, W)}')
  nx, ny, _ = geometry.canonical_shape
  hy, _ = _prepared_index(ny, y0, geometry.zoom[0], ry, H)
  hx, _ = _prepared_index(nx, x0, geometry.zoom[1], rx, W)
  canonical = pred[:, hy[:, None], hx[None, :]].copy()
  canonical[:, outside_window(geometry)] = 0
  return _to_original(canonical, geometry)


def invert_image(
  prepared: np.ndarray, geometry: Geometry, fill_value: float = 0.0, order: int = 1
) -> np.ndarray:
  """Prepared [Z,H,W] or [Z,H,W,C] float map -> original grid (linear by default), float32.

  Voxels outside the prepared window get `fill_value` (e.g. 0 for probabilities).
  """
  geometry = geometry if isinstance(geometry, Geometry) else Geometry.from_dict(geometry)
  arr = np.asarray(prepared, np.float32)
  squeeze = arr.ndim == 3
  if squeeze:
    arr = arr[..., None]
  (nz, ry, rx), (y0, x0), (H, W) = geometry.resampled_shape, geometry.crop_offset, geometry.size
  if arr.shape[:3] != (nz, H, W):
    raise ValueError(f'map shape {prepared.shape} != prepared shape {(nz, H, W)}')
  nx, ny, _ = geometry.canonical_shape
  fy, fx = geometry.zoom
  matrix = np.array([fy, fx])
  offset = np.array([0.5 * fy - 0.5 - y0, 0.5 * fx - 0.5 - x0])
  out = np.empty((nz, ny, nx, arr.shape[-1]), np.float32)
  for z in range(nz):
    for c in range(arr.shape[-1]):
      out[z, :, :, c] = ndi.affine_transform(
        arr[z, :, :, c], matrix, offset, output_shape=(ny, nx), order=order, mode='nearest'
      )
  jy, jx = (np.arange(ny) + 0.5) * fy - 0.5, (np.arange(nx) + 0.5) * fx - 0.5
  in_y = (jy > -0.5) & (jy < ry - 0.5) & (jy - y0 > -0.5) & (jy - y0 < H - 0.5)
  in_x = (jx > -0.5) & (jx < rx - 0.5) & (jx - x0 > -0.5) & (jx - x0 < W - 0.5)
  out[:, ~(in_y[:, None] & in_x[None, :])] = fill_value
  out = _to_original(out, geometry)
  return out[..., 0] if squeeze else out
