"""Synthetic thorax CT / T2w MRI and abdominal T1w / T2w MRI phantoms with known labels.

Writes unpaired datasets (and, on request, paired renderings: below) in the Medical Segmentation
Decathlon / nnU-Net v2 layout:

  OUT/dataset.json                   nnU-Net v2 keys + MSD keys + a "phantom" block (written last)
  OUT/imagesTr/{case}_0000.nii.gz    CT int16 HU / MRI uint16 (arbitrary positive scale)
  OUT/labelsTr/{case}.nii.gz         uint8; thorax {0 background, 1 tumor},
                                     abdomen {0, 1 liver, 2 spleen, 3 kidney_left, 4 kidney_right}
  OUT/imagesTs/, OUT/labelsTs/       held-out cases, same naming
  OUT/tissuesTr|Ts/{case}.nii.gz     uint8 tissue classes (TISSUES), research ground truth
  OUT/instancesTr|Ts/{case}.nii.gz   uint8 tumor instance ids (thorax kinds only)
  OUT/phantom_meta/{case}.json       per-case ground truth: tumors (centre in world mm,
                                     diameter, type), tissue table, nominal intensities, noise

CLI:  python -m data_prep.phantoms --kind thorax_ct --n 20 --seed 0 --out data/phantoms/thorax_ct
      [--paired-out DIR]  thorax kinds: the same patients rendered in the other thorax modality

Anatomy is an analytic function of world coordinates (RAS+, mm; patient roughly at the origin,
random smooth deformation per patient), evaluated at every voxel's world position from the
on-disk affine, so an LPS-stored volume reoriented to RAS shows the anatomy where an RAS-stored
one does. Each output slice averages `Z_SUPERSAMPLE` thin sub-slices (slice profile / partial
volume) and is blurred in-plane (PSF) before noise. Every case is a different random patient:
case i of a kind is drawn from SeedSequence([seed, kind index, i]). A paired rendering
(generate_paired, --paired-out) reuses a case's anatomy (_Anatomy: grid, affine, labels, tissue
and instance maps) and draws its own look, tumor values, noise and bias from paired_seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import files

GENERATOR_VERSION = '1.0.0'
KINDS = ('thorax_ct', 'thorax_t2w', 'abdomen_t1w', 'abdomen_t2w')

# Tissue classes of the tissue maps (uint8). Same table for every kind.
TISSUES = {
  'background': 0,
  'fat': 1,
  'muscle': 2,
  'lung': 3,
  'mediastinum': 4,
  'heart': 5,
  'aorta': 6,
  'bone': 7,
  'tumor': 8,
  'liver': 9,
  'spleen': 10,
  'kidney_left': 11,
  'kidney_right': 12,
  'lung_vessel': 13,
  'csf': 14,
  'gas': 15,
  'bowel': 16,
  'fluid': 17,
  'vein': 18,
}
_T = TISSUES
THORAX_LABELS = {'background': 0, 'tumor': 1}
ABDOMEN_LABELS = {'background': 0, 'liver': 1, 'spleen': 2, 'kidney_left': 3, 'kidney_right': 4}
TUMOR_TYPES = ('peripheral', 'juxta_mediastinal')

# Per-patient nominal tissue values are drawn uniformly from these ranges. CT: HU. MRI: relative
# signal before the bias field (about 0.75-1.33) and the random global scale (meta "mri_scale").
# Juxta-mediastinal CT tumors: mediastinum + U(-6, 6) HU; heart: mediastinum + U(-2, 4) HU.
# No consistent cue separates such a tumor from the mediastinum on CT; `juxta_offset_hu`
# (write_dataset, --juxta-offset-hu) can give one, e.g. (10, 15) for the study's premise
# factorial (docs/STUDY_PLAN.md), still within the per-voxel noise (12-22 HU).
JUXTA_OFFSET_HU = (-6.0, 6.0)
TISSUE_RANGES = {
  'thorax_ct': {
    'background': (-1000, -1000),
    'fat': (-120, -80),
    'muscle': (35, 60),
    'lung': (-870, -820),
    'mediastinum': (30, 50),
    'aorta': (40, 200),
    'bone': (250, 700),
    'csf': (5, 20),
    'gas': (-1000, -960),
    'lung_vessel': (30, 50),
    'tumor_peripheral': (0, 60),
  },
  'thorax_t2w': {
    'background': (0, 0),
    'fat': (0.55, 0.75),
    'muscle': (0.10, 0.18),
    'lung': (0.02, 0.05),
    'mediastinum': (0.25, 0.35),
    'heart': (0.08, 0.15),
    'aorta': (0.03, 0.08),
    'bone': (0.25, 0.40),
    'csf': (0.90, 1.00),
    'gas': (0.0, 0.02),
    'lung_vessel': (0.04, 0.08),
    'tumor': (0.60, 0.85),
  },
  'abdomen_t1w': {
    'background': (0, 0),
    'fat': (0.80, 0.95),
    'muscle': (0.25, 0.35),
    'liver': (0.45, 0.60),
    'spleen': (0.30, 0.40),
    'kidney_left': (0.35, 0.45),
    'kidney_right': (0.35, 0.45),
    'bone': (0.50, 0.70),
    'csf': (0.05, 0.12),
    'aorta': (0.10, 0.20),
    'vein': (0.10, 0.20),
    'bowel': (0.15, 0.35),
    'fluid': (0.05, 0.12),
    'gas': (0.0, 0.02),
  },
  'abdomen_t2w': {
    'background': (0, 0),
    'fat': (0.55, 0.75),
    'muscle': (0.08, 0.14),
    'liver': (0.15, 0.25),
    'spleen': (0.40, 0.55),
    'kidney_left': (0.45, 0.60),
    'kidney_right': (0.45, 0.60),
    'bone': (0.30, 0.45),
    'csf': (0.90, 1.00),
    'aorta': (0.03, 0.08),
    'vein': (0.05, 0.10),
    'bowel': (0.30, 0.60),
    'fluid': (0.85, 1.00),
    'gas': (0.0, 0.02),
  },
}
CT_NOISE_HU = (12.0, 22.0)  # Gaussian noise sigma (HU), per case.
MRI_NOISE_REL = (0.015, 0.035)  # Rician sigma relative to the unscaled signal.
MRI_SCALE = (300.0, 2000.0)  # Random positive global intensity scale per MRI case.
Z_SUPERSAMPLE = 3  # Sub-slices averaged per output slice (slice profile).


@dataclasses.dataclass(frozen=True)
class Grid:
  """Voxel grid of one kind: in-plane `size` x `size` at `spacing` mm, `slices` at
  `slice_spacing` mm, stored in `orientation` (axis codes of nib.aff2axcodes)."""

  size: int
  spacing: float
  slices: int
  slice_spacing: float
  orientation: str

  @property
  def shape(self):
    return (self.size, self.size, self.slices)

  @property
  def zooms(self):
    return (self.spacing, self.spacing, self.slice_spacing)


DEFAULT_GRIDS = {
  'thorax_ct': Grid(160, 2.4, 48, 3.0, 'RAS'),
  'thorax_t2w': Grid(144, 2.8, 28, 5.0, 'LPS'),
  'abdomen_t1w': Grid(160, 2.5, 36, 4.0, 'LAS'),
  'abdomen_t2w': Grid(144, 2.8, 30, 5.0, 'LPS'),
}
_MODALITY = {
  'thorax_ct': ('CT', 'CT'),
  'thorax_t2w': ('T2', 'MRI'),
  'abdomen_t1w': ('T1', 'MRI'),
  'abdomen_t2w': ('T2', 'MRI'),
}
_DESCRIPTIONS = {
  'thorax_ct': 'Synthetic thorax CT (HU) with lobulated lung tumors, peripheral and '
  'juxta-mediastinal (near-mediastinal HU).',
  'thorax_t2w': 'Synthetic thorax T2-weighted MRI (unpaired patients) with bright lung tumors.',
  'abdomen_t1w': 'Synthetic abdominal T1-weighted MRI: liver, spleen, kidneys.',
  'abdomen_t2w': 'Synthetic abdominal T2-weighted MRI: liver, spleen, kidneys.',
}


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f'unknown phantom kind {kind!r}; choose one of {", ".join(KINDS)}')


def make_grid(kind, size=None, spacing=None, slices=None, slice_spacing=None) -> Grid:
  """The default grid of `kind` with any of its fields overridden. Raises ValueError."""
  _check_kind(kind)
  g = DEFAULT_GRIDS[kind]
  g = Grid(
    int(size if size is not None else g.size),
    float(spacing if spacing is not None else g.spacing),
    int(slices if slices is not None else g.slices),
    float(slice_spacing if slice_spacing is not None else g.slice_spacing),
    g.orientation,
  )
  if g.size < 16 or g.slices < 2:
    raise ValueError(f'grid too small: size {g.size} (min 16), slices {g.slices} (min 2)')
  if not (0.2 <= g.spacing <= 10.0 and 0.2 <= g.slice_spacing <= 20.0):
    raise ValueError(
      f'spacing {g.spacing} mm / slice spacing {g.slice_spacing} mm out of '
      'range (0.2-10 / 0.2-20 mm)'
    )
  return g


def grid_affine(grid: Grid, center_mm) -> np.ndarray:
  """4x4 voxel->world (RAS+ mm) affine of an axis-aligned grid in `grid.orientation` whose
  central voxel position is `center_mm`."""
  signs = []
  for axis, code in enumerate(grid.orientation):
    pos, neg = 'RAS'[axis], 'LPI'[axis]
    if code not in (pos, neg):
      raise ValueError(f'orientation {grid.orientation!r}: axis {axis} must be {pos} or {neg}')
    signs.append(1.0 if code == pos else -1.0)
  lin = np.diag(np.array(signs) * np.array(grid.zooms))
  aff = np.eye(4)
  aff[:3, :3] = lin
  aff[:3, 3] = np.asarray(center_mm, float) - lin @ ((np.array(grid.shape) - 1) / 2.0)
  return aff


def _fine_axes(affine, shape, k):
  """World coordinates (mm) of an axis-aligned grid with each slice split into k sub-slices.
  Returns x (nx,1,1), y (1,ny,1), z (1,1,nz*k) float32; sub-slice f lies at slice index
  (f + 0.5) / k - 0.5."""
  nx, ny, nz = shape
  x = affine[0, 0] * np.arange(nx) + affine[0, 3]
  y = affine[1, 1] * np.arange(ny) + affine[1, 3]
  zi = (np.arange(nz * k) + 0.5) / k - 0.5
  z = affine[2, 2] * zi + affine[2, 3]
  f32 = np.float32
  return (x.astype(f32)[:, None, None], y.astype(f32)[None, :, None], z.astype(f32)[None, None, :])


def _world_to_fine_index(affine, k, pts):
  """(N,3) world mm -> (N,3) float fine-grid indices (inverse of `_fine_axes`)."""
  i = (pts[:, 0] - affine[0, 3]) / affine[0, 0]
  j = (pts[:, 1] - affine[1, 3]) / affine[1, 1]
  kk = ((pts[:, 2] - affine[2, 3]) / affine[2, 2] + 0.5) * k - 0.5
  return np.stack([i, j, kk], axis=1)


# ----------------------------------------------------------------------------- shapes


def _se(u, v, p):
  """Superellipse value |u|^p + |v|^p for p in {2, 3, 4} (inside: < 1)."""
  if p == 2:
    return u * u + v * v
  au, av = np.abs(u), np.abs(v)
  if p == 3:
    return au * u * u + av * v * v
  u2, v2 = u * u, v * v
  return u2 * u2 + v2 * v2


def _ellipsoid(X, Y, Z, c, r, angle=0.0):
  """Inside of an ellipsoid with centre c, radii r (mm), rotated by `angle` rad about z."""
  dx, dy = X - c[0], Y - c[1]
  if angle:
    ca, sa = np.cos(angle), np.sin(angle)
    dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
  dz = Z - c[2]
  return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2 < 1.0


def _tube(X, Y, Z, p0, p1, radius):
  """Inside of a capsule of `radius` mm around the segment p0-p1."""
  p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
  d = p1 - p0
  t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / float(d @ d)
  t = np.clip(t, 0.0, 1.0)
  ex, ey, ez = X - p0[0] - t * d[0], Y - p0[1] - t * d[1], Z - p0[2] - t * d[2]
  return ex * ex + ey * ey + ez * ez < radius * radius


class _Deformation:
  """Smooth random displacement (mm): dx depends on (y, z), dy on (x, z), dz on (x, y), so it
  is cheap on broadcast grids. Amplitudes 2-6 mm, wavelengths 150-400 mm."""

  def __init__(self, rng):
    self.terms = []
    for _ in range(3):
      amp = rng.uniform(2.0, 6.0, 2)
      k = 2 * np.pi / rng.uniform(150.0, 400.0, (2, 2)) * rng.choice([-1, 1], (2, 2))
      phase = rng.uniform(0, 2 * np.pi, 2)
      self.terms.append((amp, k, phase))

  def __call__(self, x, y, z):
    def field(i, a, b):
      amp, k, ph = self.terms[i]
      return sum(
        np.float32(amp[j])
        * np.sin(np.float32(k[j, 0]) * a + np.float32(k[j, 1]) * b + np.float32(ph[j]))
        for j in range(2)
      )

    return x + field(0, y, z), y + field(1, x, z), z + field(2, x, y)


class _Body:
  """Shared trunk model: skin/fat, muscle wall, a cavity, spine and ribs (world RAS mm)."""

  def __init__(self, rng, abdomen):
    u = rng.uniform
    self.deform = _Deformation(rng)
    self.a_b, self.b_b = u(140, 168), u(100, 128)
    self.t_f = u(10, 35) if abdomen else u(6, 22)
    self.t_m = u(8, 14)
    self.taper = u(-0.08, -0.02) if not abdomen else u(-0.03, 0.03)
    self.a_c = self.a_b - self.t_f - self.t_m - (0 if abdomen else 10)
    y_ant = self.b_b - self.t_f - self.t_m - (0 if abdomen else 8)
    y_post = -self.b_b + self.t_f + (50 if abdomen else 45)
    self.b_c, self.y_c = (y_ant - y_post) / 2, (y_ant + y_post) / 2
    self.y_ant, self.y_post = y_ant, y_post
    self.r_v = u(18, 23) if abdomen else u(16, 21)
    self.y_vb = y_post + (self.r_v if abdomen else 0.2 * self.r_v)
    self.r_canal = u(6, 8)
    self.y_canal = self.y_vb - self.r_v - self.r_canal - 2
    self.rib_period, self.rib_phase = u(28, 34), u(0, 2 * np.pi)
    self.rib_slope = u(0.3, 0.5)

  def coords(self, x, y, z):
    X, Y, Z = self.deform(x, y, z)
    s = 1.0 + np.float32(self.taper / 100.0) * Z
    return X, Y, Z, s

  def paint(self, t, X, Y, Z, s, ribs_below=None):
    """Writes fat, muscle, cavity placeholder (returned mask), ribs and spine into `t`."""
    body = _se(X / (self.a_b * s), Y / (self.b_b * s), 3) < 1
    t[body] = _T['fat']
    inner = _se(X / ((self.a_b - self.t_f) * s), Y / ((self.b_b - self.t_f) * s), 3) < 1
    t[inner] = _T['muscle']
    cav_val = _se(X / (self.a_c * s), (Y - self.y_c) / (self.b_c * s), 3)
    cavity = cav_val < 1
    outer = (1.0 + 11.0 / min(self.a_c, self.b_c)) ** 3
    ring = (cav_val >= 1) & (cav_val < outer) & inner
    phase = (Z + self.rib_slope * (Y - self.y_vb)) * np.float32(2 * np.pi / self.rib_period)
    band = np.cos(phase + np.float32(self.rib_phase)) > 0.45
    gaps = (np.abs(X) < 22) & ((Y > 0) | (Y < self.y_vb))
    ribs = ring & band & ~gaps
    if ribs_below is not None:
      ribs &= Z > ribs_below
    t[ribs] = _T['bone']
    sternum = ring & (np.abs(X) < 16) & (Y > self.y_c)
    if ribs_below is None:
      t[sternum] = _T['bone']
    return cavity

  def paint_spine(self, t, X, Y, Z):
    dx = X * X
    vb = dx + (Y - self.y_vb) ** 2 < self.r_v**2
    margin = dx + (Y - self.y_vb) ** 2 < (self.r_v + 5) ** 2
    canal_d2 = dx + (Y - self.y_canal) ** 2
    arch = canal_d2 < (self.r_canal + 5) ** 2
    spinous = (np.abs(X) < 5) & (Y < self.y_canal) & (Y > self.y_canal - 35)
    transverse = (np.abs(Y - self.y_canal - 2) < 5) & (np.abs(X) < self.r_v + 14)
    t[margin & (t != _T['fat']) & (t != _T['background'])] = _T['muscle']
    t[vb | arch | spinous | transverse] = _T['bone']
    t[canal_d2 < self.r_canal**2] = _T['csf']
    return margin


class _Thorax:
  """One random thorax (world RAS mm): lungs, mediastinum, heart, aorta, airways, spine, ribs."""

  def __init__(self, rng):
    u = rng.uniform
    self.body = b = _Body(rng, abdomen=False)
    self.x_m = u(-15, -5)
    self.w_post, self.w_ant = u(22, 30), u(28, 40)
    self.heart_c = (self.x_m - u(10, 25), b.y_c + u(10, 25), u(-85, -60))
    self.heart_r = (u(50, 62), u(42, 52), u(50, 60))
    self.peri = u(6, 9)
    self.r_a = u(11, 14)
    self.z_arch = u(40, 60)
    self.asc = (self.x_m + u(15, 25), b.y_c + u(15, 30))
    self.desc = (-u(18, 26), b.y_vb + u(0, 10))
    self.trachea = (self.x_m + u(8, 14), b.y_vb + b.r_v + u(14, 20))
    self.r_tr, self.z_car = u(8, 10), u(10, 30)
    self.bronchus_dx = u(30, 40)

  def mediastinum_half_width(self, Y):
    b = self.body
    w = (Y - b.y_post) / (b.y_ant - b.y_post)
    return self.w_post + (self.w_ant - self.w_post) * np.clip(w, 0, 1)

  def tissues(self, x, y, z):
    """uint8 tissue classes at world points (broadcastable arrays), no vessels / tumors."""
    b = self.body
    X, Y, Z, s = b.coords(x, y, z)
    shape = np.broadcast_shapes(np.shape(X), np.shape(Y), np.shape(Z))
    X, Y, Z = (np.broadcast_to(a, shape) for a in (X, Y, Z))
    t = np.zeros(shape, np.uint8)
    cavity = b.paint(t, X, Y, Z, s)
    t[cavity] = _T['lung']
    # Mediastinum: a column from the spine to the sternum, the pericardium, great vessels.
    column = (np.abs(X - self.x_m) < self.mediastinum_half_width(Y)) & (Y > b.y_vb)
    hc, hr, pr = self.heart_c, self.heart_r, self.peri
    heart = _ellipsoid(X, Y, Z, hc, hr)
    shell = _ellipsoid(X, Y, Z, hc, (hr[0] + pr, hr[1] + pr, hr[2] + pr))
    asc, desc, za = self.asc, self.desc, self.z_arch
    aorta = (
      _tube(X, Y, Z, (*asc, -300), (*asc, za), self.r_a)
      | _tube(X, Y, Z, (*asc, za), (*desc, za), self.r_a)
      | _tube(X, Y, Z, (*desc, za), (*desc, -300), self.r_a * 0.85)
    )
    aorta_wall = (
      _tube(X, Y, Z, (*asc, -300), (*asc, za), self.r_a + 5)
      | _tube(X, Y, Z, (*asc, za), (*desc, za), self.r_a + 5)
      | _tube(X, Y, Z, (*desc, za), (*desc, -300), self.r_a * 0.85 + 5)
    )
    tr, zc = self.trachea, self.z_car
    airway = (
      _tube(X, Y, Z, (*tr, zc), (*tr, 400), self.r_tr)
      | _tube(X, Y, Z, (*tr, zc), (tr[0] + self.bronchus_dx, tr[1] + 5, zc - 25), 6.5)
      | _tube(X, Y, Z, (*tr, zc), (tr[0] - self.bronchus_dx, tr[1] + 5, zc - 25), 6.0)
    )
    airway_wall = _tube(X, Y, Z, (*tr, zc), (*tr, 400), self.r_tr + 4)
    med = cavity & (column | shell | aorta_wall | airway_wall)
    t[med] = _T['mediastinum']
    t[cavity & heart] = _T['heart']
    t[cavity & aorta] = _T['aorta']
    t[cavity & airway] = _T['gas']
    b.paint_spine(t, X, Y, Z)
    return t


class _Abdomen:
  """One random upper abdomen (world RAS mm): liver, spleen, kidneys, vessels, bowel, spine."""

  def __init__(self, rng):
    u = rng.uniform
    self.body = b = _Body(rng, abdomen=True)
    self.liver_c = (u(45, 65), b.y_c + u(-5, 15), u(25, 50))
    self.liver_r = (u(75, 95), u(70, 90), u(70, 90))
    self.liver_cut = (u(0.6, 1.0), u(60, 75))
    self.spleen_c = (-u(75, 92), b.y_c - u(20, 40), u(20, 45))
    self.spleen_r = (u(20, 28), u(45, 60), u(40, 55))
    self.spleen_angle = np.deg2rad(u(-50, -30))
    zl = u(-25, 0)
    self.kid = {
      'kidney_left': ((-u(55, 70), b.y_vb + u(0, 10), zl), np.deg2rad(u(20, 40))),
      'kidney_right': ((u(55, 70), b.y_vb + u(0, 10), zl - u(5, 20)), -np.deg2rad(u(20, 40))),
    }
    self.kid_r = (u(22, 28), u(20, 26), u(45, 60))
    self.aorta = (-u(10, 18), b.y_vb + b.r_v + u(8, 14), u(9, 12))
    self.ivc = (u(18, 28), b.y_vb + b.r_v + u(8, 14), u(12, 16), u(8, 11))
    self.stomach_c = (-u(35, 55), b.y_c + u(25, 45), u(35, 55))
    self.stomach_r = (u(35, 50), u(25, 35), u(30, 45))
    self.gb = (self.liver_c[0] - u(0, 20), self.liver_c[1] + u(30, 45), self.liver_c[2] - u(45, 60))
    self.psoas = (u(10, 14), u(0.10, 0.16))

  def kidney_masks(self, X, Y, Z):
    """{name: (kidney, inner medulla)} masks."""
    out = {}
    for name, (c, ang) in self.kid.items():
      r = self.kid_r
      k = _ellipsoid(X, Y, Z, c, r, ang)
      side = -1.0 if c[0] > 0 else 1.0  # hilum faces the midline and forwards
      hil = (c[0] + side * 0.85 * r[0] * np.cos(ang), c[1] + 0.5 * r[1], c[2])
      k &= ~_ellipsoid(X, Y, Z, hil, (0.5 * r[0], 0.45 * r[1], 0.45 * r[2]))
      inner = k & _ellipsoid(X, Y, Z, c, (0.6 * r[0], 0.6 * r[1], 0.7 * r[2]), ang)
      out[name] = (k, inner)
    return out

  def tissues(self, x, y, z, with_inner=False):
    b = self.body
    X, Y, Z, s = b.coords(x, y, z)
    shape = np.broadcast_shapes(np.shape(X), np.shape(Y), np.shape(Z))
    X, Y, Z = (np.broadcast_to(a, shape) for a in (X, Y, Z))
    t = np.zeros(shape, np.uint8)
    cavity = b.paint(t, X, Y, Z, s, ribs_below=-10.0)
    retro = Y < b.y_vb + b.r_v + 18
    t[cavity & retro] = _T['fat']
    t[cavity & ~retro] = _T['bowel']
    stomach = cavity & _ellipsoid(X, Y, Z, self.stomach_c, self.stomach_r)
    t[stomach] = _T['bowel']
    t[stomach & (Y > self.stomach_c[1] + 0.55 * self.stomach_r[1])] = _T['gas']
    lc, (kappa, cut) = self.liver_c, self.liver_cut
    liver = cavity & _ellipsoid(X, Y, Z, lc, self.liver_r) & (X + kappa * (Y - lc[1]) > lc[0] - cut)
    t[liver] = _T['liver']
    t[cavity & _ellipsoid(X, Y, Z, self.gb, (14, 12, 24))] = _T['fluid']
    spleen = cavity & _ellipsoid(X, Y, Z, self.spleen_c, self.spleen_r, self.spleen_angle)
    t[spleen] = _T['spleen']
    inner_all = np.zeros(shape, bool)
    for name, (k, inner) in self.kidney_masks(X, Y, Z).items():
      t[cavity & k] = _T[name]
      inner_all |= cavity & inner
    ax, ay, ar = self.aorta
    t[cavity & ((X - ax) ** 2 + (Y - ay) ** 2 < ar * ar)] = _T['aorta']
    vx, vy, vrx, vry = self.ivc
    t[cavity & (((X - vx) / vrx) ** 2 + ((Y - vy) / vry) ** 2 < 1)] = _T['vein']
    r_ps = self.psoas[0] + self.psoas[1] * np.maximum(0.0, 20.0 - Z)
    psoas = (((np.abs(X) - (b.r_v + r_ps)) / r_ps) ** 2 + ((Y - b.y_vb) / (r_ps * 1.2)) ** 2) < 1
    t[cavity & psoas] = _T['muscle']
    b.paint_spine(t, X, Y, Z)
    if with_inner:
      return t, inner_all & (t >= _T['kidney_left']) & (t <= _T['kidney_right'])
    return t


# ----------------------------------------------------------------------------- vessels & tumors


def _lung_vessel_points(model: _Thorax, rng, z_range):
  """Branching vessel trees grown from both hila. Returns (N,3) world points, (N,) radii mm,
  keeping only the parts of branches that stay inside lung."""
  b = model.body
  segs = []  # (points (n,3), radius, parent index)
  for side in (1.0, -1.0):
    hx = model.x_m + side * (model.mediastinum_half_width(np.float32(b.y_c)) + 3)
    for _ in range(int(rng.integers(10, 14))):
      start = np.array([hx, b.y_c + rng.uniform(-25, 20), rng.uniform(*z_range) * 0.6], np.float64)
      d = np.array([side, rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)])
      stack = [(start, d / np.linalg.norm(d), rng.uniform(3.0, 4.5), -1)]
      while stack:
        p, d, r, parent = stack.pop()
        n = int(rng.uniform(18, 40) / 1.5)
        steps = d + np.cumsum(rng.normal(0, 0.06, (n, 3)), axis=0)
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        pts = p + np.cumsum(steps * 1.5, axis=0)
        segs.append((pts, r, parent))
        me = len(segs) - 1
        if r * 0.72 >= 0.5:
          end_d = steps[-1]
          for sgn in (1, -1):
            turn = rng.normal(0, 1, 3)
            turn -= turn @ end_d * end_d
            nd = end_d + sgn * 0.6 * turn / (np.linalg.norm(turn) + 1e-9)
            stack.append((pts[-1], nd / np.linalg.norm(nd), r * rng.uniform(0.65, 0.8), me))
  allp = np.concatenate([s[0] for s in segs])
  lung = model.tissues(*(allp[:, i].astype(np.float32) for i in range(3))) == _T['lung']
  keep_pts, keep_r, alive, offset = [], [], [], 0
  for pts, r, parent in segs:
    ok = lung[offset : offset + len(pts)]
    offset += len(pts)
    n_ok = len(pts) if ok.all() else int(np.argmin(ok))
    live = (parent < 0 or alive[parent]) and n_ok == len(pts)
    alive.append(live)
    if parent >= 0 and not alive[parent]:
      continue
    keep_pts.append(pts[:n_ok])
    keep_r.append(np.full(n_ok, r))
  return np.concatenate(keep_pts), np.concatenate(keep_r)


def _stamp_vessels(shape, affine, k, pts, radii):
  """Soft tube occupancy in [0,1] on the fine grid from centre points (world mm) and radii.
  Sub-voxel vessels are widened to half a voxel with proportionally lower occupancy."""
  sx, sy = abs(affine[0, 0]), abs(affine[1, 1])
  sz = abs(affine[2, 2]) / k
  occ = np.zeros(shape, np.float32)
  idx = _world_to_fine_index(affine, k, pts)
  h = 0.5 * min(sx, sy)
  for r_class in np.unique(np.round(radii, 1)):
    sel = np.abs(radii - r_class) < 0.05 + 1e-9
    r_eff = max(r_class, h)
    amp = min(1.0, (r_class / r_eff) ** 2)
    ext = r_eff + h
    ox = np.arange(-int(np.ceil(ext / sx)), int(np.ceil(ext / sx)) + 1)
    oy = np.arange(-int(np.ceil(ext / sy)), int(np.ceil(ext / sy)) + 1)
    oz = np.arange(-int(np.ceil(ext / sz)), int(np.ceil(ext / sz)) + 1)
    off = np.stack(np.meshgrid(ox, oy, oz, indexing='ij'), -1).reshape(-1, 3)
    base = np.round(idx[sel]).astype(np.int64)
    vox = base[:, None, :] + off[None]
    frac = (vox - idx[sel][:, None, :]) * np.array([sx, sy, sz])
    dist = np.sqrt((frac**2).sum(-1))
    val = (np.clip((r_eff - dist) / (2 * h) + 0.5, 0, 1) * amp).astype(np.float32)
    inside = np.all((vox >= 0) & (vox < np.array(shape)), axis=-1) & (val > 0)
    flat = np.ravel_multi_index(tuple(vox[inside].T), shape)
    np.maximum.at(occ.reshape(-1), flat, val[inside])
  return occ


@dataclasses.dataclass
class _Tumor:
  center: np.ndarray  # world mm
  radius: float  # nominal (mm)
  kind: str  # TUMOR_TYPES
  coef: np.ndarray  # lobulation amplitudes
  order: np.ndarray  # Chebyshev orders (2..4)
  axes: np.ndarray  # (J,3) unit vectors

  def max_radius(self):
    return self.radius * (1 + np.abs(self.coef).sum())

  def inside(self, X, Y, Z):
    """Lobulated sphere: |p-c| < r (1 + sum_j a_j T_lj(u . w_j)), u the unit direction."""
    dx, dy, dz = X - self.center[0], Y - self.center[1], Z - self.center[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    rad = np.ones_like(dist)
    for a, l, w in zip(self.coef, self.order, self.axes):
      cos = (dx * w[0] + dy * w[1] + dz * w[2]) / dist
      rad += np.float32(a) * np.cos(l * np.arccos(np.clip(cos, -1, 1)))
    return dist < self.radius * rad


def _random_tumor(rng, center, radius, kind):
  j = 3
  axes = rng.normal(0, 1, (j, 3))
  axes /= np.linalg.norm(axes, axis=1, keepdims=True)
  coef = rng.uniform(0.04, 0.10, j) * rng.choice([-1, 1], j)
  return _Tumor(np.asarray(center, float), float(radius), kind, coef, rng.integers(2, 5, j), axes)


def _fibonacci_sphere(n):
  i = np.arange(n) + 0.5
  phi = np.arccos(1 - 2 * i / n)
  theta = np.pi * (1 + 5**0.5) * i
  return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


_SHELL = _fibonacci_sphere(96)


def _place_tumors(model: _Thorax, rng, z_lim, types):
  """Places one tumor per entry of `types` (diameters log-uniform 10-50 mm). Peripheral: the
  whole tumor plus a 3 mm margin in lung. Juxta-mediastinal: centre just lateral of the
  mediastinal surface, so it overlaps and touches mediastinum/heart, and nothing else but lung.
  Returns a list of _Tumor (fewer if no room was found)."""
  b = model.body
  placed = []
  for kind in types:
    for attempt in range(6):
      diam = np.exp(rng.uniform(np.log(10.0), np.log(50.0))) * (0.85**attempt)
      r = diam / 2
      reach = r * 1.25
      zlo, zhi = z_lim[0] + reach, z_lim[1] - reach
      if zhi <= zlo:
        continue
      n = 64
      if kind == 'peripheral':
        cand = np.stack(
          [
            rng.uniform(-b.a_c, b.a_c, n),
            rng.uniform(b.y_post, b.y_ant, n),
            rng.uniform(zlo, zhi, n),
          ],
          1,
        )
      else:
        side = rng.choice([-1.0, 1.0], n)
        y0 = rng.uniform(b.y_vb + b.r_v, b.y_ant - 10, n)
        z0 = rng.uniform(zlo, zhi, n)
        ang = rng.uniform(-0.6, 0.6, n)
        dirs = np.stack([side * np.cos(ang), np.sin(ang), np.zeros(n)], 1)
        steps = np.arange(0, 140, 1.0)
        ray = (
          np.stack([np.full(n, model.x_m), y0, z0], 1)[:, None, :]
          + steps[None, :, None] * dirs[:, None, :]
        )
        tis = model.tissues(*(ray[..., i].astype(np.float32) for i in range(3)))
        first = np.argmax(tis == _T['lung'], axis=1)
        ok = (tis == _T['lung']).any(axis=1) & (first > 0)
        bnd = ray[np.arange(n), first]
        cand = bnd + dirs * (r * rng.uniform(0.25, 0.6, n))[:, None]
        cand = cand[ok]
      if len(cand) == 0:
        continue
      shell = cand[:, None, :] + (reach + 3.0) * _SHELL[None]
      core = cand[:, None, :] + 0.8 * r * _SHELL[None, ::2]
      pts = np.concatenate([shell, core, cand[:, None, :]], 1)
      tis = model.tissues(*(pts[..., i].astype(np.float32) for i in range(3)))
      sh, co = tis[:, :96], tis[:, 96:]
      lung = _T['lung']
      if kind == 'peripheral':
        good = (tis == lung).all(axis=1)
      else:
        soft = np.isin(sh, [lung, _T['mediastinum'], _T['heart']])
        frac_med = np.isin(sh, [_T['mediastinum'], _T['heart']]).mean(1)
        good = (
          soft.all(1)
          & (frac_med > 0.1)
          & (frac_med < 0.6)
          & ((sh == lung).mean(1) > 0.3)
          & np.isin(co, [lung, _T['mediastinum'], _T['heart']]).all(1)
        )
      for c in cand[good]:
        if all(np.linalg.norm(c - o.center) > reach + o.max_radius() + 6 for o in placed):
          placed.append(_random_tumor(rng, c, r, kind))
          break
      else:
        continue
      break
  return placed


# ----------------------------------------------------------------------------- images


def _tissue_values(kind, rng):
  """Per-patient nominal value of each tissue (HU or relative), drawn from TISSUE_RANGES."""
  vals = {name: float(rng.uniform(*rng_)) for name, rng_ in TISSUE_RANGES[kind].items()}
  if kind == 'thorax_ct':
    vals['heart'] = vals['mediastinum'] + float(rng.uniform(-2, 4))
  return vals


def _lut(values):
  lut = np.zeros(max(_T.values()) + 1, np.float32)
  for name, code in _T.items():
    if name in values:
      lut[code] = values[name]
  return lut


def _smooth_noise(rng, shape, sigma_vox):
  """Zero-mean, unit-std smooth random field."""
  f = rng.standard_normal(shape).astype(np.float32)
  if f.size == 0:
    return f
  f = ndimage.gaussian_filter(f, sigma_vox)
  return f / (f.std() + 1e-8)


def _bias_field(rng, x, y, z):
  """Smooth multiplicative field exp(low-order polynomial), about 0.75-1.33 over the FOV."""
  xs, ys, zs = x / 200.0, y / 200.0, z / 200.0
  c = rng.uniform(-0.15, 0.15, 6)
  log_b = (
    c[0] * xs
    + c[1] * ys
    + c[2] * zs
    + c[3] * xs * ys
    + c[4] * (xs * xs - 0.1)
    + c[5] * (ys * ys - 0.1)
  )
  return np.exp(np.clip(log_b, -0.29, 0.29)).astype(np.float32)


def _downsample_z(a, k):
  nx, ny, nzk = a.shape
  return a.reshape(nx, ny, nzk // k, k).mean(-1, dtype=np.float32)


@dataclasses.dataclass
class PhantomCase:
  image: np.ndarray  # int16 HU (CT) or uint16 (MRI), grid shape
  label: np.ndarray  # uint8
  tissues: np.ndarray  # uint8 TISSUES codes
  instances: np.ndarray  # uint8 tumor instance ids (0 = none)
  affine: np.ndarray  # 4x4 voxel -> world RAS+ mm
  meta: dict  # JSON-serialisable ground truth


@dataclasses.dataclass
class _Anatomy:
  """One patient on one grid: everything but intensities, shared by the modalities rendered from
  it. "Fine" arrays are [X, Y, Z * Z_SUPERSAMPLE] (sub-slices); label maps are [X, Y, Z]."""

  grid: Grid
  affine: np.ndarray  # 4x4 voxel -> world RAS+ mm
  model: object  # _Thorax or _Abdomen
  tissues_fine: np.ndarray  # uint8 TISSUES before lung vessels and tumors, fine
  kidney_medulla: np.ndarray | None = None  # abdomen: bool, fine
  vessels: np.ndarray | None = None  # thorax: lung vessel occupancy in [0, 1], fine float32
  tumors: list = dataclasses.field(default_factory=list)  # thorax: every placed _Tumor
  tumor_masks: list = dataclasses.field(default_factory=list)  # per tumor (slices, fine mask)
  label: np.ndarray | None = None  # uint8 labels
  tissues: np.ndarray | None = None  # uint8 TISSUES
  instances: np.ndarray | None = None  # uint8 tumor instance ids (0 = none)
  kept: list = dataclasses.field(default_factory=list)  # tumors' indices, instance id = pos. + 1


def _draw_body(kind, rng, grid) -> _Anatomy:
  """Draws the pose (grid centre, mm) and the body model of `kind`; its fine tissue map."""
  center = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-10, 10)])
  affine = grid_affine(grid, center)
  x, y, z = _fine_axes(affine, grid.shape, Z_SUPERSAMPLE)
  if kind.startswith('thorax'):
    model = _Thorax(rng)
    return _Anatomy(grid, affine, model, model.tissues(x, y, z))
  model = _Abdomen(rng)
  tis_f, inner = model.tissues(x, y, z, with_inner=True)
  return _Anatomy(grid, affine, model, tis_f, kidney_medulla=inner)


def _draw_look(kind, rng) -> tuple:
  """(nominal tissue values, lung gravity gradient or None) of one patient in `kind`."""
  values = _tissue_values(kind, rng)
  if not kind.startswith('thorax'):
    return values, None
  # Gravity: dependent (posterior) lung denser / brighter (HU or relative).
  return values, rng.uniform(15, 35) if kind == 'thorax_ct' else rng.uniform(0.0, 0.01)


def _draw_lesions(anatomy: _Anatomy, rng) -> _Anatomy:
  """Thorax: draws the lung vessel trees and 1-3 tumors (types, places, shapes)."""
  a, k = anatomy, Z_SUPERSAMPLE
  x, y, z = _fine_axes(a.affine, a.grid.shape, k)
  fshape = a.tissues_fine.shape
  zr = sorted((float(z.min()), float(z.max())))
  pts, radii = _lung_vessel_points(a.model, rng, zr)
  vessels = _stamp_vessels(fshape, a.affine, k, pts, radii) * (a.tissues_fine == _T['lung'])
  n_t = int(rng.integers(1, 4))
  if n_t == 1:
    types = [TUMOR_TYPES[int(rng.integers(0, 2))]]
  else:
    types = list(TUMOR_TYPES) + [TUMOR_TYPES[int(rng.integers(0, 2))]] * (n_t - 2)
    rng.shuffle(types)
  tumors = _place_tumors(a.model, rng, zr, types)
  masks = []
  for tm in tumors:
    lo = _world_to_fine_index(a.affine, k, (tm.center - tm.max_radius() - 2)[None])[0]
    hi = _world_to_fine_index(a.affine, k, (tm.center + tm.max_radius() + 2)[None])[0]
    lo_i, hi_i = np.floor(np.minimum(lo, hi)).astype(int), np.ceil(np.maximum(lo, hi)).astype(int)
    lo_i, hi_i = np.maximum(lo_i, 0), np.minimum(hi_i + 1, fshape)
    sl = tuple(slice(lo_i[d], hi_i[d]) for d in range(3))
    masks.append((sl, tm.inside(x[sl[0]], y[:, sl[1]], z[:, :, sl[2]])))
  return dataclasses.replace(a, vessels=vessels, tumors=tumors, tumor_masks=masks)


def _label_maps(anatomy: _Anatomy) -> _Anatomy:
  """Label, tissue and instance maps on the grid: tissues of the centre sub-slice; a tumor voxel is
  one most of whose sub-slices the tumor holds (a tumor that no voxel holds is dropped)."""
  a, k, shape = anatomy, Z_SUPERSAMPLE, anatomy.grid.shape
  if not isinstance(a.model, _Thorax):
    tissues = np.ascontiguousarray(a.tissues_fine[:, :, k // 2 :: k])
    label = np.zeros(shape, np.uint8)
    for name, v in ABDOMEN_LABELS.items():
      if v:
        label[tissues == _T[name]] = v
    return dataclasses.replace(a, label=label, tissues=tissues, instances=np.zeros(shape, np.uint8))
  tis_f = a.tissues_fine.copy()
  tis_f[a.vessels > 0.5] = _T['lung_vessel']
  tissues = np.ascontiguousarray(tis_f[:, :, k // 2 :: k])
  tumor_f = np.zeros(tis_f.shape, np.uint8)
  for i, (sl, m) in enumerate(a.tumor_masks, start=1):
    tumor_f[sl][m] = i
  fr = tumor_f.reshape(*shape, k)
  instances, kept = np.zeros(shape, np.uint8), []
  for i in range(len(a.tumors)):
    m = (fr == i + 1).mean(-1) >= 0.5
    if m.any():
      kept.append(i)
      instances[m] = len(kept)
  # Where sub-slice majority and centre sub-slice disagree, the tissue follows the label.
  tissues[(instances > 0)] = _T['tumor']
  was_tumor = (tumor_f[:, :, k // 2 :: k] > 0) & (instances == 0)
  if was_tumor.any():
    x, y, z = _fine_axes(a.affine, shape, k)
    base = a.model.tissues(x, y, z[:, :, k // 2 :: k])
    tissues[was_tumor] = base[was_tumor]
  label = (instances > 0).astype(np.uint8)
  return dataclasses.replace(a, label=label, tissues=tissues, instances=instances, kept=kept)


def _paint_tumors(kind, a: _Anatomy, img_f, values, rng, juxta_offset_hu) -> list:
  """Draws each tumor's nominal value and texture and paints it into `img_f` (fine, in place).
  CT: juxta-mediastinal = mediastinum + U(juxta_offset_hu) HU. Returns the nominal values."""
  tumor_values = []
  for tm, (sl, m) in zip(a.tumors, a.tumor_masks):
    if kind == 'thorax_ct':
      tv = (
        values['mediastinum'] + rng.uniform(*juxta_offset_hu)
        if tm.kind == 'juxta_mediastinal'
        else rng.uniform(*TISSUE_RANGES['thorax_ct']['tumor_peripheral'])
      )
      tex = 4.0
    else:
      tv = rng.uniform(*TISSUE_RANGES[kind]['tumor'])
      tex = 0.04 * tv
    tumor_values.append(float(tv))
    field = _smooth_noise(rng, m.shape, 1.5) * np.float32(tex) + np.float32(tv)
    img_f[sl] = np.where(m, field, img_f[sl])
  return tumor_values


def _acquire(kind, img, a: _Anatomy, rng) -> tuple:
  """(image on disk, its meta): CT Gaussian noise, int16 HU; MRI bias field, Rician noise, random
  scale, uint16."""
  if kind == 'thorax_ct':
    sigma = float(rng.uniform(*CT_NOISE_HU))
    img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    image = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    return image, {'intensity_units': 'HU', 'noise_sigma': sigma}
  xo, yo, zo = _fine_axes(a.affine, a.grid.shape, 1)
  bias = _bias_field(rng, xo, yo, zo)
  sig_rel = float(rng.uniform(*MRI_NOISE_REL))
  scale = float(rng.uniform(*MRI_SCALE))
  s = img * bias
  s = np.hypot(
    s + rng.normal(0, sig_rel, s.shape).astype(np.float32),
    rng.normal(0, sig_rel, s.shape).astype(np.float32),
  )
  image = np.clip(np.round(s * scale), 0, 65535).astype(np.uint16)
  return image, {
    'intensity_units': 'arbitrary: relative value x bias x mri_scale',
    'noise_sigma': sig_rel * scale,
    'noise_sigma_relative': sig_rel,
    'mri_scale': scale,
    'noise_model': 'rician',
  }


def _case_meta(kind, a: _Anatomy, values, tumor_values, acquisition) -> dict:
  """The per-case ground truth of a rendering of `a` in `kind` (phantom_meta/{case}.json)."""
  grid = a.grid
  vox_ml = float(np.prod(grid.zooms)) / 1000.0
  inv = np.linalg.inv(a.affine)
  kept = [(a.tumors[j], tumor_values[j]) for j in a.kept]
  meta = {
    'kind': kind,
    'generator_version': GENERATOR_VERSION,
    'modality': _MODALITY[kind][1],
    'channel': _MODALITY[kind][0],
    'orientation': grid.orientation,
    'shape': list(grid.shape),
    'spacing_mm': list(grid.zooms),
    'affine': np.round(a.affine, 6).tolist(),
    'z_supersample': Z_SUPERSAMPLE,
    'tissue_codes': dict(TISSUES),
    'tissue_values': {n: round(v, 4) for n, v in values.items() if not n.startswith('tumor')},
    **acquisition,
    'tumors': [
      {
        'instance_id': i,
        'type': tm.kind,
        'center_mm': np.round(tm.center, 3).tolist(),
        'center_voxel': np.round((inv @ np.r_[tm.center, 1])[:3], 2).tolist(),
        'diameter_mm': round(2 * tm.radius, 2),
        'n_voxels': int((a.instances == i).sum()),
        'volume_ml': round(int((a.instances == i).sum()) * vox_ml, 3),
        'nominal_value': round(value, 4),
      }
      for i, (tm, value) in enumerate(kept, start=1)
    ],
  }
  if not isinstance(a.model, _Thorax):
    meta['organs'] = {
      n: {'label': v, 'volume_ml': round(int((a.label == v).sum()) * vox_ml, 3)}
      for n, v in ABDOMEN_LABELS.items()
      if v
    }
  return meta


def _render(kind, anatomy: _Anatomy, look, rng, juxta_offset_hu) -> PhantomCase:
  """Renders `anatomy` in `kind` with `look` (_draw_look); draws tumor values and textures (and
  abdominal textures), then noise (and MRI bias field and scale) from rng."""
  a, k = anatomy, Z_SUPERSAMPLE
  values, grad = look
  img_f = _lut(values)[a.tissues_fine]
  tumor_values = []
  if isinstance(a.model, _Thorax):
    b = a.model.body
    lung = a.tissues_fine == _T['lung']
    y = _fine_axes(a.affine, a.grid.shape, k)[1]
    post = np.clip(-(y - b.y_c) / b.b_c, -1, 1).astype(np.float32)
    img_f += np.where(lung, np.float32(grad) * post, np.float32(0))
    img_f += a.vessels * (np.float32(values['lung_vessel']) - img_f) * lung
    tumor_values = _paint_tumors(kind, a, img_f, values, rng, juxta_offset_hu)
  else:
    # Kidney medulla (T1 darker, T2 brighter) and bowel content texture.
    t2w = kind == 'abdomen_t2w'
    img_f[a.kidney_medulla] *= np.float32(1.25 if t2w else 0.7)
    bowel = a.tissues_fine == _T['bowel']
    tex = _smooth_noise(rng, img_f.shape, (2.0, 2.0, 2.0 * k))
    img_f = np.where(
      bowel, img_f + np.float32(0.25 if t2w else 0.08) * np.clip(tex, -1, 1.5), img_f
    )
    img_f = np.maximum(img_f, 0)
  # Partial volume: average sub-slices, then an in-plane PSF.
  img = _downsample_z(img_f, k)
  img = ndimage.gaussian_filter(img, (0.5, 0.5, 0.0) if kind == 'thorax_ct' else (0.6, 0.6, 0.0))
  image, acquisition = _acquire(kind, img, a, rng)
  meta = _case_meta(kind, a, values, tumor_values, acquisition)
  return PhantomCase(image, a.label, a.tissues, a.instances, a.affine, meta)


def _draw_patient(kind, rng, grid, juxta_offset_hu) -> tuple:
  """(anatomy, case) of one patient of `kind` on `grid`. The draws from rng keep the order of
  generator 1.0.0, which interleaves anatomy and look: pose and body, tissue values and lung
  gradient, lung vessels and tumors; then tumor values and textures, noise and bias field."""
  _check_kind(kind)
  anatomy = _draw_body(kind, rng, grid)
  look = _draw_look(kind, rng)
  if kind.startswith('thorax'):
    anatomy = _draw_lesions(anatomy, rng)
  anatomy = _label_maps(anatomy)
  return anatomy, _render(kind, anatomy, look, rng, juxta_offset_hu)


def generate_phantom(
  kind: str, rng: np.random.Generator, grid: Grid, juxta_offset_hu=JUXTA_OFFSET_HU
) -> PhantomCase:
  """Like `generate_case`, on an explicit Grid, also returning the tumor instance map.
  juxta_offset_hu: (lo, hi) HU range of a juxta-mediastinal CT tumor above the mediastinum."""
  return _draw_patient(kind, rng, grid, juxta_offset_hu)[1]


def paired_kind(kind: str) -> str:
  """The kind a paired rendering of thorax `kind` is in (the other thorax modality)."""
  _check_kind(kind)
  if not kind.startswith('thorax'):
    raise ValueError(f'paired_out applies to thorax kinds only, not {kind}')
  return 'thorax_t2w' if kind == 'thorax_ct' else 'thorax_ct'


def generate_paired(
  kind: str,
  rng: np.random.Generator,
  paired_rng: np.random.Generator,
  grid: Grid,
  juxta_offset_hu=JUXTA_OFFSET_HU,
) -> tuple:
  """(case, paired case): `generate_phantom(kind, rng, grid, ...)`'s case, and the same anatomy
  (grid, affine, label, tissue and instance arrays, shared) rendered in `paired_kind(kind)`, its
  tissue values, tumor values and textures, noise and bias field drawn from paired_rng only.
  juxta_offset_hu applies to the thorax_ct one of the two. Raises ValueError."""
  other = paired_kind(kind)
  anatomy, case = _draw_patient(kind, rng, grid, juxta_offset_hu)
  return case, _render(other, anatomy, _draw_look(other, paired_rng), paired_rng, juxta_offset_hu)


def generate_case(kind, rng, size=None, spacing=None, slices=None, slice_spacing=None):
  """One random patient of `kind`.

  Args:
    kind: one of KINDS. rng: np.random.Generator (all randomness comes from it).
    size, spacing (mm), slices, slice_spacing (mm): override DEFAULT_GRIDS[kind].
  Returns:
    image [X,Y,Z] (int16 HU for CT, uint16 for MRI; array axes as stored on disk),
    label [X,Y,Z] uint8, tissues [X,Y,Z] uint8 (TISSUES codes), affine 4x4 (voxel -> RAS+ mm),
    meta dict (JSON-serialisable: tumors, nominal tissue values, noise sigma, ...).
  """
  c = generate_phantom(kind, rng, make_grid(kind, size, spacing, slices, slice_spacing))
  return c.image, c.label, c.tissues, c.affine, c.meta


# ----------------------------------------------------------------------------- writing


def _nifti_gz_bytes(data, affine, descrip):
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units('mm', 'sec')
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header['descrip'] = descrip.encode()[:79]
  return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _json_text(obj) -> str:
  """The phantoms' JSON files: indent 2, a final newline."""
  return json.dumps(obj, indent=2) + '\n'


