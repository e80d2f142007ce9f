"""Tests of cmedl_jax.models: shapes, taps, exactness of the fast formulations, gradients,
bfloat16, parameter counts and batch norm under a data-parallel mesh. Tiny networks only."""

from __future__ import annotations

import pathlib

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cmedl_jax import models
from cmedl_jax.models import layers
from cmedl_jax.models import patchgan
from cmedl_jax.models import resnet_generator

TINY_SEGMENTERS = {
  'unet': dict(name='unet', base_width=4, depth=2),
  'unet_resize': dict(name='unet', base_width=4, depth=2, up='resize'),
  'densefcn': dict(name='densefcn', growth_rate=3, layers_per_block=1, n_pool=2, first_filters=6),
  'pspnet': dict(name='pspnet', base_width=4, blocks=(1, 1, 1, 1), aux_head=True),
}


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def seg_cfg(arch, num_classes=3, **extra):
  return ml_collections.ConfigDict(dict(TINY_SEGMENTERS[arch], num_classes=num_classes, **extra))


def key(seed=0):
  # RngBitGenerator keys: XLA:CPU compiles them far faster than threefry (~0.15 s vs ~1 s
  # per random op), which dominates the time of these tiny tests.
  return jax.random.key(seed, impl='rbg')


def init_seg(net, x):
  return jax.jit(lambda t: net.init(key(0), t, train=False))(x)


def init_net(net, *args):
  return jax.jit(lambda *a: net.init(key(0), *a))(*args)


def rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------- exact layers


def torch_conv_transpose_np(x, kernel, stride, padding, output_padding):
  """Direct scatter form of PyTorch ConvTranspose2d (NHWC, kernel [kh, kw, Cin, Cout])."""
  n, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  ho = (h - 1) * stride - 2 * padding + kh + output_padding
  wo = (w - 1) * stride - 2 * padding + kw + output_padding
  out = np.zeros((n, ho, wo, cout), np.float64)
  for i in range(h):
    for j in range(w):
      for ky in range(kh):
        for kx in range(kw):
          oy, ox = i * stride - padding + ky, j * stride - padding + kx
          if 0 <= oy < ho and 0 <= ox < wo:
            out[:, oy, ox] += x[:, i, j] @ kernel[ky, kx]
  return out


@pytest.mark.parametrize('impl', ['subpixel', 'subpixel1', 'xla'])
def test_conv_transpose_3x3_matches_pytorch_semantics(impl):
  x, k, b = rand((2, 5, 6, 3), 1), rand((3, 3, 3, 4), 2), rand((4,), 3)
  module = layers.ConvTranspose3x3S2(4, impl=impl)
  y = module.apply({'params': {'kernel': k, 'bias': b}}, x)
  ref = torch_conv_transpose_np(
    np.asarray(x, np.float64), np.asarray(k, np.float64), 2, 1, 1
  ) + np.asarray(b)
  assert y.shape == (2, 10, 12, 4)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  # Flax's own transposed convolution with the same parameters (kernel flipped: lax does
  # not flip, PyTorch's transposed conv is the adjoint of a correlation).
  flax_ct = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)))
  y_flax = flax_ct.apply({'params': {'kernel': k[::-1, ::-1], 'bias': b}}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_flax), atol=1e-5)


def test_conv_transpose_2x2_matches_pytorch_semantics():
  x, k, b = rand((1, 3, 5, 2), 4), rand((2, 2, 2, 3), 5), rand((3,), 6)
  y = layers.ConvTranspose2x2S2(3).apply({'params': {'kernel': k, 'bias': b}}, x)
  ref = torch_conv_transpose_np(
    np.asarray(x, np.float64), np.asarray(k, np.float64), 2, 0, 0
  ) + np.asarray(b)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


