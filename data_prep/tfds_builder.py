r"""TFDS builders for a prepared dataset (the published, canonical form of `data_prep.prepare`).

Two builders read a prepared folder (manual dir; nothing is downloaded, GCS stays disabled):

* `PreparedSlices` ("prepared_slices"): one example per 2D slice:
  image float32 [H,W] in [-1,1], label uint8 [H,W] (both stored as raw bytes: decoding is a
  copy), case_id, slice_index, spacing_mm (z,y,x), has_foreground. Splits train / validation /
  test (as prepared, by case, deterministic); `data_prep.prepare` builds its train split, which
  training reads (`cmedl_jax/input_pipeline.py`, through `tfds` data sources and grain).
* `PreparedVolumes` ("prepared_volumes"): one example per case for validation / test:
  image float32 [Z,H,W], label uint8 [Z,H,W], case_id, has_label, spacing_mm, geometry (JSON of
  `data_prep.geometry.Geometry`, for writing predictions back onto the original grid).

Examples keep the prepared order (shuffling disabled): example i of a split is row i of the
prepared arrays. Stored as ArrayRecord (random access through `tfds.data_sources` / `builder.as_data_source`),
in `data_dir = PREPARED_DIR/tfds` by default:

  python -m data_prep.tfds_builder --prepared data/prepared/thorax_ct

Reading back without this module: `tfds.builder_from_directory(path).as_data_source("train")`
(`slices_dir` gives the path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from data_prep import manifest as manifest_lib

_BYTES = tfds.features.Encoding.BYTES
BUILDER_VERSION = '2.0.0'  # 2.0.0: image and label as raw bytes (was: lists of numbers).


class _PreparedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: reads the manifest of `prepared_dir` (also the manual dir)."""

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {BUILDER_VERSION: 'Slices / volumes of a data_prep.prepare folder.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Prepare the NIfTI dataset with `python -m data_prep.prepare` '
    'and pass the prepared folder as manual_dir.'
  )
  DESCRIPTION = ''  # Subclasses: with {} for the dataset's name.

  def __init__(self, *, prepared_dir=None, splits=None, **kwargs):
    self._prepared_dir = os.fspath(prepared_dir) if prepared_dir is not None else None
    self._wanted = tuple(splits) if splits is not None else None
    self._manifest = manifest_lib.read_manifest(prepared_dir) if prepared_dir is not None else None
    super().__init__(**kwargs)

  def _features(self, h: int, w: int) -> dict:
    """{name: tfds feature} of one example of H x W slices."""
    raise NotImplementedError

  def _info(self):
    if self._manifest is None:
      raise ValueError(
        'construct with prepared_dir=... to build; to read an existing build use '
        'tfds.builder_from_directory'
      )
    return self.dataset_info_from_configs(
      description=self.DESCRIPTION.format(self._manifest['dataset']['name']),
      features=tfds.features.FeaturesDict(self._features(*self._manifest['size'])),
      disable_shuffling=True,  # example i of a split = row i of the prepared arrays
      metadata=tfds.core.MetadataDict(prepared=_metadata(self._manifest)),
    )

  def _splits(self, splits):
    wanted = [s for s in splits if self._wanted is None or s in self._wanted]
    return {s: self._generate_examples(split=s) for s in wanted if self._manifest['splits'].get(s)}

  def _split_arrays(self, split):
    d = os.path.join(self._prepared_dir, split)
    load = lambda name: np.load(os.path.join(d, name), mmap_mode='r')
    return load('images.npy'), load('labels.npy')


class PreparedSlices(_PreparedBuilder, skip_registration=True):
  """2D slices of a prepared dataset."""

  DESCRIPTION = '2D slices of prepared dataset {}'

  def _features(self, h, w):
    return {
      'image': tfds.features.Tensor(shape=(h, w), dtype=np.float32, encoding=_BYTES),
      'label': tfds.features.Tensor(shape=(h, w), dtype=np.uint8, encoding=_BYTES),
      'case_id': tfds.features.Text(),
      'slice_index': tfds.features.Scalar(dtype=np.int32),
      'spacing_mm': tfds.features.Tensor(shape=(3,), dtype=np.float32),
      'has_foreground': tfds.features.Scalar(dtype=np.bool_),
    }

  def _split_generators(self, dl_manager):
    del dl_manager
    return self._splits(manifest_lib.SPLITS)

  def _generate_examples(self, split):
    images, labels = self._split_arrays(split)
    for case in self._manifest['splits'][split]:
      for z in range(case['num_slices']):
        g = case['offset'] + z
        yield (
          f'{case["case_id"]}/{z:04d}',
          {
            'image': np.asarray(images[g]),
            'label': np.asarray(labels[g]),
            'case_id': case['case_id'],
            'slice_index': z,
            'spacing_mm': np.asarray(case['spacing_mm'], np.float32),
            'has_foreground': bool(labels[g].any()),
          },
        )


