"""The trainer's data: config.data.source/target -> data_prep's PrepSpec, prepared before training.

`prepare_data(config)` prepares each side's raw folder into its prepared_dir (or checks the one
there) with data_prep.prepare.ensure_prepared. With several processes, process 0 prepares while
the others wait, then they check what it made.
"""

from typing import Mapping, Optional

import jax

from cmedl_jax import checkpoint
from cmedl_jax import sharding
from data_prep import prepare
from data_prep.nifti_io import DataError

PREPARE_TIMEOUT_S = 24 * 3600  # How long processes 1.. wait for process 0 to prepare the data.


def prepare_data(config):
  """Prepares source and target datasets from their raw folders unless already prepared.

  With several processes, process 0 prepares while the others wait, then they check the
  prepared data's spec (the prepared folders must be on a filesystem all processes share).
  """
  if jax.process_count() == 1:
    return _ensure_prepared(config)
  if jax.process_index() == 0:
    _ensure_prepared(config)
  # A barrier of the distributed runtime, not a collective (sync_global_devices): the first
  # collective gives up after 30 s, a preparation can take longer.
  sharding.barrier('cmedl_jax_prepare_data', PREPARE_TIMEOUT_S)
  if jax.process_index() != 0:
    _ensure_prepared(
      config,
      missing_error=(
        f'not prepared on process {jax.process_index()} after process 0 prepared it; '
        'data.*.prepared_dir must be on a filesystem all processes share'
      ),
    )


def _ensure_prepared(config, missing_error=None):
  """ensure_prepared for each side that is not a TFDS folder; a ConfigError for a prepared
  folder that does not match the config."""
  for side in ('source', 'target'):
    d = config.data[side]
    if d.get('tfds_dir'):  # Read as it is (input_pipeline.TfdsSlices).
      continue
    spec = spec_from_config(config, side)
    try:
      prepare.ensure_prepared(
        d.raw_dir,
        d.prepared_dir,
        spec,
        val_fraction=config.data.val_fraction,
        seed=config.seed,
        where=f'data.{side}',
        missing_error=missing_error,
      )
    except prepare.PreparedDirError as e:
      raise checkpoint.ConfigError(str(e)) from None


def spec_from_config(config, side: str) -> prepare.PrepSpec:
  """PrepSpec of `config.data[side]` (side 'source' or 'target'; see configs/default.py).

  Reads data[side].modality, the label map (`config_label_map`) and the shared data.spacing_mm
  (mm), data.image_size (pixels), data.ct_window_hu (HU) and data.mri_percentiles;
  interpolation stays linear.
  """
  d = config.data
  return prepare.PrepSpec(
    modality=d[side].modality,
    spacing_mm=d.spacing_mm,
    size=d.image_size,
    ct_window_hu=tuple(d.ct_window_hu),
    mri_percentiles=tuple(d.mri_percentiles),
    label_map=config_label_map(config, side),
  )


def config_label_map(config, side: str) -> Optional[dict]:
  """The label map of one side: data[side].label_map when set, else the shared data.label_map.

  Either is a dict {label name or value: class} (a ConfigDict; --config.x="{'cancer': 1}") or a
  string 'NAME=CLASS[,NAME=CLASS...]' as prepare's --label-map takes; None or empty: declared
  labels in order. Anything else: DataError naming the field.
  """
  field = f'data.{side}.label_map'
  value = config.data[side].label_map
  if value is None:
    field, value = 'data.label_map', config.data.label_map
  value = value.to_dict() if hasattr(value, 'to_dict') else value
  if isinstance(value, str):
    value = prepare.parse_label_map([v for v in value.split(',') if v.strip()], field)
  if value is not None and not (
    isinstance(value, Mapping) and all(isinstance(c, int) for c in value.values())
  ):
    raise DataError(
      field, f"must be a dict {{name or value: class}} or 'NAME=CLASS,...', got {value!r}"
    )
  # Keys as strings, as a prepared folder's manifest stores them ({1: 1} is {'1': 1}).
  return {str(k): c for k, c in value.items()} if value else None