@pytest.mark.parametrize('impl', ['concat', 'gather', 'jnp'])
@pytest.mark.parametrize('pad', [1, 3])
def test_reflect_pad_matches_numpy_and_gradients_agree(impl, pad):
  x = rand((2, 7, 5, 3), 7)
  y = layers.reflect_pad(x, pad, impl)
  np.testing.assert_array_equal(
    np.asarray(y), np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  )
  w = rand(y.shape, 8)
  g = jax.grad(lambda t: jnp.sum(layers.reflect_pad(t, pad, impl) * w))(x)
  g_ref = jax.grad(
    lambda t: jnp.sum(jnp.pad(t, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect') * w)
  )(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6)


def _weight_gradient_np(x, g, kh, kw, strides, padding):
  """float64 reference: dW[i, j, c, o] = sum over n, h, w of xp[n, h*sh + i, w*sw + j, c] g[n, h, w, o]."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
  g = np.asarray(g, np.float64)
  ho, wo = g.shape[1:3]
  sh, sw = strides
  dw = np.zeros((kh, kw, xp.shape[-1], g.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      window = xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw]
      dw[i, j] = np.einsum('nhwc,nhwo->co', window, g)
  return dw


@pytest.mark.parametrize(
  'batch, size, kernel, strides, padding',
  [
    (1, (32, 24), (3, 3), (1, 1), ((1, 1), (1, 1))),  # U-Net 3x3 SAME: 8 bands of 4 rows
    (2, (42, 20), (7, 7), (1, 1), ((0, 0), (0, 0))),  # generator 7x7 on a padded input: 4 bands
    (1, (33, 20), (1, 2), (1, 1), ((0, 1), (0, 1))),  # a sub-pixel transposed-conv phase
    (1, (64, 36), (4, 4), (2, 2), ((1, 1), (1, 1))),  # PatchGAN 4x4 stride 2
    (2, (32, 32), (3, 3), (2, 1), ((1, 1), (1, 1))),  # unequal strides
    (8, (16, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),  # batch 8: XLA's own weight gradient
  ],
)
def test_conv_weight_gradient_on_row_bands_is_exact(batch, size, kernel, strides, padding):
  x, w = rand((batch, *size, 3), 20), rand((*kernel, 3, 5), 21)

  def loss(conv, x, w):
    y = conv(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.sin(y)), y

  (value, y), (dx, dw) = jax.jit(
    jax.value_and_grad(lambda *a: loss(layers.conv_general_dilated, *a), (0, 1), has_aux=True)
  )(x, w)
  (value_ref, _), (dx_ref, dw_ref) = jax.jit(
    jax.value_and_grad(lambda *a: loss(jax.lax.conv_general_dilated, *a), (0, 1), has_aux=True)
  )(x, w)
  assert float(value) == float(value_ref)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
  dw_np = _weight_gradient_np(x, np.cos(np.asarray(y, np.float64)), *kernel, strides, padding)
  atol = 1e-5 * np.abs(dw_np).max()  # float32 sums of up to 2,048 products
  np.testing.assert_allclose(np.asarray(dw), dw_np, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(np.asarray(dw_ref), dw_np, rtol=1e-5, atol=atol)
  bands = layers._row_bands(batch, y.shape[1], kernel[0])
  assert (bands > 1) == (batch < layers.BANDED_WEIGHT_GRADIENT_BELOW_BATCH)


def test_networks_export_with_a_symbolic_batch_and_size():
  net = models.UNet(num_classes=2, base_width=4, depth=2)
  variables = net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  fn = jax.jit(lambda x: net.apply(variables, x, train=False)[0])
  shape = jax.export.symbolic_shape('b, 16*h, 16*w, 1')
  exported = jax.export.export(fn)(jax.ShapeDtypeStruct(shape, jnp.float32))
  x = rand((3, 32, 16, 1), 22)
  np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(fn(x)), atol=1e-6)


def test_every_network_convolution_goes_through_the_banded_weight_gradient():
  for module in (
    models.UNet,
    models.ResnetGenerator,
    models.PatchGAN,
    models.DenseFCN,
    models.PSPNet,
  ):
    source = pathlib.Path(module.__module__.replace('.', '/') + '.py')
    text = (pathlib.Path(__file__).parents[1] / source).read_text()
    assert text.count('nn.Conv(') == text.count(
      'conv_general_dilated=layers.conv_general_dilated'
    ), source


def test_reflect_pad_rejects_too_small_input():
  with pytest.raises(ValueError, match='reflect_pad'):
    layers.reflect_pad(jnp.zeros((1, 3, 8, 1)), 3)


def test_instance_norm_matches_numpy():
  x = np.asarray(rand((2, 5, 4, 3), 9)) * 3 + 1
  ref = (x - x.mean(axis=(1, 2), keepdims=True)) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(layers.instance_norm(jnp.asarray(x))), ref, atol=1e-5)


def test_adaptive_avg_pool_matches_pytorch_bins():
  x = np.asarray(rand((1, 7, 5, 2), 10))
  for bins in (1, 2, 3, 6):
    out = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), bins))
    for i in range(bins):
      for j in range(bins):
        r0, r1 = int(np.floor(i * 7 / bins)), int(np.ceil((i + 1) * 7 / bins))
        c0, c1 = int(np.floor(j * 5 / bins)), int(np.ceil((j + 1) * 5 / bins))
        np.testing.assert_allclose(out[0, i, j], x[0, r0:r1, c0:c1].mean(axis=(0, 1)), atol=1e-6)


def test_bilinear_resize_matches_jax_image_resize():
  """layers.resize_bilinear (two interpolation matrices: exports with a symbolic batch and
  converts to ONNX) equals jax.image.resize without antialiasing, and with it when upsampling
  (PSPNet's only use)."""
  for shape, size in [((2, 1, 1, 3), (8, 8)), ((2, 2, 3, 3), (8, 9)), ((1, 5, 7, 2), (33, 20))]:
    x = rand(shape, 11)
    got = np.asarray(layers.resize_bilinear(x, *size))
    full = (shape[0], *size, shape[3])
    plain = jax.image.resize(x, full, 'bilinear', antialias=False)
    np.testing.assert_allclose(got, np.asarray(plain), atol=2e-6)
    if size[0] >= shape[1] and size[1] >= shape[2]:
      np.testing.assert_allclose(got, np.asarray(jax.image.resize(x, full, 'bilinear')), atol=2e-6)
  x = rand((1, 16, 12, 2), 12)  # Downsampling: no antialiasing, unlike jax.image.resize's default.
  plain = jax.image.resize(x, (1, 8, 5, 2), 'bilinear', antialias=False)
  np.testing.assert_allclose(np.asarray(layers.resize_bilinear(x, 8, 5)), plain, atol=2e-6)


# --------------------------------------------------------------------------- parameter counts


def test_cyclegan_parameter_counts_equal_pytorch_reference():
  x = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  gen = models.get_translator({'name': 'cyclegan'})
  gen_vars = jax.eval_shape(gen.init, key(0), x)
  assert set(gen_vars) == {'params'}  # instance norm: no batch statistics
  assert count(gen_vars['params']) == 11_365_633
  gen6 = models.get_translator({'name': 'cut', 'n_blocks': 6})
  # 3 fewer blocks of 2 x (256*256*9 + 256) parameters.
  assert count(jax.eval_shape(gen6.init, key(0), x)['params']) == 11_365_633 - 3 * 2 * 590_080
  disc = models.get_discriminator({})
  disc_vars = jax.eval_shape(disc.init, key(0), x)
  assert count(disc_vars['params']) == 2_762_689
  assert jax.eval_shape(disc.apply, disc_vars, x).shape == (1, 30, 30, 1)


class _ReferenceDenseBlock(nn.Module):
  """The textbook dense block: nn.BatchNorm over the whole stack in every layer."""

  n_layers: int
  growth: int

  @nn.compact
  def __call__(self, stack, train):
    new = []
    for _ in range(self.n_layers):
      t = nn.relu(layers.batch_norm(train, jnp.float32)(stack))
      t = nn.Conv(self.growth, (3, 3), padding='SAME')(t)
      new.append(t)
      stack = jnp.concatenate([stack, t], axis=-1)
    return stack, jnp.concatenate(new, axis=-1)


@pytest.mark.parametrize('train', [True, False])
def test_dense_block_with_shared_batch_statistics_equals_per_layer_batch_norm(train):
  """DenseBlock normalises each map once (StackBatchNorm): same variables, outputs, gradients
  and running averages as nn.BatchNorm in every layer."""
  from cmedl_jax.models.densefcn import DenseBlock

  x = jax.random.normal(key(1), (2, 8, 8, 5)) * 3.0 + 1.0
  block, reference = DenseBlock(3, 4, 0.0, jnp.float32), _ReferenceDenseBlock(3, 4)
  v = block.init(key(0), x, True)
  assert jax.tree.structure(v) == jax.tree.structure(reference.init(key(0), x, True))
  leaves, tree = jax.tree.flatten(v)
  leaves = [l + 0.3 * jnp.abs(jax.random.normal(key(i + 2), l.shape)) for i, l in enumerate(leaves)]
  v = jax.tree.unflatten(tree, leaves)

  def run(module):
    def loss(params, x):
      (stack, new), updated = module.apply(
        {'params': params, 'batch_stats': v['batch_stats']}, x, train, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(stack)) + jnp.sum(new**2), (stack, updated)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(v['params'], x)

  (loss, (stack, updated)), grads = run(block)
  (ref_loss, (ref_stack, ref_updated)), ref_grads = run(reference)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(stack, ref_stack, rtol=1e-5, atol=1e-5)
  for got, want in zip(
    jax.tree.leaves((grads, updated)), jax.tree.leaves((ref_grads, ref_updated))
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  if train:  # The running averages moved (they would not if StackBatchNorm skipped them).
    assert not np.allclose(
      updated['batch_stats']['BatchNorm_2']['mean'], v['batch_stats']['BatchNorm_2']['mean']
    )


def test_densefcn_block_layout_of_variants():
  for variant, growth, first_block in ((56, 12, 4), (67, 16, 5), (103, 16, 4)):
    net = models.get_segmenter({'name': 'densefcn', 'num_classes': 2, 'variant': variant})
    lpb = net.block_layers()
    assert len(lpb) == 11 and lpb[0] == first_block
  net = models.get_segmenter({'name': 'densefcn', 'num_classes': 2, 'variant': 103})
  assert net.block_layers()[5] == 15
  x = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
  v = jax.eval_shape(lambda t: net.init(key(0), t, train=False), x)
  # 48 + 64 (block 1) = 112 skip maps + 80 up-sampled maps = 192 entering the last block,
  # + 4 * 16 new maps = 256 read by the classifier.
  out = jax.eval_shape(lambda vv, t: net.apply(vv, t, train=False), v, x)
  assert out[1]['penultimate'].shape == (1, 64, 64, 192)
  assert out[1]['last'].shape == (1, 64, 64, 256)


# --------------------------------------------------------------------------- segmenters


@pytest.mark.parametrize('arch', list(TINY_SEGMENTERS))
@pytest.mark.parametrize('shape', [(1, 33, 35, 2)])  # odd H, W, batch 1; batch 2 below
def test_segmenter_shapes_and_taps(arch, shape):
  net = models.get_segmenter(seg_cfg(arch))
  x = rand(shape, 11)
  variables = init_seg(net, x)
  assert set(variables) == {'params', 'batch_stats'}
  train_and_eval = lambda v, t: (
    net.apply(v, t, train=True, mutable=['batch_stats']),
    net.apply(v, t, train=False),
  )
  ((logits, taps), updates), (eval_logits, _) = jax.jit(train_and_eval)(variables, x)
  n, h, w, _ = shape
  assert logits.shape == (n, h, w, 3) and logits.dtype == jnp.float32
  expected = {'penultimate', 'last', 'logits'} | ({'aux_logits'} if arch == 'pspnet' else set())
  assert set(taps) == expected
  np.testing.assert_array_equal(np.asarray(taps['logits']), np.asarray(logits))
  if arch == 'pspnet':
    assert taps['aux_logits'].shape == logits.shape
    fh, fw = -(-h // 8), -(-w // 8)
    assert taps['last'].shape == (n, fh, fw, 16)  # C/2 of the 32-map backbone output
    assert taps['penultimate'].shape == (n, fh, fw, 64)  # 32 + 4 bins * 8
  else:
    assert taps['last'].shape[:3] == (n, h, w) and taps['penultimate'].shape[:3] == (n, h, w)
  # The classifier reads "last": its 1x1 conv applied to "last" gives the logits.
  if arch != 'pspnet':
    cls = variables['params']['classifier']
    recomputed = jnp.einsum('nhwc,ck->nhwk', taps['last'], cls['kernel'][0, 0]) + cls['bias']
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(logits), atol=1e-4)
  # train=True moved every running statistic; train=False (running averages, still the
  # initial mean 0 / variance 1) gives other logits.
  changed = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'], updates['batch_stats']
  )
  assert all(jax.tree.leaves(changed))
  assert eval_logits.shape == logits.shape and not np.allclose(
    np.asarray(eval_logits), np.asarray(logits)
  )


def test_dropout_needs_a_dropout_rng():
  net = models.get_segmenter(seg_cfg('densefcn', dropout=0.5))
  x = rand((1, 16, 16, 1), 30)
  variables = init_seg(net, x)
  run = lambda v, t, k: (
    net.apply(v, t, train=True, mutable=['batch_stats'], rngs={'dropout': k})[0][0],
    net.apply(v, t, train=True, mutable=['batch_stats'])[0][0],
  )
  with_rng, without = jax.jit(run)(variables, x, key(1))
  assert not np.allclose(np.asarray(with_rng), np.asarray(without))


def test_registry_defaults_and_errors():
  unet = models.get_segmenter({'name': 'unet', 'num_classes': 2})
  assert (unet.base_width, unet.depth, unet.up, unet.dtype) == (32, 4, 'transpose', 'float32')
  psp = models.get_segmenter(ml_collections.ConfigDict({'name': 'pspnet', 'num_classes': 2}))
  assert (psp.base_width, tuple(psp.blocks), psp.aux_head) == (64, (2, 2, 2, 2), False)
  dense = models.get_segmenter({'name': 'densefcn', 'num_classes': 2, 'growth_rate': None})
  assert dense.variant == 103 and dense.growth_rate is None
  gen = models.get_translator(ml_collections.ConfigDict({'name': 'cut', 'dtype': 'bfloat16'}))
  assert (gen.out_channels, gen.ngf, gen.n_blocks, gen.dtype) == (1, 64, 9, 'bfloat16')
  with pytest.raises(ValueError, match='cfg.name'):
    models.get_segmenter({'name': 'segnet', 'num_classes': 2})
  with pytest.raises(ValueError, match='num_classes'):
    models.get_segmenter({'name': 'unet'})
  with pytest.raises(ValueError, match='cfg.name'):
    models.get_translator({'name': 'pix2pix'})
  with pytest.raises(ValueError, match='dtype'):
    models.get_segmenter({'name': 'unet', 'num_classes': 2, 'dtype': 'float16'}).init(
      key(0), jnp.zeros((1, 8, 8, 1)), train=False
    )


def _weighted_sum(tree, seed):
  """sum_i <leaf_i, r_i> with fixed random r_i (numpy, so no random op is compiled)."""
  rng = np.random.default_rng(seed)
  return sum(
    jnp.sum(leaf * rng.standard_normal(leaf.shape).astype(np.float32))
    for leaf in jax.tree.leaves(tree)
  )


@pytest.mark.parametrize('arch', list(TINY_SEGMENTERS))
def test_segmenter_gradients_reach_every_parameter(arch):
  net = models.get_segmenter(seg_cfg(arch))
  x = rand((2, 20, 20, 1), 12)
  variables = init_seg(net, x)
  grads = jax.jit(
    jax.grad(
      lambda p: _weighted_sum(
        net.apply({'params': p, 'batch_stats': variables['batch_stats']}, x, train=False), 13
      )
    )
  )(variables['params'])
  dead = [
    jax.tree_util.keystr(path)
    for path, g in jax.tree_util.tree_leaves_with_path(grads)
    if not bool(jnp.any(g != 0))
  ]
  assert not dead


def test_translator_and_discriminator_gradients():
  """Every parameter gets a gradient but the conv biases an instance norm follows
  (`biases_before_norm`, the same list as the hand-written one here), whose gradient is 0 by
  construction (the norm removes the per-channel mean), in the PyTorch reference too."""
  gen = models.ResnetGenerator(out_channels=1, ngf=4, n_blocks=2)
  disc = models.PatchGAN(ndf=4, n_layers=3)
  x = rand((1, 33, 35, 1), 14)
  gp = init_net(gen, x)['params']
  dp = init_net(disc, x)['params']
  g_grad = jax.jit(jax.grad(lambda p: _weighted_sum(gen.apply({'params': p}, x), 15)))(gp)
  d_grad = jax.jit(jax.grad(lambda p: _weighted_sum(disc.apply({'params': p}, x), 16)))(dp)
  gen_inert = {('conv_in',), ('down_0',), ('down_1',), ('up_0',), ('up_1',)}
  gen_inert |= {(f'block_{i}', f'conv_{j}') for i in (0, 1) for j in (0, 1)}  # all but conv_out
  disc_inert = {('conv_1',), ('conv_2',), ('conv_3',)}  # conv_0, conv_out: no norm after them
  for grads, inert, listed in (
    (g_grad, gen_inert, resnet_generator.biases_before_norm(gp)),
    (d_grad, disc_inert, patchgan.biases_before_norm(dp)),
  ):
    assert set(listed) == {(*m, 'bias') for m in inert}
    for path, g in traverse_util.flatten_dict(grads).items():
      if path in listed:
        assert float(jnp.max(jnp.abs(g))) < 1e-4, path
      else:
        assert bool(jnp.any(g != 0)), path


# --------------------------------------------------------------------------- translators


def test_generator_odd_sizes_range_and_init():
  gen = models.ResnetGenerator(out_channels=2, ngf=4, n_blocks=2)
  x = rand((1, 33, 35, 1), 17)
  variables = init_net(gen, x)
  y = jax.jit(gen.apply)(variables, x)
  assert y.shape == (1, 33, 35, 2) and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  kernels = np.concatenate([np.ravel(l) for l in jax.tree.leaves(variables) if l.ndim == 4])
  assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002
  with pytest.raises(ValueError, match='at least 4x4'):
    gen.apply(variables, jnp.zeros((1, 3, 8, 1)))


def test_generator_nce_layers_follow_cut_indexing():
  gen = models.ResnetGenerator(out_channels=1, ngf=4, n_blocks=9)
  x = rand((2, 33, 35, 1), 18)
  variables = init_net(gen, x)
  both = lambda v, t: (gen.apply(v, t, (0, 2, 3, 4, 8, 12, 16, 27)), gen.apply(v, t))
  (y, feats), y_plain = jax.jit(both)(variables, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain), atol=1e-5)
  shapes = [f.shape for f in feats]
  assert shapes == [
    (2, 42, 42, 1),
    (2, 36, 36, 4),
    (2, 36, 36, 4),
    (2, 18, 18, 8),
    (2, 9, 9, 16),
    (2, 9, 9, 16),
    (2, 9, 9, 16),
    (2, 36, 36, 1),
  ]
  # 0: the input, reflection-padded to a multiple of 4 and then by 3.
  padded = np.pad(np.asarray(x), ((0, 0), (0, 3), (0, 1), (0, 0)), mode='reflect')
  np.testing.assert_array_equal(
    np.asarray(feats[0]), np.pad(padded, ((0, 0), (3, 3), (3, 3), (0, 0)), mode='reflect')
  )
  # 2: instance norm output (zero mean, unit variance per sample and channel); 3: its ReLU.
  np.testing.assert_allclose(np.asarray(feats[1].mean(axis=(1, 2))), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(feats[1].var(axis=(1, 2))), 1, atol=1e-2)
  np.testing.assert_array_equal(np.asarray(feats[2]), np.maximum(np.asarray(feats[1]), 0))
  # 27: tanh output before cropping.
  np.testing.assert_array_equal(np.asarray(feats[7][:, :33, :35]), np.asarray(y))
  with pytest.raises(ValueError, match='out of range'):
    gen.apply(variables, x, (28,))


def test_patchgan_odd_sizes():
  disc = models.PatchGAN(ndf=4, n_layers=3)
  x = rand((1, 33, 35, 1), 19)
  out = jax.jit(disc.apply)(init_net(disc, x), x)
  # k4 s2 p1: floor(n/2) three times, then k4 s1 p1 twice: -1 each.
  assert out.shape == (1, 2, 2, 1) and out.dtype == jnp.float32


def test_patch_sample_mlp_reuses_ids_and_normalises():
  sampler = models.get_patch_sampler({})
  f1 = [rand((2, 6, 5, 3), 20), rand((2, 3, 3, 8), 21)]
  f2 = [rand((2, 6, 5, 3), 22), rand((2, 3, 3, 8), 23)]
  variables = jax.jit(lambda f: sampler.init(key(0), f, 16, None, key(1)))(f1)
  q, ids = jax.jit(lambda v, f: sampler.apply(v, f, 16, None, key(2)))(variables, f1)
  k, ids2 = jax.jit(lambda v, f, i: sampler.apply(v, f, 16, i))(variables, f2, ids)
  assert [a.shape for a in q] == [(2, 16, 256), (2, 9, 256)]  # 9 = all 3x3 positions
  assert all(len(set(np.asarray(i).tolist())) == len(i) for i in ids)
  for a, b in zip(ids, ids2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for s in q + k:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(s), axis=-1), 1.0, atol=1e-5)
  # Independent reference for layer 0 of the key features.
  p = variables['params']
  flat = np.asarray(f2[0]).reshape(2, 30, 3)[:, np.asarray(ids[0])]
  hid = np.maximum(flat @ np.asarray(p['mlp_0_0']['kernel']) + np.asarray(p['mlp_0_0']['bias']), 0)
  out = hid @ np.asarray(p['mlp_0_1']['kernel']) + np.asarray(p['mlp_0_1']['bias'])
  out /= np.linalg.norm(out, axis=-1, keepdims=True) + 1e-7
  np.testing.assert_allclose(np.asarray(k[0]), out, atol=1e-5)
  grads = jax.jit(
    jax.grad(lambda pp: _weighted_sum(sampler.apply({'params': pp}, f1, 16, ids)[0], 24))
  )(p)
  assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- dtypes, sharding


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2))