def case_seed(seed: int, kind: str, index: int) -> np.random.SeedSequence:
  """Seed of case `index` of `kind`: distinct patients across kinds for the same seed."""
  return np.random.SeedSequence([int(seed), 7919 + KINDS.index(kind), int(index)])


def paired_seed(seed: int, kind: str, index: int) -> np.random.SeedSequence:
  """Seed of the own draws (tissue values, tumor values and textures, noise, bias field) of the
  paired rendering of case `index` of `kind`: case_seed's first child, apart from every case."""
  return case_seed(seed, kind, index).spawn(1)[0]


def _check_counts(n, n_test):
  """n_test (default max(2, n // 4)); ValueError unless n >= 1 and n_test >= 0 are integers."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f'n must be an integer >= 1, got {n!r}')
  n_test = max(2, n // 4) if n_test is None else n_test
  if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 0:
    raise ValueError(f'n_test must be an integer >= 0, got {n_test!r}')
  return n_test


def _check_juxta(kind, juxta_offset_hu) -> tuple:
  """(lo, hi) floats; ValueError unless lo <= hi, finite, and the default for non-CT kinds."""
  lo, hi = (float(v) for v in juxta_offset_hu)
  if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
    raise ValueError(f'juxta_offset_hu must be finite (lo, hi) with lo <= hi, got {(lo, hi)}')
  if kind != 'thorax_ct' and (lo, hi) != JUXTA_OFFSET_HU:
    raise ValueError(f'juxta_offset_hu applies to thorax_ct only, not {kind}')
  return lo, hi


def _check_paired(kind, out, paired_out, juxta_offset_hu) -> tuple:
  """(paired kind or None, juxta (lo, hi)); ValueError unless paired_out is None or, for a thorax
  kind, a folder other than `out` (juxta_offset_hu then applies to the thorax_ct side)."""
  if paired_out is None:
    return None, _check_juxta(kind, juxta_offset_hu)
  paired = paired_kind(kind)
  if Path(paired_out).resolve() == Path(out).resolve():
    raise ValueError(f'paired_out must be a folder other than out, got {paired_out} for both')
  return paired, _check_juxta('thorax_ct', juxta_offset_hu)


def _make_out_dir(out: Path) -> Path:
  """Creates the dataset folder `out`; OSError naming it when it cannot be written."""
  if out.exists() and not out.is_dir():
    raise OSError(f'{out}: exists and is not a directory')
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f'{out}: cannot create output directory ({e.strerror or e})') from None
  if not os.access(out, os.W_OK | os.X_OK):
    raise OSError(f'{out}: output directory is not writable')
  return out


def _subdirs(kind) -> list:
  thorax = kind.startswith('thorax')
  return [
    'imagesTr',
    'labelsTr',
    'tissuesTr',
    'imagesTs',
    'labelsTs',
    'tissuesTs',
    'phantom_meta',
  ] + (['instancesTr', 'instancesTs'] if thorax else [])


def _clear_stale(out: Path, kind: str, ids: list) -> None:
  """Removes dataset.json and our case files of `kind` not in `ids` (from earlier runs)."""
  if (out / 'dataset.json').exists():
    os.remove(out / 'dataset.json')
  wanted = set(ids)
  own = re.compile(rf'^{re.escape(kind)}_(\d+)(_0000)?\.(nii\.gz|json)$')
  for d in _subdirs(kind):
    (out / d).mkdir(exist_ok=True)
    for f in os.listdir(out / d):
      m = own.match(f)
      if m and f'{kind}_{m.group(1)}' not in wanted:
        os.remove(out / d / f)


def _write_case(
  out: Path, c: PhantomCase, case: str, split: str, seed: int, index: int, paired_with=None
) -> dict:
  """Writes `c` as case `case` (split "Tr" or "Ts"; drawn from seed and index) of the dataset
  folder `out`; paired_with: the meta's record of the source of a paired rendering. Returns the
  case's dataset.json entry."""
  kind = c.meta['kind']
  desc = f'cmedl-jax phantom {kind} v{GENERATOR_VERSION}'
  rel = {
    'image': f'images{split}/{case}_0000.nii.gz',
    'label': f'labels{split}/{case}.nii.gz',
    'tissues': f'tissues{split}/{case}.nii.gz',
  }
  if kind.startswith('thorax'):
    rel['instances'] = f'instances{split}/{case}.nii.gz'
  for what, path in rel.items():
    files.atomic_write(out / path, _nifti_gz_bytes(getattr(c, what), c.affine, desc))
  meta = dict(
    case_id=case,
    split='train' if split == 'Tr' else 'test',
    seed=int(seed),
    case_index=index,
    image=f'./{rel["image"]}',
    label=f'./{rel["label"]}',
    tissues=f'./{rel["tissues"]}',
    **c.meta,
  )
  if 'instances' in rel:
    meta['instances'] = f'./{rel["instances"]}'
  if paired_with is not None:
    meta['paired_with'] = paired_with
  files.atomic_write(out / f'phantom_meta/{case}.json', _json_text(meta))
  return {'image': f'./{rel["image"]}', 'label': f'./{rel["label"]}'}


