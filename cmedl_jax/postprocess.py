"""Post-processing chosen on validation, as nnU-Net chooses its own.

Per foreground class, the connected components (26-connected, scipy.ndimage) of the predicted
labels smaller than a volume in mm^3 become background. At the end of training the volume is
chosen per class among CANDIDATES_MM3 on the run's validation volumes and kept only if it raises
their mean DSC by at least MIN_GAIN_DSC (else 0: nothing removed); the choice is stored in
WORKDIR/postprocessing.json and `cmedl_jax.predict` applies it (switch off: --no-postprocessing).
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import ndimage

from cmedl_jax.evaluation import metrics
from data_prep import files

FILE = 'postprocessing.json'
CANDIDATES_MM3 = (0.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)  # [ours]
MIN_GAIN_DSC = 1e-3  # [ours] a gain smaller than this keeps the raw prediction.


def remove_small_components(labels, spacing_mm, min_volume_mm3):
  """labels [X,Y,Z] int with voxel spacing (mm, per axis) -> a copy where the components of
  class k smaller than min_volume_mm3[k] mm^3 are 0. Classes not named are kept."""
  out = np.array(labels, copy=True)
  voxel_mm3 = float(np.prod(spacing_mm))
  for k, volume in min_volume_mm3.items():
    if volume <= 0:
      continue
    components, n = ndimage.label(out == int(k), np.ones((3,) * out.ndim, bool))
    if n == 0:
      continue
    sizes = np.bincount(components.ravel())[1:] * voxel_mm3
    small = np.flatnonzero(sizes < volume) + 1
    out[np.isin(components, small)] = 0
  return out


def choose(predictions, references, spacings, num_classes, candidates=CANDIDATES_MM3):
  """The record of the per-class minimum component volumes that maximise the mean DSC of
  `predictions` against `references` (lists of label volumes, spacings in mm), each kept only
  if it gains MIN_GAIN_DSC over none: {'min_volume_mm3': {class: mm3}, 'val_dsc': {class:
  {'raw', 'chosen'}}, 'candidates_mm3', 'volumes'}."""
  chosen, dsc = {}, {}
  for k in range(1, num_classes):
    mean = {}
    for volume in candidates:
      values = [
        metrics.dice(remove_small_components(p, s, {k: volume}) == k, r == k)
        for p, r, s in zip(predictions, references, spacings)
      ]
      mean[volume] = float(np.mean(values))
    best = max(candidates, key=lambda v: (mean[v], -v))  # Ties: the smaller volume.
    raw = mean.get(0.0, mean[min(candidates)])
    keep = best if mean[best] >= raw + MIN_GAIN_DSC else 0.0
    chosen[str(k)] = float(keep)
    dsc[str(k)] = {'raw': raw, 'chosen': mean[keep] if keep in mean else raw}
  return {
    'min_volume_mm3': chosen,
    'val_dsc': dsc,
    'candidates_mm3': list(candidates),
    'volumes': len(predictions),
  }


def save(workdir, record):
  files.write_json(os.path.join(workdir, FILE), record, indent=2, sort_keys=True)


def load(workdir):
  """The stored choice {class int: mm3}, or None when the run has none."""
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return {int(k): float(v) for k, v in json.load(f)['min_volume_mm3'].items()}
