"""Unpaired input pipeline over prepared datasets (see `data_prep/prepare.py`).

Training batches come from two independent streams, source (student modality) and target
(teacher modality), each sampling 2D slices of its own prepared `train` split, zipped:

  (src, tgt) = next(it);  src = {"image": [B,H,W,C] f32 in [-1,1], "label": [B,H,W] i32,
                                 "has_label": [B] f32}

* Batch i depends only on (seed, stream, i): slices are drawn with replacement by
  `np.random.default_rng([seed, stream, i])`, so `start_step=k` resumes exactly where a run
  from 0 would be at batch k, whatever the threading. Source and target are different streams,
  so they are shuffled independently.
* Foreground over-sampling (nnU-Net style): each example is drawn from the slices with
  foreground with probability `foreground_ratio`, otherwise from all slices; so the expected
  fraction with foreground is `r + (1 - r) * natural_fraction` (>= r). Sides without labels
  sample uniformly.
* Augmentation (one identical geometric transform for image and label: bilinear / nearest):
  random left-right flip, rotation, isotropic scale; intensity contrast/shift jitter
  (before the warp; the outside fill stays -1). Config keys (`augment` dict or ConfigDict):
  flip (bool or probability, left-right), flip_ud (same, up-down; default off), rotate_deg (max
  |angle|), scale (max relative change), intensity (max shift and relative contrast change).
  Note: flip left-right swaps body sides; switch it off for lateralised labels (left/right
  kidney).
* Paired (`paired=True`, for co-registered datasets such as `data_prep.phantoms --paired-out`):
  the target side is no longer a stream of its own: its example r is the target slice of the
  same case id and slice position as the source's example r (`paired_indices`), under the same
  augmentation (transform and intensity jitter). The source batches are those of unpaired mode.
* 2.5D: `context_slices=k` (odd) stacks the k neighbouring slices of the same case as channels
  (clamped at the case's ends); the label is the centre slice's.
* Multi-host: every example's randomness is drawn for the whole global batch, each process
  builds its rows [p*B/P, (p+1)*B/P) only, and `jax.make_array_from_process_local_data` makes
  global arrays sharded `NamedSharding(mesh, P("data"))`.
* Reading: the training slices come from the prepared folder's TFDS build (ArrayRecord, read
  by index through `tfds` data sources: `SplitSlices`); grain (`_grain_iterator`, a MapDataset
  over step indices read by a few threads) builds whole batches `prefetch` ahead (slice reads,
  warps, transfer to jax Arrays); batches come out in step order. By default the warps run in
  a jitted jax function on the sharded batch (`augment_on="device"`: on the accelerators, or
  XLA:CPU); `augment_on="host"` runs them in TensorFlow C++ kernels instead
  (`ImageProjectiveTransformV3` in a tf.function: no Python callbacks inside TF, so no GIL
  deadlock at exit). TensorFlow is an optional extra (`TENSORFLOW_INSTALL`), needed by
  `augment_on="host"` only; reading the TFDS slices needs none.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_prep import manifest as manifest_lib
from data_prep.geometry import Geometry

DATA_AXIS = 'data'
# Defaults; configs/default.py's data section uses these. Augmentation keys: module doc.
DEFAULT_AUGMENT = dict(flip=True, rotate_deg=10.0, scale=0.1, intensity=0.1)
_AUGMENT_OFF = dict(flip_ud=False)  # Known augmentation keys that are off unless given.
FOREGROUND_RATIO = 0.5  # Probability that an example is drawn from slices with foreground.
PREFETCH = 2  # Batches prepared ahead of the consumer.
_SOURCE_STREAM, _TARGET_STREAM = 0x5EED0, 0x5EED1
_ENDLESS = 2**62  # "No num_steps": the last step index of an endless iterator.
# The optional extra for augment_on="host": the TensorFlow verified with requirements.txt.
TENSORFLOW_INSTALL = 'pip install tensorflow-cpu==2.21.0'


# ---------------------------------------------------------------------------------------------
# Prepared-data access.


def _load_array(path):
  """Memory-maps a .npy (plain load for empty arrays, which cannot be mapped)."""
  try:
    return np.load(path, mmap_mode='r')
  except ValueError:
    return np.load(path)


class SplitArrays:
  """Memory-mapped arrays of one split of a prepared dataset (the .npy files preparation
  writes; whole volumes for validation and test come from here).

  max_cases: if > 0, only the split's first `max_cases` cases (manifest order; their slices
  are the arrays' first rows), e.g. a label-scarce training set; more than the split holds is
  a ValueError.
  """

  def __init__(self, prepared_dir, split: str, max_cases: int = 0):
    self.manifest = manifest_lib.read_manifest(prepared_dir)
    if split not in self.manifest['splits']:
      raise ValueError(f'{prepared_dir}: no split {split!r}')
    d = os.path.join(os.fspath(prepared_dir), split)
    self.cases = self.manifest['splits'][split]
    rows = slice(None)
    if max_cases:
      if max_cases > len(self.cases):
        raise ValueError(
          f'{prepared_dir}: split {split!r} has {len(self.cases)} cases, fewer than the '
          f'{max_cases} asked for (data.source.train_cases)'
        )
      self.cases = self.cases[:max_cases]
      rows = slice(0, sum(c['num_slices'] for c in self.cases))
    self.images = _load_array(os.path.join(d, 'images.npy'))[rows]
    self.labels = _load_array(os.path.join(d, 'labels.npy'))[rows]
    self.case_index = np.load(os.path.join(d, 'case_index.npy'))[rows]
    self.has_foreground = np.load(os.path.join(d, 'has_foreground.npy'))[rows]
    offsets = np.array([c['offset'] for c in self.cases], np.int64)
    counts = np.array([c['num_slices'] for c in self.cases], np.int64)
    self.slice_lo = offsets[self.case_index] if len(self.cases) else np.zeros(0, np.int64)
    self.slice_hi = (offsets + counts - 1)[self.case_index] if len(self.cases) else self.slice_lo
    self.has_labels = bool(self.cases) and all(c['has_label'] for c in self.cases)
    self.size = tuple(self.manifest['size'])
    self.prepared_dir, self.split = os.fspath(prepared_dir), split

  def __len__(self):
    return int(self.case_index.shape[0])

  def context_indices(self, idx: np.ndarray, context_slices: int) -> np.ndarray:
    """[B] slice indices -> [B, k] indices of the k neighbours in the same case (clamped)."""
    half = context_slices // 2
    nb = idx[:, None] + np.arange(-half, half + 1)[None, :]
    return np.clip(nb, self.slice_lo[idx][:, None], self.slice_hi[idx][:, None])


def _fetch(slices, idx: np.ndarray, context_slices: int):
  """Images [B,H,W,k] float32 and centre labels [B,H,W] uint8 for slice indices [B] of
  `slices` (SplitSlices or TfdsSlices: `source[i]` -> {'image', 'label'}, context_indices)."""
  idx = np.asarray(idx, np.int64)
  nb = slices.context_indices(idx, context_slices)
  unique, inverse = np.unique(nb, return_inverse=True)
  records = [slices.source[int(i)] for i in unique]  # sorted reads, each slice once
  h, w = slices.size
  images = np.stack([np.reshape(r['image'], (h, w)) for r in records])[inverse.reshape(-1)]
  images = images.reshape(nb.shape + (h, w)).transpose(0, 2, 3, 1)
  centre = inverse.reshape(nb.shape)[:, context_slices // 2]
  if not slices.has_labels:
    return np.ascontiguousarray(images, np.float32), np.zeros((idx.size, h, w), np.uint8)
  labels = np.stack([np.reshape(records[i]['label'], (h, w)) for i in centre]).astype(np.uint8)
  return np.ascontiguousarray(images, np.float32), labels


class SplitSlices(SplitArrays):
  """The training slices of one split, read by index from the prepared folder's TFDS build
  (ArrayRecord; `data_prep.tfds_builder`) through a `tfds` random-access data source; the
  case and foreground indices come from the prepared folder (SplitArrays)."""

  def __init__(self, prepared_dir, split: str, max_cases: int = 0):
    super().__init__(prepared_dir, split, max_cases)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

    path = tfds_builder.slices_dir(prepared_dir)
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
      raise FileNotFoundError(
        f'{prepared_dir}: no TFDS build of its slices at {path}; build it with `python -m '
        f'data_prep.tfds_builder --prepared {prepared_dir}` or prepare the folder again'
      )
    self.source = tfds.builder_from_directory(path).as_data_source(split)
    if len(self.source) < len(self):
      raise ValueError(
        f'{path}: split {split!r} has {len(self.source)} slices, the prepared folder '
        f'{len(self)}; build it again (python -m data_prep.tfds_builder)'
      )

  def fetch(self, idx: np.ndarray, context_slices: int):
    """Images [B,H,W,k] float32 and centre labels [B,H,W] uint8 for slice indices [B]."""
    return _fetch(self, idx, context_slices)


class TfdsSlices:
  """The slices of one split of any TFDS dataset folder (`tfds.builder_from_directory`'s) with
  an 'image' feature [H, W] or [H, W, 1] (float, in [-1, 1] as prepared images are) and
  optionally 'label' [H, W] (class indices) and 'case_id' (a case's slices consecutive, in
  order: needed for context_slices > 1). Reads every record once at the start (foreground and
  case indices)."""

  def __init__(self, path, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    try:
      builder = tfds.builder_from_directory(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: not a TFDS dataset folder ({type(e).__name__}: {e})') from e
    features = builder.info.features
    shape = tuple(features['image'].shape) if 'image' in features else ()
    if len(shape) == 3 and shape[-1] == 1:
      shape = shape[:2]
    if len(shape) != 2 or None in shape:
      raise ValueError(
        f'{path}: needs an "image" feature of fixed size [H, W] or [H, W, 1], found '
        f'{dict(features).keys() if "image" not in features else shape}'
      )
    if split not in builder.info.splits:
      raise ValueError(f'{path}: no split {split!r} (has {", ".join(builder.info.splits)})')
    self.source = builder.as_data_source(split)
    self.size, self.has_labels = shape, 'label' in features
    self.prepared_dir, self.split = path, split
    n = len(self.source)
    self.has_foreground = np.zeros(n, bool)
    case = np.arange(n)
    if self.has_labels or 'case_id' in features:
      ids = {}
      for i in range(n):
        record = self.source[i]
        if self.has_labels:
          self.has_foreground[i] = np.any(record['label'])
        if 'case_id' in features:
          case[i] = ids.setdefault(record['case_id'], len(ids))
    starts = np.r_[0, np.flatnonzero(np.diff(case)) + 1]
    ends = np.r_[starts[1:], n] - 1
    run = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, n]))
    self.slice_lo, self.slice_hi = starts[run], ends[run]

  def __len__(self):
    return len(self.source)

  context_indices = SplitArrays.context_indices

  def fetch(self, idx: np.ndarray, context_slices: int):
    """Images [B,H,W,k] float32 and centre labels [B,H,W] uint8 for slice indices [B]."""
    return _fetch(self, idx, context_slices)


def training_slices(path, split: str = 'train', max_cases: int = 0):
  """SplitSlices of a prepared folder, or TfdsSlices of a TFDS dataset folder (one with
  dataset_info.json; max_cases must then be 0)."""
  if os.path.isfile(os.path.join(os.fspath(path), 'dataset_info.json')):
    if max_cases:
      raise ValueError(f'{path}: a TFDS dataset folder has no cases to limit (max_cases)')
    return TfdsSlices(path, split)
  return SplitSlices(path, split, max_cases)


def dataset_info(prepared_dir) -> dict:
  """What the trainer needs from a prepared manifest.

  Returns {"num_classes", "class_names", "channels" (1 per slice; times context_slices for
  2.5D), "image_size" (H, W), "in_plane_spacing_mm" (y, x), "modality", "num_slices" {split: n},
  "num_cases" {split: n}}.
  """
  m = manifest_lib.read_manifest(prepared_dir)
  return {
    'num_classes': m['num_classes'],
    'class_names': list(m['class_names']),
    'channels': m['channels'],
    'image_size': tuple(m['size']),
    'in_plane_spacing_mm': tuple(m['in_plane_spacing_mm']),
    'modality': m['spec']['modality'],
    'dataset_modality': m['dataset']['modality'],
    'num_slices': {s: sum(c['num_slices'] for c in cs) for s, cs in m['splits'].items()},
    'num_cases': {s: len(cs) for s, cs in m['splits'].items()},
  }


def preparation_record(prepared_dir) -> dict:
  """JSON-able record of how a prepared dataset was made (spec, classes, splits, summary)."""
  m = manifest_lib.read_manifest(prepared_dir)
  return {
    'prepared_dir': os.path.abspath(os.fspath(prepared_dir)),
    'version': m['version'],
    'spec': m['spec'],
    'dataset': m['dataset'],
    'num_classes': m['num_classes'],
    'class_names': m['class_names'],
    'splits': {s: [c['case_id'] for c in cs] for s, cs in m['splits'].items()},
    'summary': m['summary'],
  }


def load_eval_volumes(prepared_dir, split: str = 'validation') -> list:
  """Whole prepared volumes of a split.

  Returns a list of {"case_id", "image" [Z,H,W] float32, "label" [Z,H,W] uint8 (zeros when the
  split has no labels), "has_label" bool, "spacing_mm" (z, y, x) of the prepared grid,
  "geometry" Geometry (for `data_prep.prepare.invert_labels`)}.
  """
  arrays = SplitArrays(prepared_dir, split)
  out = []
  for c in arrays.cases:
    lo, hi = c['offset'], c['offset'] + c['num_slices']
    out.append(
      {
        'case_id': c['case_id'],
        'image': np.array(arrays.images[lo:hi], np.float32),
        'label': np.array(arrays.labels[lo:hi], np.uint8),
        'has_label': c['has_label'],
        'spacing_mm': tuple(c['spacing_mm']),
        'geometry': Geometry.from_dict(c['geometry']),
      }
    )
  return out


# ---------------------------------------------------------------------------------------------
# The training stream.


def augment_params(augment) -> Optional[dict]:
  """The augmentation config with defaults filled in (flip probabilities as floats), or None."""
  if augment is False:
    return None
  cfg = dict(DEFAULT_AUGMENT, **_AUGMENT_OFF)
  if augment is not None:
    given = dict(augment.to_dict() if hasattr(augment, 'to_dict') else augment)
    if given.pop('enabled', True) is False:
      return None
    unknown = set(given) - set(cfg)
    if unknown:
      raise ValueError(f'unknown augment keys {sorted(unknown)}; known: {sorted(cfg)}')
    cfg.update(given)
  for key in ('flip', 'flip_ud'):
    cfg[key] = float(cfg[key]) * (0.5 if isinstance(cfg[key], bool) else 1.0)
  return cfg


def _draw_params(
  rng: np.random.Generator,
  n: int,
  fg: np.ndarray,
  foreground_ratio: float,
  augment: Optional[dict],
  gb: int,
  size,
) -> dict:
  """Random choices of one global batch: slice indices [gb] and augmentation [gb, 8], [gb, 2]."""
  idx = rng.integers(0, n, gb)
  if fg is not None:
    pick_fg = rng.random(gb) < foreground_ratio
    idx = np.where(pick_fg, fg[rng.integers(0, fg.size, gb)], idx)
  out = {'idx': idx}
  if augment is not None:
    h, w = size
    contrast = 1.0 + rng.uniform(-augment['intensity'], augment['intensity'], gb)
    shift = rng.uniform(-augment['intensity'], augment['intensity'], gb)
    angle = rng.uniform(-1.0, 1.0, gb) * np.deg2rad(augment['rotate_deg'])
    scale = 1.0 + rng.uniform(-augment['scale'], augment['scale'], gb)
    sx = np.where(rng.random(gb) < augment['flip'], -1.0, 1.0)
    sy = np.where(rng.random(gb) < augment['flip_ud'], -1.0, 1.0)
    # Output pixel (x=col, y=row) -> input: in = R(angle) diag(sx, sy) (out - c) / scale + c.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    a0, a1, b0, b1 = cos * sx, -sin * sy, sin * sx, cos * sy
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    zeros = np.zeros(gb)
    out['transform'] = np.stack(
      [a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], 1
    ).astype(np.float32)
    out['jitter'] = np.stack([contrast, shift], 1).astype(np.float32)
  return out


def _make_tf_augment():
  """Host augmentation as a tf.function (C++ kernels, intra-op parallel, no Python callbacks).

  ImportError (one line) when TensorFlow is not installed."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"augment_on='host' warps with TensorFlow, which is not installed: {TENSORFLOW_INSTALL}, "
      "or augment on the device (augment_on='device')"
    ) from e

  @tf.function(reduce_retracing=True)
  def augment(images, labels, transforms, jitter):
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    contrast = tf.reshape(jitter[:, 0], [-1, 1, 1, 1])
    shift = tf.reshape(jitter[:, 1], [-1, 1, 1, 1])
    images = tf.clip_by_value(images * contrast + shift, -1.0, 1.0)
    images = tf.raw_ops.ImageProjectiveTransformV3(
      images=images,
      transforms=transforms,
      output_shape=tf.stack([h, w]),
      fill_value=-1.0,
      interpolation='BILINEAR',
      fill_mode='CONSTANT',
    )
    labels = tf.raw_ops.ImageProjectiveTransformV3(
      images=labels[..., None],
      transforms=transforms,
      output_shape=tf.stack([h, w]),
      fill_value=0.0,
      interpolation='NEAREST',
      fill_mode='CONSTANT',
    )[..., 0]
    return images, tf.cast(labels, tf.int32)

  return augment