class PreparedVolumes(_PreparedBuilder, skip_registration=True):
  """Whole prepared volumes with their geometry (validation and test)."""

  DESCRIPTION = 'Prepared volumes of dataset {}'

  def _features(self, h, w):
    return {
      'image': tfds.features.Tensor(shape=(None, h, w), dtype=np.float32),
      'label': tfds.features.Tensor(shape=(None, h, w), dtype=np.uint8),
      'case_id': tfds.features.Text(),
      'has_label': tfds.features.Scalar(dtype=np.bool_),
      'spacing_mm': tfds.features.Tensor(shape=(3,), dtype=np.float32),
      'geometry': tfds.features.Text(),
    }

  def _split_generators(self, dl_manager):
    del dl_manager
    return self._splits(('validation', 'test'))

  def _generate_examples(self, split):
    images, labels = self._split_arrays(split)
    for case in self._manifest['splits'][split]:
      lo, hi = case['offset'], case['offset'] + case['num_slices']
      yield (
        case['case_id'],
        {
          'image': np.asarray(images[lo:hi]),
          'label': np.asarray(labels[lo:hi]),
          'case_id': case['case_id'],
          'has_label': bool(case['has_label']),
          'spacing_mm': np.asarray(case['spacing_mm'], np.float32),
          'geometry': json.dumps(case['geometry']),
        },
      )


def _metadata(manifest):
  return {
    'spec': manifest['spec'],
    'num_classes': manifest['num_classes'],
    'class_names': manifest['class_names'],
    'dataset': manifest['dataset']['name'],
  }


def _store_uncompressed(data_dir):
  """Rewrites the ArrayRecord files in `data_dir` uncompressed, records and order unchanged.

  TFDS writes them brotli-compressed; float32 slices barely compress (256x256: 327 KB -> about
  200 KB) and decompressing is what reading them costs (measured: uncompressed records read
  2.4x faster). Readers detect the format, so it stays an ordinary TFDS dataset."""
  from array_record.python import array_record_data_source, array_record_module  # pylint: disable=g-import-not-at-top

  for name in sorted(os.listdir(data_dir)):
    if '.array_record' not in name or name.endswith('.tmp'):
      continue
    path = os.path.join(data_dir, name)
    source = array_record_data_source.ArrayRecordDataSource([path])
    writer = array_record_module.ArrayRecordWriter(path + '.tmp', 'group_size:1,uncompressed')
    for i in range(len(source)):
      writer.write(source[i])
    writer.close()
    os.replace(path + '.tmp', path)


def slices_dir(prepared_dir, data_dir=None) -> str:
  """Where `build` puts the slices of `prepared_dir` (for tfds.builder_from_directory)."""
  data_dir = data_dir or os.path.join(os.fspath(prepared_dir), 'tfds')
  return os.path.join(data_dir, PreparedSlices.name, BUILDER_VERSION)


def build(
  prepared_dir, data_dir=None, file_format='array_record', volumes=True, splits=None, progress=True
) -> dict:
  """Builds the TFDS datasets of a prepared folder offline. Returns {name: builder}.

  splits: the slice splits to build (default all that have cases); progress: TFDS's bars."""
  prepared_dir = os.fspath(prepared_dir)
  if not progress:
    tfds.display_progress_bar(False)
  data_dir = data_dir or os.path.join(prepared_dir, 'tfds')
  config = tfds.download.DownloadConfig(manual_dir=prepared_dir, try_download_gcs=False)
  builders = {}
  classes = [PreparedSlices] + ([PreparedVolumes] if volumes else [])
  manifest = manifest_lib.read_manifest(prepared_dir)
  for cls in classes:
    if cls is PreparedVolumes and not (
      manifest['splits']['validation'] or manifest['splits']['test']
    ):
      continue
    builder = cls(
      prepared_dir=prepared_dir,
      data_dir=data_dir,
      file_format=file_format,
      splits=splits if cls is PreparedSlices else None,
    )
    builder.download_and_prepare(download_config=config)
    if cls is PreparedSlices and file_format == 'array_record':
      _store_uncompressed(builder.data_dir)
    builders[builder.name] = builder
  return builders


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m data_prep.tfds_builder',
    description='Builds TFDS datasets from a prepared folder.',
  )
  p.add_argument('--prepared', required=True)
  p.add_argument('--data-dir', default=None, help='default: PREPARED/tfds')
  p.add_argument('--file-format', default='array_record', choices=('array_record', 'tfrecord'))
  args = p.parse_args(argv)
  # Builders must live in an importable package module, not __main__ (TFDS looks them up).
  from data_prep import tfds_builder as module  # pylint: disable=g-import-not-at-top,import-self

  for name, b in module.build(args.prepared, args.data_dir, args.file_format).items():
    print(
      f'{name}: {b.data_dir}  '
      + ', '.join(f'{s}={v.num_examples}' for s, v in b.info.splits.items())
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