@pytest.mark.parametrize('arch', list(TINY_SEGMENTERS))
def test_segmenter_bfloat16_close_to_float32(arch):
  x = rand((2, 24, 24, 1), 25)
  net32 = models.get_segmenter(seg_cfg(arch))
  net16 = models.get_segmenter(seg_cfg(arch, dtype='bfloat16'))
  variables = init_seg(net32, x)
  v16 = jax.eval_shape(lambda t: net16.init(key(0), t, train=False), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v16))
  both = lambda v, t: (
    net32.apply(v, t, train=True, mutable=['batch_stats'])[0],
    net16.apply(v, t, train=True, mutable=['batch_stats'])[0],
  )
  (l32, t32), (l16, t16) = jax.jit(both)(variables, x)
  assert l16.dtype == jnp.float32
  assert _rel_rms(l16, l32) < 0.05
  assert _rel_rms(t16['last'], t32['last']) < 0.05


def test_translator_discriminator_bfloat16_close_to_float32():
  x = rand((1, 32, 32, 1), 26)
  for m32, m16 in (
    (
      models.ResnetGenerator(ngf=8, n_blocks=2),
      models.ResnetGenerator(ngf=8, n_blocks=2, dtype='bfloat16'),
    ),
    (models.PatchGAN(ndf=8), models.PatchGAN(ndf=8, dtype='bfloat16')),
  ):
    variables = init_net(m32, x)
    y32, y16 = jax.jit(lambda v, t: (m32.apply(v, t), m16.apply(v, t)))(variables, x)
    assert y16.dtype == jnp.float32
    assert _rel_rms(y16, y32) < 0.05