def _device_augment(batch):
  """Device augmentation (jax), same transform convention as the host one.

  batch: {"image" [B,H,W,C] f32, "label" [B,H,W] u8, "has_label", "transform" [B,8] (output
  (x, y) -> input (a0 x + a1 y + a2, b0 x + b1 y + b2)), "jitter" [B,2] (contrast, shift)}.
  Returns {"image" f32 (bilinear, outside -1), "label" i32 (nearest, outside 0), "has_label"}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  images, labels, t, jit = batch['image'], batch['label'], batch['transform'], batch['jitter']
  b, h, w, c = images.shape
  images = jnp.clip(images * jit[:, 0, None, None, None] + jit[:, 1, None, None, None], -1, 1)
  yy, xx = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij'
  )
  xin = t[:, 0, None, None] * xx + t[:, 1, None, None] * yy + t[:, 2, None, None]  # [B,H,W]
  yin = t[:, 3, None, None] * xx + t[:, 4, None, None] * yy + t[:, 5, None, None]
  flat = images.reshape(b, h * w, c)

  def sample(yi, xi):
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(b, h * w, 1)
    values = jnp.take_along_axis(flat, idx, axis=1).reshape(b, h, w, c)
    return jnp.where(inside[..., None], values, -1.0)

  x0, y0 = jnp.floor(xin), jnp.floor(yin)
  fx, fy = (xin - x0)[..., None], (yin - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  image = (1 - fy) * ((1 - fx) * sample(y0, x0) + fx * sample(y0, x0 + 1)) + fy * (
    (1 - fx) * sample(y0 + 1, x0) + fx * sample(y0 + 1, x0 + 1)
  )
  xn, yn = jnp.floor(xin + 0.5).astype(jnp.int32), jnp.floor(yin + 0.5).astype(jnp.int32)
  inside = (yn >= 0) & (yn < h) & (xn >= 0) & (xn < w)
  idx = (jnp.clip(yn, 0, h - 1) * w + jnp.clip(xn, 0, w - 1)).reshape(b, h * w)
  label = jnp.take_along_axis(labels.reshape(b, h * w), idx, axis=1).reshape(b, h, w)
  label = jnp.where(inside, label, 0).astype(jnp.int32)
  return {'image': image, 'label': label, 'has_label': batch['has_label']}


def paired_indices(source: SplitArrays, target: SplitArrays) -> np.ndarray:
  """[len(source)] int64: for each source slice, the index of the target slice of the same case
  id and position in its case. ValueError naming the case where the target split lacks it or
  has another number of slices (the datasets are not co-registered)."""
  if not hasattr(target, 'cases'):
    raise ValueError(
      f'{target.prepared_dir}: data.paired needs a prepared target folder, not a TFDS dataset'
    )
  by_id = {c['case_id']: c for c in target.cases}
  out = np.empty(len(source), np.int64)
  for c in source.cases:
    t = by_id.get(c['case_id'])
    if t is None or t['num_slices'] != c['num_slices']:
      found = 'not in it' if t is None else f'{t["num_slices"]} slices there'
      raise ValueError(
        f'{target.prepared_dir}: split {target.split!r} has no co-registered copy of source case '
        f'{c["case_id"]!r} ({c["num_slices"]} slices in {source.prepared_dir}; {found}), which '
        'data.paired needs'
      )
    out[c['offset'] : c['offset'] + c['num_slices']] = t['offset'] + np.arange(c['num_slices'])
  return out


class _Stream:
  """One side (source or target): batch i as numpy arrays, a pure function of (seed, i).

  lead: (stream, index map) for the paired target side: batch i takes the lead stream's random
  choices of batch i, its slice indices mapped through `index map` (`paired_indices`).
  """

  def __init__(
    self,
    arrays: SplitSlices,
    *,
    seed: int,
    stream: int,
    global_batch_size: int,
    process_index: int,
    local_batch_size: int,
    foreground_ratio: float,
    augment: Optional[dict],
    context_slices: int,
    use_labels: bool,
    on_device: bool,
    tf_augment,
    lead=None,
  ):
    if len(arrays) == 0:
      raise ValueError(f'{arrays.prepared_dir}: split {arrays.split!r} has no slices')
    self.arrays, self.seed, self.stream = arrays, int(seed), int(stream)
    self.gb, self.local = global_batch_size, local_batch_size
    self.rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    fg = np.nonzero(arrays.has_foreground)[0]
    self.has_label = bool(use_labels and arrays.has_labels)
    self.fg = fg if (self.has_label and fg.size and foreground_ratio > 0) else None
    self.foreground_ratio, self.augment = foreground_ratio, augment
    self.context_slices, self.on_device, self.tf_augment = context_slices, on_device, tf_augment
    self.lead = lead

  def params(self, step: int) -> dict:
    """Batch `step`'s random choices for the whole global batch (`_draw_params`)."""
    if self.lead is not None:
      stream, index_map = self.lead
      p = stream.params(step)
      return dict(p, idx=index_map[p['idx']])
    rng = np.random.default_rng([self.seed, self.stream, int(step)])
    return _draw_params(
      rng, len(self.arrays), self.fg, self.foreground_ratio, self.augment, self.gb, self.arrays.size
    )

  def batch(self, step: int) -> dict:
    p = self.params(step)
    images, labels = self.arrays.fetch(p['idx'][self.rows], self.context_slices)
    if not self.has_label:
      labels = np.zeros_like(labels)
    out = {
      'image': images,
      'label': labels,
      'has_label': np.full(self.local, float(self.has_label), np.float32),
    }
    if self.augment is not None:
      t, j = p['transform'][self.rows], p['jitter'][self.rows]
      if self.on_device:
        out.update(transform=t, jitter=j)
      else:
        image, label = self.tf_augment(images, labels, t, j)
        out['image'], out['label'] = image.numpy(), label.numpy()
    if 'transform' not in out and out['label'].dtype != np.int32:
      out['label'] = out['label'].astype(np.int32)
    return out


