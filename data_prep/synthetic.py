"""Tiny synthetic NIfTI datasets for tests (not the realistic phantoms of `phantoms.py`).

`toy_case` makes a small RAS volume: air (-1000 HU), an elliptic body (0 HU) off the image
centre, and an off-centre "tumor" block (400 HU, label 1) in the middle slices; `to_lps` stores
the same anatomy in LPS; `write_dataset` writes MSD or nnU-Net layouts.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np


def toy_case(shape=(24, 20, 6), spacing=(1.5, 1.5, 4.0), seed=0, lesion=True, origin=None):
  """Returns (image int16 HU [X,Y,Z], label uint8 [X,Y,Z], RAS affine 4x4)."""
  rng = np.random.default_rng(seed)
  nx, ny, nz = shape
  x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
  cx, cy = nx * 0.45 + rng.uniform(-1, 1), ny * 0.55 + rng.uniform(-1, 1)
  body = ((x - cx) / (nx * 0.38)) ** 2 + ((y - cy) / (ny * 0.36)) ** 2 <= 1.0
  image = np.full(shape, -1000, np.int16)
  image[body] = 0
  label = np.zeros(shape, np.uint8)
  if lesion:
    x0 = int(cx) + 1 + int(rng.integers(0, 2))
    y0 = int(cy) - 3 - int(rng.integers(0, 2))
    z_lo, z_hi = 1, max(2, nz - 2)
    label[x0:x0 + 4, y0:y0 + 3, z_lo:z_hi] = 1
    image[label == 1] = 400
  affine = np.diag(list(spacing) + [1.0])
  affine[:3, 3] = origin if origin is not None else (-nx * spacing[0] / 2, -ny * spacing[1] / 2, 10.0)
  return image, label, affine


def to_lps(volume, affine):
  """Same anatomy stored with the first two axes flipped (LPS): returns (volume, affine)."""
  nx, ny = volume.shape[:2]
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[0, 3], flip[1, 3] = nx - 1, ny - 1
  return np.ascontiguousarray(volume[::-1, ::-1]), affine @ flip


def save_nifti(path, array, affine):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64)), path)


def write_dataset(root, train_cases: dict, test_cases: dict = None, layout="nnunet",
                  labels=None, modality="CT", test_labels=False, name="toy"):
  """Writes {case_id: (image, label, affine)} dicts as an MSD or nnU-Net dataset folder."""
  labels = labels or {"background": 0, "tumor": 1}
  test_cases = test_cases or {}
  image_name = (lambda c: f"{c}_0000.nii.gz") if layout == "nnunet" else (lambda c: f"{c}.nii.gz")
  for cid, (image, label, affine) in train_cases.items():
    save_nifti(os.path.join(root, "imagesTr", image_name(cid)), image, affine)
    if label is not None:
      save_nifti(os.path.join(root, "labelsTr", f"{cid}.nii.gz"), label, affine)
  for cid, (image, label, affine) in test_cases.items():
    save_nifti(os.path.join(root, "imagesTs", image_name(cid)), image, affine)
    if test_labels and label is not None:
      save_nifti(os.path.join(root, "labelsTs", f"{cid}.nii.gz"), label, affine)
  if layout == "nnunet":
    meta = {"name": name, "channel_names": {"0": modality}, "labels": labels,
            "numTraining": len(train_cases), "file_ending": ".nii.gz"}
  else:
    meta = {"name": name, "modality": {"0": modality},
            "labels": {str(v): k for k, v in labels.items()},
            "numTraining": len(train_cases), "numTest": len(test_cases),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in train_cases],
            "test": [f"./imagesTs/{c}.nii.gz" for c in test_cases]}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return root
