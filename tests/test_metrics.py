"""Tests of cmedl_jax.evaluation.metrics: closed forms, scipy formulations, surface-distance."""

import math
import warnings

import numpy as np
import pytest
import surface_distance
from scipy import ndimage

from cmedl_jax.evaluation import metrics

SPACING_3D = (0.8, 0.8, 2.5)


def box(shape, lo, hi):
  m = np.zeros(shape, bool)
  m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return m


def sphere(shape, center_mm, radius_mm, spacing):
  grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing='ij')
  return sum((g - c) ** 2 for g, c in zip(grid, center_mm)) <= radius_mm**2


def random_blob(rng, shape, fraction=0.5, sigma=1.5):
  return ndimage.gaussian_filter(rng.random(shape), sigma) > np.quantile(
    ndimage.gaussian_filter(rng.random(shape), sigma), fraction
  )


# --------------------------------------------------------------------------------------
# Bounding box and cropping.


@pytest.mark.parametrize('dtype', [bool, np.uint8, np.int16, np.int32])
@pytest.mark.parametrize('shape', [(7, 9), (5, 6, 7), (16, 8, 8)])
def test_bounding_box_matches_nonzero(dtype, shape):
  rng = np.random.default_rng(0)
  for _ in range(5):
    a = np.zeros(shape, dtype)
    idx = tuple(rng.integers(0, n, size=3) for n in shape)
    a[idx] = 1
    nz = np.nonzero(a)
    expected = tuple((int(i.min()), int(i.max()) + 1) for i in nz)
    assert metrics.bounding_box(a) == expected
    assert metrics.bounding_box(a[::-1]) == metrics.bounding_box(np.ascontiguousarray(a[::-1]))
  assert metrics.bounding_box(np.zeros(shape, dtype)) is None


# --------------------------------------------------------------------------------------
# Closed forms.


def test_dice_shifted_boxes_and_empty():
  ref = box((20, 20, 20), (2, 2, 2), (12, 12, 12))
  pred = box((20, 20, 20), (4, 2, 2), (14, 12, 12))  # shifted by 2: overlap 8/10
  assert metrics.dice(pred, ref) == pytest.approx(0.8)
  assert metrics.dice(ref, ref) == 1.0
  empty = np.zeros_like(ref)
  assert metrics.dice(empty, empty) == 1.0
  assert metrics.dice(empty, ref) == 0.0
  assert metrics.dice(ref, empty) == 0.0


@pytest.mark.parametrize('convention', ['area', 'voxel'])
@pytest.mark.parametrize('axis', [0, 1, 2])
def test_shifted_boxes_hausdorff_anisotropic(convention, axis):
  shape, lo, hi = (24, 24, 16), [4, 4, 3], [16, 14, 10]
  ref = box(shape, lo, hi)
  lo2, hi2 = list(lo), list(hi)
  lo2[axis] += 2
  hi2[axis] += 2
  pred = box(shape, lo2, hi2)
  expected = 2 * SPACING_3D[axis]
  assert metrics.hausdorff(pred, ref, SPACING_3D, 100.0, convention) == pytest.approx(expected)
  # Every surface element is within the shift of the other surface: sDSC at that
  # tolerance is 1, just below it is < 1.
  assert metrics.surface_dice(pred, ref, SPACING_3D, expected, convention) == 1.0
  assert metrics.surface_dice(pred, ref, SPACING_3D, expected * 0.99, convention) < 1.0


@pytest.mark.parametrize('convention', ['area', 'voxel'])
def test_concentric_boxes_hausdorff_is_corner_distance(convention):
  margin = (1, 2, 1)
  inner = box((20, 20, 14), (5, 5, 4), (14, 13, 10))
  outer = box((20, 20, 14), (4, 3, 3), (15, 15, 11))
  expected = math.sqrt(sum((m * s) ** 2 for m, s in zip(margin, SPACING_3D)))
  assert metrics.hausdorff(inner, outer, SPACING_3D, 100.0, convention) == pytest.approx(expected)


