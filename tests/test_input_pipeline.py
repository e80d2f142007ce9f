"""Tests for cmedl_jax.input_pipeline: determinism, resume, sharding, augmentation alignment."""

import itertools
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import ndimage
import tensorflow_datasets as tfds

from cmedl_jax import inference
from cmedl_jax import input_pipeline as ip
from data_prep import prepare as P
from tests.fixtures import synthetic as S

SIZE = 32
CT_TUMOR = (400.0 + 1000.0) / 1500.0 * 2.0 - 1.0  # 0.867 in [-1, 1] (window -1000..500 HU)
CT_BODY = (0.0 + 1000.0) / 1500.0 * 2.0 - 1.0  # 0.333


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  ct = {}
  for k in range(4):
    image, label, affine = S.toy_case(seed=k)
    image[0, 0, :] = -1000 + 80 * np.arange(image.shape[2])  # air marker: slices all differ
    ct[f'ct_{k}'] = (image, label, affine)
  mri = {}
  for k in range(3):
    image, label, affine = S.toy_case(shape=(22, 20, 5), seed=10 + k)
    mri[f'mr_{k}'] = ((image + 1000.0).astype(np.float32) * 0.3, label, affine)
  S.write_dataset(str(root / 'ct_raw'), ct)
  S.write_dataset(str(root / 'mr_raw'), mri, modality='T2')
  # Prepared at the original 1.5 mm: the prepared images stay piecewise constant, so the
  # alignment test below has exact bounds (one interpolation only: the augmentation's).
  P.prepare_dataset(
    root / 'ct_raw',
    root / 'ct',
    P.PrepSpec(spacing_mm=1.5, size=SIZE),
    val_fraction=0.25,
    seed=0,
    progress=False,
  )
  P.prepare_dataset(
    root / 'mr_raw',
    root / 'mr',
    P.PrepSpec(modality='mri', spacing_mm=1.5, size=SIZE),
    val_fraction=0.0,
    progress=False,
  )
  return str(root / 'ct'), str(root / 'mr')


def take(it, n):
  return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


def assert_batches_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_batches_are_a_function_of_seed_and_step(prepared):
  ct, mr = prepared
  kw = dict(global_batch_size=4, seed=7, context_slices=1)
  run = take(ip.create_train_iterator(ct, mr, num_steps=5, **kw), 5)
  again = take(ip.create_train_iterator(ct, mr, num_steps=5, **kw), 5)
  resumed = take(ip.create_train_iterator(ct, mr, start_step=3, **kw), 2)
  assert len(run) == 5
  assert_batches_equal(run, again)
  assert_batches_equal(run[3:], resumed)
  other = take(ip.create_train_iterator(ct, mr, num_steps=1, **{**kw, 'seed': 8}), 1)
  assert not np.array_equal(other[0][0]['image'], run[0][0]['image'])
  # Consecutive batches differ, and the two streams are shuffled independently.
  assert not np.array_equal(run[0][0]['image'], run[1][0]['image'])
  same = take(ip.create_train_iterator(ct, ct, num_steps=2, **kw), 2)
  assert not np.array_equal(same[0][0]['image'], same[0][1]['image'])


def test_batch_shapes_types_and_target_without_labels(prepared):
  ct, mr = prepared
  ((src, tgt),) = take(
    ip.create_train_iterator(
      ct, mr, global_batch_size=6, seed=0, context_slices=3, target_labels=False, num_steps=1
    ),
    1,
  )
  assert src['image'].shape == (6, SIZE, SIZE, 3) and src['image'].dtype == np.float32
  assert src['label'].shape == (6, SIZE, SIZE) and src['label'].dtype == np.int32
  assert src['image'].min() >= -1.0 and src['image'].max() <= 1.0
  np.testing.assert_array_equal(src['has_label'], np.ones(6, np.float32))
  np.testing.assert_array_equal(tgt['has_label'], np.zeros(6, np.float32))
  assert not tgt['label'].any()


def test_sharded_on_data_axis_over_8_devices(prepared):
  ct, mr = prepared
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()), ('data',))
  kw = dict(global_batch_size=16, seed=1, num_steps=1)
  it = ip.create_train_iterator(ct, mr, mesh=mesh, **kw)
  src, tgt = next(it)
  for batch in (src, tgt):
    for x in batch.values():
      assert isinstance(x, jax.Array)
      assert x.sharding == NamedSharding(mesh, PartitionSpec('data'))
      assert len(x.addressable_shards) == 8
      assert {s.data.shape[0] for s in x.addressable_shards} == {2}
  assert src['image'].shape == (16, SIZE, SIZE, 1)
  ((plain_src, _),) = take(ip.create_train_iterator(ct, mr, **kw), 1)
  np.testing.assert_array_equal(np.asarray(src['image']), plain_src['image'])