def test_batch_norm_uses_global_batch_statistics_under_sharded_jit():
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip('needs several devices (tests/conftest.py forces 8 CPU devices)')
  mesh = Mesh(devices, ('data',))
  net = models.get_segmenter(seg_cfg('unet'))
  x = (
    rand((devices.size, 16, 16, 1), 27)
    + jnp.arange(devices.size, dtype=jnp.float32)[:, None, None, None]
  )
  variables = init_seg(net, x)
  step = lambda v, t: net.apply(v, t, train=True, mutable=['batch_stats'])
  (ref_logits, _), ref_stats = jax.jit(step)(variables, x)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  v_repl = jax.device_put(variables, NamedSharding(mesh, P()))
  (logits, _), stats = jax.jit(step)(v_repl, x_sharded)
  assert len(logits.sharding.device_set) == devices.size
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- rematerialisation

REMAT_NETS = {
  'unet': dict(TINY_SEGMENTERS['unet']),
  'densefcn': dict(TINY_SEGMENTERS['densefcn'], layers_per_block=2),
  'pspnet': dict(TINY_SEGMENTERS['pspnet']),
  'translator': dict(name='cyclegan', ngf=4, n_blocks=2),
}


def _remat_pair(arch):
  """(network without remat, with remat, is_segmenter)."""
  if arch == 'translator':
    return (
      models.get_translator(dict(REMAT_NETS[arch], remat=False)),
      models.get_translator(dict(REMAT_NETS[arch], remat=True)),
      False,
    )
  cfg = lambda remat: ml_collections.ConfigDict(dict(REMAT_NETS[arch], num_classes=3, remat=remat))
  return models.get_segmenter(cfg(False)), models.get_segmenter(cfg(True)), True


