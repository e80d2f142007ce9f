"""The manifest of a prepared dataset (`prepared.json`): its name, format, splits and reader.

`data_prep.prepare` writes prepared folders; `data_prep.tfds_builder` and
`cmedl_jax.input_pipeline` read them through this module (no import of `prepare` needed).
"""

from __future__ import annotations

import json
import os

from data_prep.nifti_io import DataError

FORMAT = 'cmedl_jax.prepared'
FORMAT_VERSION = 1
MANIFEST = 'prepared.json'
SPLITS = ('train', 'validation', 'test')
ARRAYS = ('images', 'labels', 'case_index', 'slice_index', 'has_foreground')  # .npy per split


def read_manifest(prepared_dir) -> dict:
  """Reads `prepared.json`; raises DataError when the folder is not a complete preparation."""
  path = os.path.join(os.fspath(prepared_dir), MANIFEST)
  if not os.path.isfile(path):
    raise DataError(
      path,
      'not a complete prepared dataset (no prepared.json); run `python -m data_prep.prepare` first',
    )
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT or manifest.get('version') != FORMAT_VERSION:
    raise DataError(
      path,
      f'unsupported prepared format/version {manifest.get("format")}/{manifest.get("version")}',
    )
  return manifest


def is_prepared(prepared_dir) -> bool:
  """True when `prepared_dir` holds a complete preparation (its prepared.json exists)."""
  return os.path.isfile(os.path.join(os.fspath(prepared_dir), MANIFEST))