def test_training_slices_are_read_from_the_tfds_build(prepared, tmp_path):
  """The iterator reads the prepared folder's TFDS dataset (ArrayRecord, through tfds data
  sources and grain): zeroing the train split's .npy images changes no batch; without the
  build it is a one-line error naming the folder."""
  ct, mr = prepared
  kw = dict(global_batch_size=8, seed=2, augment=False, num_steps=2)
  want = take(ip.create_train_iterator(ct, mr, **kw), 2)
  copy = shutil.copytree(ct, tmp_path / 'ct')
  images = np.load(copy / 'train' / 'images.npy')
  np.save(copy / 'train' / 'images.npy', np.zeros_like(images))
  assert_batches_equal(take(ip.create_train_iterator(str(copy), mr, **kw), 2), want)
  shutil.rmtree(copy / 'tfds')
  with pytest.raises(FileNotFoundError, match=f'{copy}: no TFDS build of its slices'):
    ip.create_train_iterator(str(copy), mr, **kw)


class MyMriSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS dataset built elsewhere: the training slices of a prepared folder (`examples`, in
  order) as images [H, W, 1] and labels, no case ids."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, examples, **kwargs):
    self.examples = examples
    super().__init__(**kwargs)

  def _info(self):
    h, w = self.examples['label'].shape[1:]
    features = {
      'image': tfds.features.Tensor(shape=(h, w, 1), dtype=np.float32),
      'label': tfds.features.Tensor(shape=(h, w), dtype=np.uint8),
    }
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(zip(self.examples['image'], self.examples['label'])):
      yield i, {'image': image, 'label': label}