def _train_loss(net, segmenter, variables, x):
  """A scalar of the training-mode forward pass, as a function of the parameters."""
  if not segmenter:
    return lambda p: jnp.mean(net.apply({'params': p}, x) ** 2)

  def loss(p):
    (logits, taps), _ = net.apply(
      {'params': p, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )
    return jnp.mean(logits**2) + jnp.mean(taps['penultimate'] ** 2)

  return loss


def _residual_bytes(loss, params):
  """Bytes JAX keeps from the forward pass for the backward pass (the VJP's residuals)."""
  leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


@pytest.mark.parametrize('arch', list(REMAT_NETS))
def test_remat_same_parameters_and_gradients_fewer_residuals(arch):
  plain, remat, segmenter = _remat_pair(arch)
  x = rand((2, 32, 32, 1), seed=3)
  v = init_seg(plain, x) if segmenter else init_net(plain, x)
  v_remat = init_seg(remat, x) if segmenter else init_net(remat, x)
  # The same parameter tree (names and values): checkpoints work with remat on or off.
  assert jax.tree.structure(v) == jax.tree.structure(v_remat)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_remat)):
    np.testing.assert_array_equal(a, b)
  loss, loss_remat = (_train_loss(n, segmenter, v, x) for n in (plain, remat))
  value, grads = jax.jit(jax.value_and_grad(loss))(v['params'])
  value_r, grads_r = jax.jit(jax.value_and_grad(loss_remat))(v['params'])
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  # Tolerance relative to the largest gradient: biases before batch norm have exactly-zero
  # gradients in theory, so their float32 values are rounding noise either way.
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)
  # What remat is for: fewer activations kept for the backward pass (on GPU/TPU that is the
  # activation memory; XLA:CPU removes the recomputation again, see docs/PERFORMANCE.md).
  kept, kept_remat = _residual_bytes(loss, v['params']), _residual_bytes(loss_remat, v['params'])
  assert kept_remat < 0.85 * kept, (kept_remat, kept)


