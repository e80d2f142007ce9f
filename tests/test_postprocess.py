"""Post-processing chosen on validation (cmedl_jax/postprocess.py)."""

import numpy as np

from cmedl_jax import postprocess


def _blobs(big=True, small=True, shape=(20, 20, 10)):
  """Class-1 labels: a 6x6x4 block (144 voxels) and a 2x2x1 speck (4 voxels) apart."""
  out = np.zeros(shape, np.uint8)
  if big:
    out[2:8, 2:8, 2:6] = 1
  if small:
    out[15:17, 15:17, 8] = 1
  return out


def test_components_under_the_volume_are_removed_per_class():
  labels = _blobs()
  labels[10:12, 2:4, 2] = 2  # A 4-voxel component of class 2.
  spacing = (1.0, 1.0, 2.0)  # mm: the speck is 8 mm^3, the block 288 mm^3.
  out = postprocess.remove_small_components(labels, spacing, {1: 10.0})
  np.testing.assert_array_equal(out == 1, _blobs(small=False) == 1)
  assert (out == 2).sum() == 4  # Class 2 not named: kept.
  assert (postprocess.remove_small_components(labels, spacing, {1: 0.0}) == labels).all()
  assert not postprocess.remove_small_components(labels, spacing, {1: 300.0, 2: 9.0}).any()


def test_a_threshold_that_helps_on_validation_is_taken_one_that_hurts_is_refused():
  spacing = (1.0, 1.0, 1.0)
  # The specks are false positives: removing them raises the DSC, so a volume is chosen.
  preds = [_blobs(), _blobs()]
  refs = [_blobs(small=False), _blobs(small=False)]
  record = postprocess.choose(preds, refs, [spacing] * 2, num_classes=2)
  chosen = record['min_volume_mm3']['1']
  assert 4 < chosen <= 144 and record['val_dsc']['1']['chosen'] == 1.0
  assert record['val_dsc']['1']['raw'] < 1.0
  # The specks are real small lesions: removing them lowers the DSC, so nothing is removed.
  record = postprocess.choose(preds, [_blobs(), _blobs()], [spacing] * 2, num_classes=2)
  assert record['min_volume_mm3'] == {'1': 0.0}
  assert record['val_dsc']['1'] == {'raw': 1.0, 'chosen': 1.0}


def test_the_choice_is_stored_and_read_back(tmp_path):
  record = postprocess.choose([_blobs()], [_blobs(small=False)], [(1.0, 1.0, 1.0)], 2)
  postprocess.save(tmp_path, record)
  assert postprocess.load(tmp_path) == {1: record['min_volume_mm3']['1']}
  assert postprocess.load(tmp_path / 'nothing') is None