def test_the_target_side_can_be_any_tfds_dataset(prepared, tmp_path):
  """A TFDS dataset built elsewhere (a TFDS builder's ArrayRecord: images [H, W, 1], labels, no
  case ids) holding the MRI side's training slices in order gives the same batches as the
  prepared folder; context slices need case ids."""
  ct, mr = prepared
  arrays = ip.SplitArrays(mr, 'train')
  examples = {'image': np.asarray(arrays.images)[..., None], 'label': np.asarray(arrays.labels)}
  builder = MyMriSlices(examples=examples, data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare()
  kw = dict(global_batch_size=8, seed=6, num_steps=2, target_labels=True)
  want = take(ip.create_train_iterator(ct, mr, **kw), 2)
  got = take(ip.create_train_iterator(ct, builder.data_dir, **kw), 2)
  assert_batches_equal(got, want)
  assert got[0][1]['has_label'].min() == 1.0
  assert ip.TfdsSlices(builder.data_dir, 'train').slice_lo.tolist() == list(range(len(arrays)))
  with pytest.raises(ValueError, match='no split'):
    ip.TfdsSlices(builder.data_dir, 'validation')


def test_global_batch_is_independent_of_process_count(prepared, monkeypatch):
  ct, mr = prepared
  kw = dict(global_batch_size=8, seed=3, num_steps=2)
  whole = take(ip.create_train_iterator(ct, mr, **kw), 2)
  parts = []
  for index in (0, 1):
    monkeypatch.setattr(ip.jax, 'process_count', lambda: 2)
    monkeypatch.setattr(ip.jax, 'process_index', lambda i=index: i)
    parts.append(take(ip.create_train_iterator(ct, mr, **kw), 2))
  for step in range(2):
    for side in (0, 1):
      for key in ('image', 'label', 'has_label'):
        assert parts[0][step][side][key].shape[0] == 4
        np.testing.assert_array_equal(
          np.concatenate([parts[0][step][side][key], parts[1][step][side][key]]),
          whole[step][side][key],
        )


@pytest.mark.parametrize(
  'augment_on', [pytest.param('host', marks=pytest.mark.tensorflow), 'device']
)
def test_augmentation_keeps_image_and_label_aligned(prepared, augment_on):
  """Bilinear image and nearest label under one transform: a pixel whose image value is mostly
  tumor must be labelled tumor, and a labelled pixel must be at least 1/4 tumor."""
  ct, mr = prepared
  augment = dict(flip=True, flip_ud=True, rotate_deg=25.0, scale=0.2, intensity=0.0)
  batches = take(
    ip.create_train_iterator(
      ct,
      mr,
      global_batch_size=16,
      seed=5,
      augment=augment,
      foreground_ratio=1.0,
      num_steps=3,
      augment_on=augment_on,
    ),
    3,
  )
  plain = take(
    ip.create_train_iterator(
      ct, mr, global_batch_size=16, seed=5, augment=False, foreground_ratio=1.0, num_steps=3
    ),
    3,
  )
  mostly_tumor = CT_BODY + 0.875 * (CT_TUMOR - CT_BODY) + 1e-4
  quarter_tumor = CT_BODY + 0.25 * (CT_TUMOR - CT_BODY) - 1e-4
  n_tumor = 0
  for (src, _), (ref, _) in zip(batches, plain):
    image, label = src['image'][..., 0], src['label']
    assert not np.array_equal(image, ref['image'][..., 0])  # the warp did something
    assert (label[image > mostly_tumor] == 1).all()
    assert (image[label == 1] > quarter_tumor).all()
    n_tumor += int((label == 1).sum())
    # Geometric augmentation preserves the label set and roughly the tumor area (scale 0.8-1.2).
    area_aug, area_ref = (label == 1).sum((1, 2)), (ref['label'] == 1).sum((1, 2))
    assert set(np.unique(label)) <= {0, 1}
    assert (area_aug <= area_ref / 0.8**2 + 8).all()
  assert n_tumor > 100


@pytest.mark.tensorflow
def test_host_and_device_augmentation_agree(prepared):
  ct, mr = prepared
  kw = dict(
    global_batch_size=8,
    seed=9,
    num_steps=2,
    context_slices=3,
    augment=dict(flip=True, rotate_deg=20.0, scale=0.15, intensity=0.1),
  )
  mesh = Mesh(np.array(jax.devices()), ('data',))
  host = take(ip.create_train_iterator(ct, mr, augment_on='host', **kw), 2)
  device_iter = ip.create_train_iterator(ct, mr, augment_on='device', mesh=mesh, **kw)
  src, _ = next(device_iter)
  assert src['image'].sharding == NamedSharding(mesh, PartitionSpec('data'))
  assert src['label'].dtype == np.int32
  device = [jax.tree.map(np.asarray, (src, _))] + take(device_iter, 1)
  for (hs, ht), (ds, dt) in zip(host, device):
    for h, d in ((hs, ds), (ht, dt)):
      assert np.mean(h['label'] == d['label']) > 0.995  # ties at pixel boundaries may differ
      close = np.abs(h['image'] - d['image']) < 1e-3
      assert close.mean() > 0.99
      np.testing.assert_array_equal(h['has_label'], d['has_label'])


def test_intensity_jitter_changes_contrast_within_range(prepared):
  ct, mr = prepared
  kw = dict(global_batch_size=8, seed=2, num_steps=1, foreground_ratio=1.0)
  aug = dict(flip=False, rotate_deg=0.0, scale=0.0, intensity=0.1)
  ((src, _),) = take(ip.create_train_iterator(ct, mr, augment=aug, **kw), 1)
  ((ref, _),) = take(ip.create_train_iterator(ct, mr, augment=False, **kw), 1)
  np.testing.assert_array_equal(src['label'], ref['label'])  # identity geometry
  x, y = ref['image'].reshape(8, -1), src['image'].reshape(8, -1)
  solved = 0
  for a, b in zip(x, y):  # per example b = clip(c * a + s, -1, 1), c in [0.9, 1.1], |s| <= 0.1
    assert (np.abs(b - a) <= 0.1 * np.abs(a) + 0.1 + 1e-5).all()
    order = np.argsort(a, kind='stable')
    assert (np.diff(b[order]) >= -1e-6).all()  # monotone in a
    free = np.abs(b) < 0.999
    values = np.unique(a[free])
    if len(values) >= 2:
      lo, hi = values[0], values[-1]
      blo, bhi = b[free][a[free] == lo][0], b[free][a[free] == hi][0]
      c = (bhi - blo) / (hi - lo)
      s = blo - c * lo
      assert 0.9 - 1e-4 <= c <= 1.1 + 1e-4 and -0.1 - 1e-4 <= s <= 0.1 + 1e-4
      np.testing.assert_allclose(b, np.clip(c * a + s, -1, 1), atol=1e-4)
      solved += 1
  assert solved >= 1 and not np.array_equal(x, y)
  assert src['image'].min() >= -1.0 and src['image'].max() <= 1.0


@pytest.mark.parametrize('ratio', [0.0, 0.5, 1.0])
def test_foreground_oversampling_ratio(prepared, ratio):
  ct, mr = prepared
  arrays = ip.SplitArrays(ct, 'train')
  natural = arrays.has_foreground.mean()
  assert 0.2 < natural < 0.8
  n_batches, b = 48, 16
  batches = take(
    ip.create_train_iterator(
      ct,
      mr,
      global_batch_size=b,
      seed=11,
      augment=False,
      foreground_ratio=ratio,
      num_steps=n_batches,
    ),
    n_batches,
  )
  has_fg = np.concatenate([src['label'].reshape(b, -1).max(1) > 0 for src, _ in batches])
  expected = ratio + (1 - ratio) * natural
  sd = np.sqrt(max(expected * (1 - expected), 1e-12) / has_fg.size)
  assert abs(has_fg.mean() - expected) <= 4 * sd + 1e-9, (has_fg.mean(), expected)


def test_source_cases_limits_the_student_to_the_first_training_cases(prepared):
  """source_cases=2 (data.source.train_cases, the label-scarce cells): every source slice comes
  from the split's first two cases; the target side is untouched; too many is an error."""
  ct, mr = prepared
  full, first = ip.SplitArrays(ct, 'train'), ip.SplitArrays(ct, 'train', max_cases=2)
  assert [c['case_id'] for c in first.cases] == [c['case_id'] for c in full.cases[:2]]
  assert len(first) == int((full.case_index < 2).sum()) < len(full)
  allowed = np.asarray(first.images)
  kw = dict(global_batch_size=16, seed=4, augment=False, num_steps=3)
  batches = take(ip.create_train_iterator(ct, mr, source_cases=2, **kw), 3)
  for src, _ in batches:
    for example in src['image'][..., 0]:
      assert (allowed == example).all((1, 2)).any()
  plain = take(ip.create_train_iterator(ct, mr, **kw), 3)
  for (_, tgt), (_, want) in zip(batches, plain):
    np.testing.assert_array_equal(tgt['image'], want['image'])
  with pytest.raises(ValueError, match='fewer than the 99 asked for'):
    ip.SplitArrays(ct, 'train', max_cases=99)


def test_context_slices_are_neighbours_in_the_same_case(prepared):
  ct, mr = prepared
  arrays = ip.SplitArrays(ct, 'train')
  kw = dict(global_batch_size=16, seed=4, augment=False, num_steps=2)
  with_context = take(ip.create_train_iterator(ct, mr, context_slices=3, **kw), 2)
  single = take(ip.create_train_iterator(ct, mr, context_slices=1, **kw), 2)
  stored = np.asarray(arrays.images)
  for (src, _), (one, _) in zip(with_context, single):
    np.testing.assert_array_equal(src['image'][..., 1], one['image'][..., 0])
    for example in src['image']:
      (g,) = np.nonzero((stored == example[..., 1]).all((1, 2)))[0]
      case = arrays.case_index[g]
      lo = np.nonzero(arrays.case_index == case)[0].min()
      hi = np.nonzero(arrays.case_index == case)[0].max()
      np.testing.assert_array_equal(example[..., 0], stored[max(g - 1, lo)])
      np.testing.assert_array_equal(example[..., 2], stored[min(g + 1, hi)])


def test_context_stack_closed_form():
  vol = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
  out = inference.context_stack(vol, 3)
  assert out.shape == (4, 2, 3, 3)
  np.testing.assert_array_equal(out[:, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
  with pytest.raises(ValueError):
    inference.context_stack(vol, 2)


def test_eval_volumes_and_dataset_info(prepared):
  ct, _ = prepared
  vols = ip.load_eval_volumes(ct, 'validation')
  manifest = P.read_manifest(ct)
  assert [v['case_id'] for v in vols] == [c['case_id'] for c in manifest['splits']['validation']]
  (v,) = vols
  assert v['image'].shape == (6, SIZE, SIZE) and v['label'].dtype == np.uint8
  assert v['spacing_mm'] == (4.0, 1.5, 1.5)
  original = P.invert_labels(v['label'], v['geometry'])
  assert original.shape == (24, 20, 6) and original.sum() > 0
  info = ip.dataset_info(ct)
  assert info['num_classes'] == 2 and info['image_size'] == (SIZE, SIZE)
  assert info['num_slices']['train'] == 18 and info['modality'] == 'ct'
  record = ip.preparation_record(ct)
  assert record['splits']['validation'] == [v['case_id']]


def test_bad_arguments(prepared, tmp_path):
  ct, mr = prepared
  with pytest.raises(ValueError, match='unknown augment'):
    ip.create_train_iterator(ct, mr, global_batch_size=4, seed=0, augment={'rotate': 3})
  with pytest.raises(ValueError, match='divisible'):
    ip.create_train_iterator(
      ct, mr, global_batch_size=4, seed=0, mesh=Mesh(np.array(jax.devices()), ('data',))
    )
  with pytest.raises(P.DataError, match='prepared.json'):
    ip.create_train_iterator(str(tmp_path), mr, global_batch_size=4, seed=0)


# ---------------------------------------------------------------------------------------------
# Augmentation geometry against independent references: the host (TF) and device (jax) warps
# of `_draw_params`'s transforms, called directly on small synthetic batches.

AUG_H, AUG_W = 24, 32  # not square: a swapped H and W shows
NO_AUG = dict(flip=0.0, flip_ud=0.0, rotate_deg=0.0, scale=0.0, intensity=0.0)
_device_warp = jax.jit(ip._device_augment)


@pytest.fixture(
  scope='module', params=[pytest.param('host', marks=pytest.mark.tensorflow), 'device']
)
def warp(request):
  """warp(images, labels, params) -> (image, label) numpy: the host (TensorFlow) or the device
  (jax) warp with params' transform and jitter."""
  if request.param == 'host':
    tf_augment = ip._make_tf_augment()
    return lambda images, labels, params: tuple(
      x.numpy() for x in tf_augment(images, labels, params['transform'], params['jitter'])
    )

  def device(images, labels, params):
    batch = {'image': images, 'label': labels, 'has_label': np.ones(len(images), np.float32)}
    out = _device_warp(dict(batch, transform=params['transform'], jitter=params['jitter']))
    return np.asarray(out['image']), np.asarray(out['label'])

  return device


def smooth_batch():
  """Images [2, H, W, 2] (smooth, asymmetric, in (-1, 1)) and blocky labels [2, H, W] uint8."""
  y, x = np.mgrid[0:AUG_H, 0:AUG_W].astype(np.float64)
  images = np.stack(
    [
      np.stack(
        [
          0.9
          * np.sin(0.23 * x + 0.11 * (i + 1) * y + 0.7 * k + 0.3)
          * np.cos(0.17 * y - 0.05 * k * x)
          for k in range(2)
        ],
        -1,
      )
      for i in range(2)
    ]
  ).astype(np.float32)
  labels = np.stack([(x // 5 + 2 * (y // 4) + i) % 3 for i in range(2)]).astype(np.uint8)
  return images, labels


class FixedRng:
  """Stands in for the np.random.Generator of `_draw_params`: uniform(low, high) = low + t
  (high - low) for every draw, random() = 0.5 (flip probability 1 flips, 0 does not)."""

  def __init__(self, t):
    self.t = t

  def uniform(self, low, high, size):
    return np.full(size, low + self.t * (high - low))

  def random(self, size):
    return np.full(size, 0.5)

  def integers(self, low, high, size):
    return np.zeros(size, np.int64)


@pytest.mark.parametrize('flips', [dict(flip=1.0), dict(flip_ud=1.0), dict(flip=1.0, flip_ud=1.0)])
def test_flip_is_an_exact_mirror(warp, flips):
  aug = ip.augment_params(dict(NO_AUG, **flips))
  params = ip._draw_params(np.random.default_rng(0), 10, None, 0.0, aug, 2, (AUG_H, AUG_W))
  images, labels = smooth_batch()
  axes = tuple(axis for name, axis in (('flip_ud', 1), ('flip', 2)) if name in flips)
  image, label = warp(images, labels, params)
  np.testing.assert_array_equal(image, np.flip(images, axes))
  np.testing.assert_array_equal(label, np.flip(labels, axes))


def test_flip_true_means_probability_one_half():
  aug = ip.augment_params(dict(NO_AUG, flip=True, flip_ud=True))
  rng = np.random.default_rng(1)
  t = ip._draw_params(rng, 10, None, 0.0, aug, 4000, (AUG_H, AUG_W))['transform']
  for flipped in (t[:, 0] < 0, t[:, 4] < 0):  # a0 = sx / scale, b1 = sy / scale at angle 0
    assert abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / 4000)


@pytest.mark.parametrize('t, flip', [(1.0, 0.0), (0.0, 0.0), (0.8, 1.0)])
def test_rotation_and_scale_match_scipy_affine_transform(warp, t, flip):
  """With every uniform draw at fraction t of its range: angle (2t - 1) * 30 degrees, scale
  1 + (2t - 1) * 0.2; the warp of output (x, y) -> input is R(angle) diag(+-1, 1) (out - c) / scale
  + c (c the image centre), here rebuilt in scipy's (row, col) order."""
  aug = ip.augment_params(dict(NO_AUG, flip=flip, rotate_deg=30.0, scale=0.2))
  params = ip._draw_params(FixedRng(t), 10, None, 0.0, aug, 2, (AUG_H, AUG_W))
  theta = (2 * t - 1) * 30.0 * np.pi / 180.0
  scale = 1.0 + (2 * t - 1) * 0.2
  sx = -1.0 if flip else 1.0
  xy = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  xy = xy @ np.diag([sx, 1.0]) / scale
  m = xy[::-1, ::-1]  # the same map on (row, col) = (y, x)
  centre = np.array([(AUG_H - 1) / 2.0, (AUG_W - 1) / 2.0])
  offset = centre - m @ centre
  images, labels = smooth_batch()
  ref = np.stack(
    [
      np.stack(
        [
          ndimage.affine_transform(
            images[i, ..., k].astype(np.float64), m, offset, order=1, mode='constant', cval=-1.0
          )
          for k in range(2)
        ],
        -1,
      )
      for i in range(2)
    ]
  )
  rc = np.stack(np.mgrid[0:AUG_H, 0:AUG_W], -1) @ m.T + offset  # input (row, col) of each pixel
  size = np.array([AUG_H, AUG_W])
  interior = ((rc >= 1) & (rc <= size - 2)).all(-1)
  outside = ((rc < -1.01) | (rc > size + 0.01)).any(-1)
  assert interior.mean() > 0.4 and outside.mean() > 0.02
  near = np.floor(rc + 0.5).astype(int)
  in_grid = ((near >= 0) & (near < size)).all(-1)
  ref_label = np.where(
    in_grid, labels[:, np.clip(near[..., 0], 0, AUG_H - 1), np.clip(near[..., 1], 0, AUG_W - 1)], 0
  )
  no_tie = (np.abs(rc % 1.0 - 0.5) > 1e-3).all(-1)  # nearest-neighbour ties may go either way
  image, label = warp(images, labels, params)
  np.testing.assert_allclose(image[:, interior], ref[:, interior], atol=1e-4)
  np.testing.assert_allclose(image[:, outside], -1.0, atol=1e-6)
  np.testing.assert_array_equal(label[:, no_tie], ref_label[:, no_tie])


def test_positive_angle_turns_the_content_counterclockwise(warp):
  """rotate_deg=30 at its maximum: a blob 8 px right of the centre moves to 30 degrees above
  the x axis (rows grow downwards, so counterclockwise as displayed)."""
  aug = ip.augment_params(dict(NO_AUG, rotate_deg=30.0))
  params = ip._draw_params(FixedRng(1.0), 10, None, 0.0, aug, 2, (AUG_H, AUG_W))
  y, x = np.mgrid[0:AUG_H, 0:AUG_W].astype(np.float64)
  cx, cy = (AUG_W - 1) / 2.0, (AUG_H - 1) / 2.0
  blob = -1.0 + 1.8 * np.exp(-((x - cx - 8.0) ** 2 + (y - cy) ** 2) / (2 * 1.5**2))
  images = np.broadcast_to(blob[None, :, :, None], (2, AUG_H, AUG_W, 2)).astype(np.float32)
  image, _ = warp(images, np.zeros((2, AUG_H, AUG_W), np.uint8), params)
  weight = image[0, ..., 0] + 1.0
  dx = (weight * (x - cx)).sum() / weight.sum()
  dy = (weight * (y - cy)).sum() / weight.sum()
  assert np.hypot(dx, dy) == pytest.approx(8.0, abs=0.02)
  assert np.degrees(np.arctan2(-dy, dx)) == pytest.approx(30.0, abs=0.1)


@pytest.fixture(scope='module')
def paired_target(prepared, tmp_path_factory):
  """An MRI rendering of the prepared CT cases (same case ids, grids, labels), prepared with the
  CT's split; and one that lacks the case ct_3."""
  root = tmp_path_factory.mktemp('paired')
  cases = {}
  for k in range(4):
    image, label, affine = S.toy_case(seed=k)
    image[0, 0, :] = -1000 + 80 * np.arange(image.shape[2])
    cases[f'ct_{k}'] = (((image + 1000.0) * 0.3).astype(np.float32), label, affine)
  out = []
  for name, subset in (('mr', cases), ('mr_missing', {k: cases[k] for k in list(cases)[:3]})):
    S.write_dataset(str(root / f'{name}_raw'), subset, modality='T2')
    P.prepare_dataset(
      root / f'{name}_raw',
      root / name,
      P.PrepSpec(modality='mri', spacing_mm=1.5, size=SIZE),
      val_fraction=0.25,
      seed=0,
      progress=False,
    )
    out.append(str(root / name))
  return out


def test_paired_target_is_the_source_slice_of_the_same_case(prepared, paired_target):
  """data.paired: target example r is the co-registered slice of source example r (same case
  id and slice position) under the same augmentation, so labels agree voxel for voxel; the
  source batches are those of unpaired mode."""
  ct, _ = prepared
  mr, _ = paired_target
  source, target = ip.SplitArrays(ct, 'train'), ip.SplitArrays(mr, 'train')
  index = ip.paired_indices(source, target)
  for c in source.cases:
    rows = np.arange(c['offset'], c['offset'] + c['num_slices'])
    (t,) = [t for t in target.cases if t['case_id'] == c['case_id']]
    np.testing.assert_array_equal(index[rows], t['offset'] + np.arange(c['num_slices']))
  np.testing.assert_array_equal(np.asarray(target.labels)[index], np.asarray(source.labels))
  kw = dict(global_batch_size=16, seed=3, num_steps=3)
  plain = take(ip.create_train_iterator(ct, mr, augment=False, paired=True, **kw), 3)
  images = np.asarray(source.images)
  for src, tgt in plain:
    for s_image, t_image in zip(src['image'][..., 0], tgt['image'][..., 0]):
      (row,) = np.nonzero((images == s_image).all((1, 2)))[0][:1]
      np.testing.assert_array_equal(t_image, np.asarray(target.images)[index[row]])
  warped = take(ip.create_train_iterator(ct, mr, paired=True, **kw), 3)
  unpaired = take(ip.create_train_iterator(ct, mr, **kw), 3)
  for (src, tgt), (want, other) in zip(warped, unpaired):
    assert_batches_equal(src, want)
    np.testing.assert_array_equal(tgt['label'], src['label'])
    assert (src['label'] > 0).any()
    assert not np.array_equal(other['label'], src['label'])


def test_paired_needs_every_source_case_in_the_target(prepared, paired_target):
  ct, _ = prepared
  _, missing = paired_target
  with pytest.raises(ValueError, match=r"no co-registered copy of source case 'ct_\d'"):
    ip.create_train_iterator(ct, missing, global_batch_size=4, seed=0, paired=True)


def test_paired_validation_volumes_carry_their_target_volume(prepared, paired_target, monkeypatch):
  """validation.validation_volumes of a paired method: each source volume holds 'paired', the
  target's validation volume of the same case (where its teacher is validated)."""
  from cmedl_jax import validation  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top

  ct, _ = prepared
  mr, _ = paired_target
  config = tiny.get_config('unet')
  config.method.name, config.data.paired = 'paired_teacher', True
  config.data.source.prepared_dir, config.data.target.prepared_dir = ct, mr
  volumes = validation.validation_volumes(config)
  assert volumes
  for v in volumes:
    assert v['paired']['case_id'] == v['case_id']
    np.testing.assert_array_equal(v['paired']['label'], v['label'])
    assert not np.array_equal(v['paired']['image'], v['image'])
  real = ip.load_eval_volumes
  monkeypatch.setattr(  # A target without the source's validation cases.
    ip, 'load_eval_volumes', lambda d, split: real(d, split) if d == ct else []
  )
  with pytest.raises(ValueError, match=f"no validation volume of case '{volumes[0]['case_id']}'"):
    validation.validation_volumes(config)