def _grain_iterator(make, start: int, stop: Optional[int], ahead: int, workers: int):
  """Iterator of make(i) for i = start, start+1, ... < stop (endless if None): a grain
  MapDataset over step indices, `workers` threads computing `ahead` batches in advance, in
  order. Its position is the step, which the orbax checkpoint holds, so resuming at
  `start=step` continues it exactly. `close()` stops its threads."""
  import grain  # pylint: disable=g-import-not-at-top

  steps = grain.MapDataset.range(start, _ENDLESS if stop is None else stop).map(make)
  options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(1, ahead))
  return iter(steps.to_iter_dataset(options))


def _check_arguments(
  global_batch_size: int, seed: int, foreground_ratio: float, context_slices: int, mesh
) -> None:
  """ValueError for arguments of `create_train_iterator` that no batch could satisfy."""
  if context_slices < 1 or context_slices % 2 == 0:
    raise ValueError(f'context_slices must be odd and >= 1, got {context_slices}')
  if not 0.0 <= foreground_ratio <= 1.0:
    raise ValueError(f'foreground_ratio must be in [0, 1], got {foreground_ratio}')
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}')
  process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch {global_batch_size} is not divisible by {process_count} processes'
    )
  if mesh is not None and global_batch_size % mesh.shape[DATA_AXIS]:
    raise ValueError(
      f'global batch {global_batch_size} is not divisible by the {DATA_AXIS!r} '
      f'mesh axis ({mesh.shape[DATA_AXIS]} devices)'
    )