def _paired_with(source_kind: str, **where) -> dict:
  """A paired rendering's record of its source (per-case meta, dataset.json)."""
  return {'dataset': f'Phantom_{source_kind}', 'kind': source_kind, **where, 'anatomy_shared': True}


def _dataset_json(
  kind: str, seed: int, grid: Grid, training: list, test: list, juxta, paired_with=None
) -> dict:
  """dataset.json: nnU-Net v2 and MSD keys, and a "phantom" block (with "juxta_offset_hu" for
  thorax_ct when it is not the default, and "paired_with" for a paired rendering)."""
  thorax = kind.startswith('thorax')
  channel, modality = _MODALITY[kind]
  extra = {}
  if kind == 'thorax_ct' and tuple(juxta) != JUXTA_OFFSET_HU:
    extra['juxta_offset_hu'] = list(map(float, juxta))
  name, description = f'Phantom_{kind}', _DESCRIPTIONS[kind]
  if paired_with is not None:
    extra['paired_with'] = {
      **paired_with,
      'shared': 'case ids, grid and affine, labels, tissue and instance maps, tumor geometry',
      'own': 'tissue values, lung gradient, tumor values and textures, noise, MRI bias field and '
      'scale, drawn from paired_seed(seed, source kind, case_index)',
    }
    name += '_paired'
    description = (
      f'Paired synthetic {kind} phantoms: the patients of {paired_with["dataset"]} (same case '
      'ids, grid and affine, labels, tissue and instance maps) rendered in this modality.'
    )
  return {
    'name': name,
    'description': description,
    'reference': 'synthetic (cmedl-jax data_prep/phantoms.py)',
    'licence': 'CC0-1.0',
    'release': GENERATOR_VERSION,
    'tensorImageSize': '3D',
    'channel_names': {'0': channel},
    'modality': {'0': modality},
    'labels': dict(THORAX_LABELS if thorax else ABDOMEN_LABELS),
    'numTraining': len(training),
    'numTest': len(test),
    'file_ending': '.nii.gz',
    'training': training,
    'test': test,
    'phantom': {
      'kind': kind,
      'seed': int(seed),
      'generator_version': GENERATOR_VERSION,
      'orientation': grid.orientation,
      'shape': list(grid.shape),
      'spacing_mm': list(grid.zooms),
      'z_supersample': Z_SUPERSAMPLE,
      'tissue_codes': dict(TISSUES),
      'meta_dir': './phantom_meta',
      'tissues_dirs': ['./tissuesTr', './tissuesTs'],
      'instances_dirs': ['./instancesTr', './instancesTs'] if thorax else [],
      **extra,
    },
  }