# --------------------------------------------------------------------------- README figures

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
NCE_LAYERS = (0, 4, 8, 12, 16)
# Rows of README.md's "Networks and parameter counts" table -> (kind, registry config, input
# channels). Unset fields take the registry defaults, so a changed default changes a count.
README_NETWORKS = {
  'U-Net, base 32, depth 4, `up="transpose"` (default)': ('segmenter', {'name': 'unet'}, 1),
  'U-Net, base 32, depth 4, `up="resize"`': ('segmenter', {'name': 'unet', 'up': 'resize'}, 1),
  'FC-DenseNet56 (`variant=56`)': ('segmenter', {'name': 'densefcn', 'variant': 56}, 1),
  'FC-DenseNet67 (`variant=67`)': ('segmenter', {'name': 'densefcn', 'variant': 67}, 1),
  'FC-DenseNet103 (`variant=103`, default)': ('segmenter', {'name': 'densefcn'}, 1),
  'FC-DenseNet103, 3 input channels, 11 classes (CamVid, as published)': (
    'segmenter',
    {'name': 'densefcn', 'num_classes': 11},
    3,
  ),
  'PSPNet, dilated ResNet-18-style backbone, base 64 (default)': (
    'segmenter',
    {'name': 'pspnet'},
    1,
  ),
  'PSPNet default + auxiliary head (`aux_head=True`)': (
    'segmenter',
    {'name': 'pspnet', 'aux_head': True},
    1,
  ),
  "PSPNet, bottleneck blocks (3, 4, 6, 3) (ResNet-50 backbone, as the paper's)": (
    'segmenter',
    {'name': 'pspnet', 'bottleneck': True, 'blocks': (3, 4, 6, 3)},
    1,
  ),
  'CycleGAN/CUT ResNet generator, ngf 64, 9 blocks': ('translator', {'name': 'cyclegan'}, 1),
  'ResNet generator, ngf 64, 6 blocks': ('translator', {'name': 'cut', 'n_blocks': 6}, 1),
  'PatchGAN discriminator, ndf 64, 3 layers': ('discriminator', {}, 1),
  'CUT PatchSampleF (MLP heads on nce_layers 0,4,8,12,16, 1-channel input)': ('sampler', {}, 1),
}