def _warps_on_device(augment: Optional[dict], augment_on: str) -> bool:
  """Whether the warps run on the device ("auto" = "device"); False without augmentation."""
  if augment_on not in ('auto', 'host', 'device'):
    raise ValueError(f"augment_on must be 'auto', 'host' or 'device', got {augment_on!r}")
  if augment_on == 'auto':  # the jax warp was ~2x faster than TF's even on 2 CPU cores
    augment_on = 'device'
  return augment is not None and augment_on == 'device'


def _open_sides(source_dir, target_dir, split: str, source_cases: int = 0):
  """(source, target) SplitSlices (the source's first `source_cases` cases if > 0); ValueError
  when their slices differ in size."""
  source = training_slices(source_dir, split, source_cases)
  target = training_slices(target_dir, split)
  if source.size != target.size:
    raise ValueError(
      f'source slices {source.size} and target slices {target.size} differ in size; prepare '
      'both with one size'
    )
  return source, target


def _placement(mesh):
  """(sharding, to_jax): batches sharded on the mesh's data axis, or on the first device."""
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return sharding, lambda x: jax.device_put(x, sharding)
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return sharding, lambda x: jax.make_array_from_process_local_data(sharding, x)


def _batch_maker(streams, mesh, on_device: bool):
  """make(step) -> (source, target) batch of jax Arrays (warped there when on_device)."""
  sharding, to_jax = _placement(mesh)
  warp = jax.jit(_device_augment, out_shardings=sharding) if on_device else None

  def make(step):
    batch = tuple(jax.tree.map(to_jax, s.batch(step)) for s in streams)
    if warp is not None:
      batch = tuple(warp(side) for side in batch)
    return batch

  return make