def _write_cases(kind, seed, grid, juxta, outs, ids, n, verbose) -> list:
  """Draws and writes every case of `ids` (the first n training) into outs[0], and its paired
  rendering into outs[1] if given; returns per folder the (training, test) dataset.json entries."""
  entries = [([], []) for _ in outs]
  t0 = time.perf_counter()
  for i, case in enumerate(ids):
    split = 'Tr' if i < n else 'Ts'
    rng = np.random.default_rng(case_seed(seed, kind, i))
    if len(outs) == 1:
      cases = [generate_phantom(kind, rng, grid, juxta)]
    else:
      own = np.random.default_rng(paired_seed(seed, kind, i))
      cases = generate_paired(kind, rng, own, grid, juxta)
    for side, (o, c) in enumerate(zip(outs, cases)):
      source = _paired_with(kind, case_id=case) if side else None
      entries[side][0 if split == 'Tr' else 1].append(
        _write_case(o, c, case, split, seed, i, source)
      )
    if verbose:
      print(f'  {case}: {time.perf_counter() - t0:.1f} s', file=sys.stderr)
  return entries


def write_dataset(
  kind,
  n,
  seed,
  out,
  n_test=None,
  size=None,
  spacing=None,
  slices=None,
  slice_spacing=None,
  verbose=False,
  juxta_offset_hu=JUXTA_OFFSET_HU,
  paired_out=None,
) -> Path:
  """Writes `n` training and `n_test` (default max(2, n // 4)) test cases of `kind` into the
  dataset folder `out` (created; our stale case files and dataset.json are removed first;
  dataset.json is written last). juxta_offset_hu: (lo, hi), for thorax_ct (JUXTA_OFFSET_HU).
  paired_out: thorax kinds: another folder that gets the same patients (case ids, grid and
  affine, labels, tissue and instance maps) rendered in paired_kind(kind), with their own draws
  (paired_seed); its dataset.json names the source. `out` is written as without it.
  Returns Path(out). Raises ValueError / OSError."""
  _check_kind(kind)
  n_test = _check_counts(n, n_test)
  paired, juxta = _check_paired(kind, out, paired_out, juxta_offset_hu)
  grid = make_grid(kind, size, spacing, slices, slice_spacing)
  outs = [_make_out_dir(Path(o)) for o in ([out] if paired is None else [out, paired_out])]
  digits = max(3, len(str(n + n_test - 1)))
  ids = [f'{kind}_{i:0{digits}d}' for i in range(n + n_test)]
  for o in outs:
    _clear_stale(o, kind, ids)
  entries = _write_cases(kind, seed, grid, juxta, outs, ids, n, verbose)
  sides = [(kind, None)]
  if paired is not None:
    where = os.path.relpath(outs[0].resolve(), outs[1].resolve())
    sides.append((paired, _paired_with(kind, path=where)))
  for o, (training, test), (k, source) in zip(outs, entries, sides):
    ds = _dataset_json(k, seed, grid, training, test, juxta, source)
    files.atomic_write(o / 'dataset.json', _json_text(ds))
  return outs[0]


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors: 'phantoms: error: ...' on stderr, exit status 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {" ".join(str(message).split())}\n')