def test_tolerance_compared_in_float64():
  # The distance 0.8 mm equals the tolerance; in float32 0.8 becomes 0.80000001 > 0.8.
  ref = box((12, 12, 6), (3, 3, 1), (8, 8, 4))
  pred = box((12, 12, 6), (4, 3, 1), (9, 8, 4))
  for convention in ('area', 'voxel'):
    sd = metrics.surface_distances(pred, ref, SPACING_3D, convention)
    assert sd.pred_to_ref.dtype == np.float64
    assert metrics.surface_dice_from(sd, 0.8) == 1.0
    # Float32 distances against the float64 tolerance would flip (this test can fail).
    assert np.any(sd.pred_to_ref.astype(np.float32) > np.float64(0.8))


def test_concentric_spheres():
  spacing = (0.5, 0.5, 0.5)
  shape = (36, 36, 36)
  center = (8.75, 8.75, 8.75)
  ref = sphere(shape, center, 5.0, spacing)
  pred = sphere(shape, center, 7.0, spacing)  # radii differ by 2 mm
  for convention in ('area', 'voxel'):
    hd95 = metrics.hausdorff(pred, ref, spacing, 95.0, convention)
    assert 1.5 <= hd95 <= 2.6
    assert 1.5 <= metrics.assd(pred, ref, spacing, convention) <= 2.5
    assert metrics.surface_dice(pred, ref, spacing, 3.0, convention) == 1.0
    assert metrics.surface_dice(pred, ref, spacing, 1.0, convention) == 0.0