def create_train_iterator(
  source_dir,
  target_dir,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  foreground_ratio: float = FOREGROUND_RATIO,
  augment=None,
  context_slices: int = 1,
  target_labels: bool = True,
  mesh=None,
  prefetch: int = PREFETCH,
  num_steps: Optional[int] = None,
  split: str = 'train',
  augment_on: str = 'auto',
  num_workers: Optional[int] = None,
  source_cases: int = 0,
  paired: bool = False,
):
  """Unpaired (source, target) training batches (see the module docstring).

  Args: prepared source/target folders; global_batch_size (examples per batch over all
  processes, each side); seed (batch i depends only on (seed, i)); start_step (first batch,
  to resume); foreground_ratio (probability an example comes from slices with foreground);
  augment (dict of the module docstring's settings; None: defaults, False or
  {"enabled": False}: none); context_slices (k, odd); target_labels (deliver target labels or
  zero them); mesh (batches are global arrays sharded on its "data" axis; None: the first local
  device); prefetch (batches prepared ahead); num_steps (None: endless); split; augment_on
  ("device": a jitted jax warp on the sharded batch, "host": TensorFlow C++ kernels, if it is
  installed, "auto" = "device"; same random parameters, rounding differs); num_workers (default:
  CPUs, at most 4); source_cases (if > 0, the source side uses only its split's first
  `source_cases` cases); paired (the target example r is the co-registered slice of the
  source example r, same augmentation).
  Returns an iterator of (src, tgt) dicts {"image": [B,H,W,k] f32, "label": [B,H,W] i32,
  "has_label": [B] f32}; `close()` stops its threads.
  """
  _check_arguments(global_batch_size, seed, foreground_ratio, context_slices, mesh)
  aug = augment_params(augment)
  on_device = _warps_on_device(aug, augment_on)
  source, target = _open_sides(source_dir, target_dir, split, source_cases)
  settings = dict(
    seed=seed,
    global_batch_size=global_batch_size,
    foreground_ratio=float(foreground_ratio),
    augment=aug,
    context_slices=int(context_slices),
    on_device=on_device,
  )
  streams = _streams(source, target, target_labels, settings, paired)
  workers = num_workers or max(1, min(4, os.cpu_count() or 1))
  stop = None if num_steps is None else int(start_step) + int(num_steps)
  return _grain_iterator(
    _batch_maker(streams, mesh, on_device),
    int(start_step),
    stop,
    ahead=max(prefetch, workers),
    workers=workers,
  )


def _streams(source, target, target_labels, settings, paired=False):
  """The source and target _Stream of this process; `settings` as _Stream's keywords; paired:
  the target follows the source's choices (`paired_indices`)."""
  common = dict(
    settings,
    process_index=jax.process_index(),
    local_batch_size=settings['global_batch_size'] // jax.process_count(),
    tf_augment=_make_tf_augment()
    if (settings['augment'] is not None and not settings['on_device'])
    else None,
  )
  source_stream = _Stream(source, stream=_SOURCE_STREAM, use_labels=True, **common)
  lead = (source_stream, paired_indices(source, target)) if paired else None
  return (
    source_stream,
    _Stream(target, stream=_TARGET_STREAM, use_labels=target_labels, lead=lead, **common),
  )