def _int_at_least(lo):
  def parse(s):
    try:
      v = int(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected an integer, got {s!r}') from None
    if v < lo:
      raise argparse.ArgumentTypeError(f'must be >= {lo}, got {v}')
    return v

  return parse


def _positive_float(s):
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {s!r}') from None
  if not np.isfinite(v) or v <= 0:
    raise argparse.ArgumentTypeError(f'must be > 0, got {s}')
  return v


def _parser():
  p = _Parser(
    prog='phantoms',
    description='Write a synthetic phantom dataset (MSD / nnU-Net layout) for cmedl-jax.',
  )
  p.add_argument('--kind', required=True, choices=KINDS)
  p.add_argument('--n', type=_int_at_least(1), default=20, help='training cases (default 20)')
  p.add_argument(
    '--n-test', type=_int_at_least(0), default=None, help='test cases (default max(2, n // 4))'
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', required=True, help='dataset folder to write (created)')
  p.add_argument(
    '--size',
    type=_int_at_least(16),
    default=None,
    help='in-plane matrix; keep size x spacing >= ~350 mm or the body is cut off',
  )
  p.add_argument('--spacing', type=_positive_float, default=None, help='in-plane mm')
  p.add_argument('--slices', type=_int_at_least(2), default=None)
  p.add_argument('--slice-spacing', type=_positive_float, default=None, help='mm')
  p.add_argument(
    '--juxta-offset-hu',
    type=float,
    nargs=2,
    default=JUXTA_OFFSET_HU,
    metavar=('LO', 'HI'),
    help='thorax_ct: juxta-mediastinal tumors are the mediastinum + U(LO, HI) HU '
    '(default -6 6: no consistent cue)',
  )
  p.add_argument(
    '--paired-out',
    default=None,
    metavar='DIR',
    help='thorax kinds: also write the same patients (case ids, grid, labels) rendered in the '
    'other thorax modality into the dataset folder DIR',
  )
  p.add_argument('--verbose', action='store_true')
  return p


def main(argv=None) -> int:
  p = _parser()
  args = p.parse_args(argv)
  try:
    grid = make_grid(args.kind, args.size, args.spacing, args.slices, args.slice_spacing)
    paired, _ = _check_paired(args.kind, args.out, args.paired_out, args.juxta_offset_hu)
    out = _make_out_dir(Path(args.out))
    if paired is not None:
      _make_out_dir(Path(args.paired_out))
  except (ValueError, OSError) as e:
    p.error(str(e))
  t0 = time.perf_counter()
  try:
    write_dataset(
      args.kind,
      args.n,
      args.seed,
      out,
      n_test=args.n_test,
      size=grid.size,
      spacing=grid.spacing,
      slices=grid.slices,
      slice_spacing=grid.slice_spacing,
      verbose=args.verbose,
      juxta_offset_hu=args.juxta_offset_hu,
      paired_out=args.paired_out,
    )
  except OSError as e:
    p.exit(1, f'{p.prog}: error: {" ".join(str(e).split())}\n')
  n_test = max(2, args.n // 4) if args.n_test is None else args.n_test
  also = '' if paired is None else f' and their {paired} rendering to {args.paired_out}'
  print(
    f'wrote {args.n} training + {n_test} test {args.kind} cases to {out}{also} '
    f'in {time.perf_counter() - t0:.1f} s'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