def readme_network_table():
  """{label: (parameters, BN stats or None, taps text)} of the README table, and its prose."""
  section = README.read_text().split('\n## Networks and parameter counts\n', 1)[1]
  section = section.split('\n## ', 1)[0]
  rows = {}
  for line in section.splitlines():
    if not line.startswith('|'):
      continue
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if cells[0] == 'network (config)' or not cells[0].strip('-:'):
      continue
    label, params, stats, taps = cells
    number = lambda s: int(s.strip('*').replace(',', ''))
    rows[label] = (number(params), None if stats == '-' else number(stats), taps)
  return rows, section


def network_figures(kind, cfg, channels):
  """(parameters, BN stats or None, (penultimate, last) tap shapes or None) at 256x256."""
  x = jax.ShapeDtypeStruct((1, 256, 256, channels), jnp.float32)
  if kind == 'segmenter':
    net = models.get_segmenter({'num_classes': 2, **cfg})
    v = jax.eval_shape(lambda t: net.init(key(0), t, train=False), x)
    _, taps = jax.eval_shape(lambda vv, t: net.apply(vv, t, train=False), v, x)
    shapes = tuple(taps[name].shape[1:] for name in ('penultimate', 'last'))
    return count(v['params']), count(v['batch_stats']), shapes
  if kind == 'sampler':
    gen = models.get_translator({'name': 'cut'})
    gv = jax.eval_shape(gen.init, key(0), x)
    feats = jax.eval_shape(lambda vv, t: gen.apply(vv, t, NCE_LAYERS)[1], gv, x)
    net = models.get_patch_sampler({})
    v = jax.eval_shape(lambda f: net.init(key(0), f, 256, None, key(1)), feats)
  else:
    net = (models.get_translator if kind == 'translator' else models.get_discriminator)(cfg)
    v = jax.eval_shape(net.init, key(0), x)
  assert set(v) == {'params'}, kind  # no batch-norm statistics
  return count(v['params']), None, None