@pytest.mark.parametrize(
  'shape,spacing,offset', [((9, 11), (0.7, 1.9), (3, -2)), ((9, 11, 7), SPACING_3D, (2, 1, -3))]
)
def test_single_voxels_voxel_convention(shape, spacing, offset):
  a = np.zeros(shape, bool)
  b = np.zeros(shape, bool)
  center = tuple(n // 2 for n in shape)
  a[center] = True
  b[tuple(c + o for c, o in zip(center, offset))] = True
  expected = math.sqrt(sum((o * s) ** 2 for o, s in zip(offset, spacing)))
  assert metrics.hausdorff(a, b, spacing, 95.0, 'voxel') == pytest.approx(expected)
  assert metrics.assd(a, b, spacing, 'voxel') == pytest.approx(expected)
  assert metrics.dice(a, b) == 0.0


@pytest.mark.parametrize('convention', ['area', 'voxel'])
@pytest.mark.parametrize('ndim', [2, 3])
def test_empty_mask_conventions(convention, ndim):
  shape = (10,) * ndim
  spacing = (1.0,) * ndim
  empty = np.zeros(shape, bool)
  full = box(shape, (2,) * ndim, (6,) * ndim)
  pair = metrics.evaluate_pair(empty, empty, spacing, 2.0, convention, convention)
  assert (pair['dice'], pair['surface_dice'], pair['hd95'], pair['hd'], pair['assd']) == (
    1.0,
    1.0,
    0.0,
    0.0,
    0.0,
  )
  for pred, ref in ((empty, full), (full, empty)):
    pair = metrics.evaluate_pair(pred, ref, spacing, 2.0, convention, convention)
    assert pair['dice'] == 0.0 and pair['surface_dice'] == 0.0
    assert pair['hd95'] == math.inf and pair['hd'] == math.inf and pair['assd'] == math.inf
    assert metrics.hausdorff(pred, ref, spacing, 95.0, convention) == math.inf
    assert metrics.surface_dice(pred, ref, spacing, 2.0, convention) == 0.0


def test_identical_masks():
  rng = np.random.default_rng(1)
  m = random_blob(rng, (12, 14, 10))
  pair = metrics.evaluate_pair(m, m, SPACING_3D, 0.0)
  assert pair == pytest.approx(
    {
      'dice': 1.0,
      'surface_dice': 1.0,
      'hd95': 0.0,
      'hd': 0.0,
      'assd': 0.0,
      'pred_volume_mm3': m.sum() * 1.6,
      'ref_volume_mm3': m.sum() * 1.6,
    }
  )


# --------------------------------------------------------------------------------------
# Area convention: against DeepMind's surface-distance (non-empty masks only: its 0.1
# release uses np.Inf, removed in NumPy 2, when a mask is empty).


@pytest.mark.parametrize('ndim', [2, 3])
def test_area_convention_matches_surface_distance(ndim):
  rng = np.random.default_rng(ndim)
  checked = 0
  for trial in range(12):
    shape = tuple(rng.integers(8, 20, size=ndim))
    spacing = tuple(rng.uniform(0.4, 3.0, size=ndim))
    pred = random_blob(rng, shape, fraction=rng.uniform(0.4, 0.9))
    ref = random_blob(rng, shape, fraction=rng.uniform(0.4, 0.9))
    if trial % 3 == 0:  # masks touching the array border
      pred[0] = True
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      theirs = surface_distance.compute_surface_distances(ref, pred, spacing)
    mine = metrics.surface_distances(pred, ref, spacing, 'area')
    np.testing.assert_allclose(mine.ref_to_pred, theirs['distances_gt_to_pred'], atol=1e-4)
    np.testing.assert_allclose(mine.pred_to_ref, theirs['distances_pred_to_gt'], atol=1e-4)
    np.testing.assert_allclose(mine.ref_weights, theirs['surfel_areas_gt'], atol=1e-4)
    np.testing.assert_allclose(mine.pred_weights, theirs['surfel_areas_pred'], atol=1e-4)
    for tol in (0.0, 0.5, 1.0, 2.0, float(spacing[0])):
      assert metrics.surface_dice(pred, ref, spacing, tol) == pytest.approx(
        surface_distance.compute_surface_dice_at_tolerance(theirs, tol), abs=1e-4
      )
    for q in (50.0, 95.0, 100.0):
      assert metrics.hausdorff(pred, ref, spacing, q, 'area') == pytest.approx(
        surface_distance.compute_robust_hausdorff(theirs, q), abs=1e-4
      )
    d_rp, d_pr = surface_distance.compute_average_surface_distance(theirs)
    a_r, a_p = theirs['surfel_areas_gt'].sum(), theirs['surfel_areas_pred'].sum()
    assert metrics.assd(pred, ref, spacing, 'area') == pytest.approx(
      (d_rp * a_r + d_pr * a_p) / (a_r + a_p), abs=1e-4
    )
    assert metrics.dice(pred, ref) == pytest.approx(
      surface_distance.compute_dice_coefficient(ref, pred), abs=1e-12
    )
    checked += 1
  assert checked == 12


# --------------------------------------------------------------------------------------
# Voxel convention: against an independent full-volume scipy formulation (MONAI/medpy).


def voxel_reference(pred, ref, spacing, tolerance):
  """MONAI / medpy: border = mask XOR binary_erosion(mask, face cross), EDT with sampling."""
  structure = ndimage.generate_binary_structure(pred.ndim, 1)
  border_p = pred ^ ndimage.binary_erosion(pred, structure)
  border_r = ref ^ ndimage.binary_erosion(ref, structure)
  d_pr = ndimage.distance_transform_edt(~border_r, sampling=spacing)[border_p]
  d_rp = ndimage.distance_transform_edt(~border_p, sampling=spacing)[border_r]
  return {
    'hd95': max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
    'hd': max(d_pr.max(), d_rp.max()),
    'assd': (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size),
    'surface_dice': (np.sum(d_pr <= tolerance) + np.sum(d_rp <= tolerance))
    / (d_pr.size + d_rp.size),
  }


@pytest.mark.parametrize('ndim', [2, 3])
def test_voxel_convention_matches_scipy_formulation(ndim):
  rng = np.random.default_rng(10 + ndim)
  for trial in range(10):
    shape = tuple(rng.integers(8, 20, size=ndim))
    spacing = tuple(rng.uniform(0.4, 3.0, size=ndim))
    pred = random_blob(rng, shape, fraction=rng.uniform(0.4, 0.9))
    ref = random_blob(rng, shape, fraction=rng.uniform(0.4, 0.9))
    if trial % 3 == 0:
      ref[:, 0] = True  # touching the array border
    if not (pred.any() and ref.any()):
      continue
    tol = float(rng.uniform(0.5, 3.0))
    expected = voxel_reference(pred, ref, spacing, tol)
    got = metrics.evaluate_pair(
      pred, ref, spacing, tol, surface_dice_convention='voxel', distance_convention='voxel'
    )
    for key, value in expected.items():
      assert got[key] == pytest.approx(value, abs=1e-9), key
    assert metrics.surface_dice(pred, ref, spacing, tol, 'voxel') == pytest.approx(
      expected['surface_dice'], abs=1e-12
    )


def test_voxel_border_uses_face_connectivity():
  # A 3D plus sign: its centre has all 6 face neighbours but no diagonal ones, so it is
  # interior with the face cross (MONAI/medpy) and a border voxel with a full 3x3x3.
  m = np.zeros((7, 7, 7), bool)
  m[3, 3, 2:5] = m[3, 2:5, 3] = m[2:5, 3, 3] = True
  sd = metrics.surface_distances(m, m, (1.0, 1.0, 1.0), 'voxel')
  assert sd.pred_to_ref.size == 6  # centre eroded away with the face cross, not with full


# --------------------------------------------------------------------------------------
# Case and per-tumor evaluation.


def test_evaluate_case_matches_per_class_pairs():
  rng = np.random.default_rng(3)
  ref = np.zeros((16, 18, 12), np.uint8)
  ref[random_blob(rng, ref.shape, 0.7)] = 1
  ref[2:6, 2:8, 3:9] = 2
  pred = np.roll(ref, 1, axis=0)
  pred[pred == 2] = 0  # class 2 missing in prediction -> inf distances
  classes = {'tumor': 1, 'organ': 2, 'absent': 3}
  got = metrics.evaluate_case(pred, ref, SPACING_3D, classes, tolerance_mm=1.5)
  assert set(got) == set(classes)
  for name, label in classes.items():
    assert got[name] == metrics.evaluate_pair(pred == label, ref == label, SPACING_3D, 1.5)
  assert got['organ']['hd95'] == math.inf and got['organ']['dice'] == 0.0
  assert got['absent']['dice'] == 1.0 and got['absent']['hd95'] == 0.0


def test_evaluate_tumors_matching_rule():
  shape = (30, 30, 12)
  ref = box(shape, (2, 2, 2), (8, 8, 6)) | box(shape, (18, 18, 4), (24, 26, 9))
  pred = box(shape, (4, 2, 2), (10, 8, 6))  # tumor 1: shifted by 2 -> dice 4/6
  pred |= box(shape, (0, 20, 0), (2, 24, 3))  # false positive, far from both tumors
  rows = metrics.evaluate_tumors(pred, ref, SPACING_3D, 2.0)
  assert [r['tumor'] for r in rows] == [1, 2]
  assert rows[0]['detected'] and rows[0]['n_pred_components'] == 1
  assert rows[0]['dice'] == pytest.approx(4 / 6)
  assert rows[0]['ref_volume_mm3'] == pytest.approx(6 * 6 * 4 * 1.6)
  assert rows[0]['centroid_vox'] == pytest.approx((4.5, 4.5, 3.5))
  assert not rows[1]['detected'] and rows[1]['dice'] == 0.0 and rows[1]['hd95'] == math.inf
  assert rows[1]['ref_volume_mm3'] == pytest.approx(6 * 8 * 5 * 1.6)
  assert metrics.count_false_positive_components(pred, ref) == 1
  assert metrics.evaluate_tumors(pred, np.zeros_like(ref), SPACING_3D) == []


def test_evaluate_tumors_connectivity_and_2d():
  m = np.zeros((10, 10, 10), bool)
  m[2:4, 2:4, 2:4] = True
  m[4:6, 4:6, 4:6] = True  # touches the first cube at a corner only
  assert len(metrics.evaluate_tumors(m, m, (1, 1, 1))) == 1  # full connectivity
  assert len(metrics.evaluate_tumors(m, m, (1, 1, 1), connectivity=1)) == 2
  m2 = np.zeros((12, 12), bool)
  m2[1:4, 1:4] = m2[7:10, 6:11] = True
  rows = metrics.evaluate_tumors(m2, m2, (0.5, 2.0))
  assert [r['dice'] for r in rows] == [1.0, 1.0]
  assert [r['ref_volume_mm3'] for r in rows] == [9.0, 15.0]


def test_bad_input_errors():
  a = np.zeros((4, 4, 4), bool)
  with pytest.raises(ValueError, match='shape'):
    metrics.dice(a, np.zeros((4, 4, 5), bool))
  with pytest.raises(ValueError, match='spacing_mm'):
    metrics.hausdorff(a, a, (1.0, 1.0))
  with pytest.raises(ValueError, match='convention'):
    metrics.surface_distances(a, a, (1, 1, 1), 'mesh')
  with pytest.raises(ValueError, match='2D or 3D'):
    metrics.surface_distances(np.zeros(4, bool), np.zeros(4, bool), (1.0,))
