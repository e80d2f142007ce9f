"""Figures of an evaluation: box plots of the metrics and contour overlays of chosen cases.

PNG files (100 dpi), written atomically under OUT/plots/. matplotlib is imported on the
first plot, with the file-only Agg backend.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import Sequence

import nibabel as nib
import numpy as np

from cmedl_jax.evaluation import metrics
from data_prep import files
from data_prep import nifti_io

CONTOUR_COLORS = ('red', 'dodgerblue', 'orange', 'magenta')  # Of the 1st, 2nd, ... method.


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save_figure(fig, path: str) -> None:
  """Writes `fig` as PNG (100 dpi, tight bounding box) to `path`, atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  files.atomic_write(path, buf.getvalue())


def _write_png(fig, out_dir: str, name: str) -> str:
  """Saves `fig` as OUT_DIR/plots/NAME and closes it; returns the path."""
  path = os.path.join(out_dir, 'plots', name)
  save_figure(fig, path)
  pyplot().close(fig)
  return path


def plot_boxes(case_rows: Sequence[dict], out_dir: str) -> list[str]:
  """plots/box_<metric>.png: one box per method and class (finite values only)."""
  plt = pyplot()
  groups = list(dict.fromkeys((r['method'], r['class']) for r in case_rows))
  paths = []
  for m in metrics.METRIC_NAMES:
    data, labels = [], []
    for method, cls in groups:
      v = np.array(
        [r[m] for r in case_rows if (r['method'], r['class']) == (method, cls)], np.float64
      )
      finite = v[np.isfinite(v)]
      data.append(finite)
      n_bad = v.size - finite.size
      labels.append(f'{method}\n{cls}' + (f'\n({n_bad} non-finite)' if n_bad else ''))
    fig, ax = plt.subplots(figsize=(max(3.0, 1.6 * len(groups)), 3.6))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel(m + ('' if m in ('dice', 'surface_dice') else ' (mm)'))
    ax.set_title(m)
    paths.append(_write_png(fig, out_dir, f'box_{m}.png'))
  return paths


def canonical(path: str, labels: bool):
  """(array [X, Y, Z] in the closest canonical (RAS) orientation, zooms of X and Y in mm).

  For display: labels rounded to int32, images float32. A 2D file becomes [X, Y, 1] (not
  reoriented); of a 4D file the first volume.
  """
  img, data = nifti_io.read_nifti(path, 'label' if labels else 'image', ndims=(2, 3, 4))
  if data.ndim >= 3:
    img = nib.as_closest_canonical(img.__class__(data, img.affine, img.header))
    data = np.asanyarray(img.dataobj)
  zooms = tuple(float(z) for z in img.header.get_zooms()[:2])
  if data.ndim == 4:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
  return (np.rint(data).astype(np.int32) if labels else data.astype(np.float32)), zooms


def _picks(case_rows: Sequence[dict], method: str) -> dict:
  """{'worst' | 'median' | 'best': (mean DSC over classes, case)} of `method`; {} if no rows."""
  per_case = {}
  for r in case_rows:
    if r['method'] == method:
      per_case.setdefault(r['case'], []).append(r['dice'])
  ranked = sorted((float(np.mean(v)), c) for c, v in per_case.items())
  if not ranked:
    return {}
  return {'worst': ranked[0], 'median': ranked[len(ranked) // 2], 'best': ranked[-1]}


def _slice_index(ref, pred) -> int:
  """Axial slice (last axis) with the largest reference area, else prediction, else middle."""
  area = (ref > 0).sum(axis=(0, 1))
  if not area.any():
    area = (pred > 0).sum(axis=(0, 1))
  return int(np.argmax(area)) if area.any() else ref.shape[2] // 2


def _overlay_figure(image, zooms, ref, preds: dict, k: int, title: str):
  """Slice k of `image` in grey, contours of `ref` (green) and of each of `preds`."""
  plt = pyplot()
  sl = image[:, :, k]
  lo, hi = np.percentile(sl, [1, 99])
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.imshow(
    sl.T,
    cmap='gray',
    origin='lower',
    vmin=lo,
    vmax=hi if hi > lo else lo + 1,
    aspect=zooms[1] / zooms[0],
  )
  for label in np.unique(ref[:, :, k])[1:]:
    ax.contour((ref[:, :, k] == label).T, levels=[0.5], colors='lime', linewidths=1.2)
  colors = [CONTOUR_COLORS[i % len(CONTOUR_COLORS)] for i in range(len(preds))]
  for i, pred in enumerate(preds.values()):
    for label in np.unique(pred[:, :, k])[1:]:
      ax.contour(
        (pred[:, :, k] == label).T,
        levels=[0.5],
        colors=colors[i],
        linewidths=1.0,
        linestyles='solid' if i == 0 else 'dashed',
      )
  legend = ', '.join(f'{c}: {m}' for c, m in zip(colors, preds))
  ax.set_title(f'{title}\ngreen: reference; {legend}', fontsize=8)
  ax.axis('off')
  return fig


def plot_overlays(case_rows, ref_files, pred_sets, image_files, out_dir) -> list[str]:
  """Best, median and worst case (mean DSC over classes) of each method.

  Each PNG shows the axial slice (canonical RAS, last axis) with the largest reference
  area: the image in grey, the reference contour in green and each prediction's contour
  (first method red, second blue, dashed).
  """
  paths = []
  for method in pred_sets:
    for rank, (score, cid) in _picks(case_rows, method).items():
      if cid not in image_files:
        print(f'warning: no image for case {cid}; overlay skipped', file=sys.stderr)
        continue
      image, zooms = canonical(image_files[cid], labels=False)
      ref, _ = canonical(ref_files[cid], labels=True)
      preds = {
        m: canonical(files[cid], labels=True)[0] for m, files in pred_sets.items() if cid in files
      }
      if image.shape != ref.shape:
        raise ValueError(
          f'image {image_files[cid]} shape {image.shape} != reference '
          f'{ref_files[cid]} shape {ref.shape}'
        )
      k = _slice_index(ref, preds[method])
      fig = _overlay_figure(
        image, zooms, ref, preds, k, f'{method} {rank}: {cid} (mean DSC {score:.3f}), slice {k}'
      )
      safe = re.sub(r'[^A-Za-z0-9_.-]', '_', f'overlay_{method}_{rank}_{cid}.png')
      paths.append(_write_png(fig, out_dir, safe))
  return paths