def test_readme_parameter_counts():
  """Every figure of README's "Networks and parameter counts" table, from the networks built
  by the registry (jax.eval_shape: nothing is compiled)."""
  rows, prose = readme_network_table()
  assert list(rows) == list(README_NETWORKS)
  previous_taps = None
  for label, (params, stats, taps) in rows.items():
    got_params, got_stats, got_taps = network_figures(*README_NETWORKS[label])
    assert (got_params, got_stats) == (params, stats), label
    if taps == 'same':
      taps = previous_taps
    if taps:
      want = [tuple(int(d) for d in t.strip().split('x')) for t in taps.split('/')]
      assert list(got_taps) == want, label
    previous_taps = taps
  # The prose under the table repeats some of its figures.
  prose = ' '.join(prose.split())
  gen = rows['CycleGAN/CUT ResNet generator, ngf 64, 9 blocks'][0]
  disc = rows['PatchGAN discriminator, ndf 64, 3 layers'][0]
  assert f'generator {gen:,} and 70x70 PatchGAN {disc:,} parameters' in prose
  camvid = 'FC-DenseNet103, 3 input channels, 11 classes (CamVid, as published)'
  camvid_params, camvid_stats, _ = rows[camvid]
  assert (
    f'{camvid_params:,} trainable + {camvid_stats:,} batch-norm statistics = '
    f'{camvid_params + camvid_stats:,}'
  ) in prose
