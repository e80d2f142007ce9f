"""Tests of cmedl_jax.losses and cmedl_jax.models.adapters against NumPy formulas and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cmedl_jax import losses
from cmedl_jax.models.adapters import HintAdapters


def _jit(fn, *args, **kwargs):
  """fn(*args, **kwargs) under jax.jit (eager op-by-op dispatch is ~10x slower on CPU).

  Array and dict-of-array positional arguments are traced; the others (num_classes,
  taps, kind, ...) and all keyword arguments are closed over as constants.
  """
  traced = [isinstance(a, (np.ndarray, jax.Array, dict)) for a in args]

  def call(*dynamic):
    it = iter(dynamic)
    full = [next(it) if t else a for a, t in zip(args, traced)]
    return fn(*full, **kwargs)

  return jax.jit(call)(*[a for a, t in zip(args, traced) if t])


def _jgrad(fn, **kwargs):
  return jax.jit(jax.grad(fn, **kwargs))


def _jvgrad(fn, **kwargs):
  return jax.jit(jax.value_and_grad(fn, **kwargs))


def _rng(seed=0):
  return np.random.default_rng(seed)


def _finite_tree(tree):
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _np_log_softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


# --------------------------------------------------------------------------- GAN, L1


def test_lsgan_losses_match_numpy():
  r = _rng(1)
  d_real = r.normal(size=(2, 30, 30, 1)).astype(np.float32)
  d_fake = r.normal(size=(2, 30, 30, 1)).astype(np.float32)
  np.testing.assert_allclose(
    _jit(losses.lsgan_generator_loss, d_fake), np.mean((d_fake - 1) ** 2), rtol=1e-6
  )
  expected_d = 0.5 * (np.mean((d_real - 1) ** 2) + np.mean(d_fake**2))
  np.testing.assert_allclose(
    _jit(losses.lsgan_discriminator_loss, d_real, d_fake), expected_d, rtol=1e-6
  )
  # Closed forms: a perfect discriminator and a perfectly fooled one.
  assert float(_jit(losses.lsgan_discriminator_loss, jnp.ones(4), jnp.zeros(4))) == 0.0
  assert float(_jit(losses.lsgan_generator_loss, jnp.ones(4))) == 0.0
  assert float(_jit(losses.lsgan_discriminator_loss, jnp.zeros(4), jnp.ones(4))) == 1.0


def test_l1_loss_matches_numpy_and_accumulates_bf16_in_f32():
  r = _rng(2)
  a = r.normal(size=(2, 8, 8, 1)).astype(np.float32)
  b = r.normal(size=(2, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(_jit(losses.l1_loss, a, b), np.mean(np.abs(a - b)), rtol=1e-6)
  out = _jit(losses.l1_loss, jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.mean(np.abs(a - b)), rtol=2e-2)


# --------------------------------------------------------------------------- PatchNCE


def _np_patch_nce(q, k, tau):
  q = q.astype(np.float64)
  k = k.astype(np.float64)
  n, p, _ = q.shape
  total = []
  for b in range(n):
    for i in range(p):
      pos = q[b, i] @ k[b, i]
      negs = [(-10.0 if j == i else q[b, i] @ k[b, j]) for j in range(p)]
      logits = np.array([pos] + negs) / tau
      m = logits.max()
      total.append(-(logits[0] - m - np.log(np.exp(logits - m).sum())))
  return np.mean(total)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_patch_nce_matches_numpy_rederivation():
  r = _rng(3)
  q = _unit(r.normal(size=(2, 7, 16))).astype(np.float32)
  k = _unit(r.normal(size=(2, 7, 16))).astype(np.float32)
  for tau in (0.07, 0.5):
    np.testing.assert_allclose(
      _jit(losses.patch_nce_loss, q, k, tau), _np_patch_nce(q, k, tau), rtol=1e-5
    )


def test_patch_nce_orthogonal_closed_form():
  # q = k = one-hot rows: l_pos = 1, off-diagonal negatives 0, diagonal -10, so
  # loss = log(1 + (P-1) exp(-1/tau) + exp(-11/tau)).
  p, tau = 6, 0.5
  feats = jnp.tile(jnp.eye(p, 8)[None], (3, 1, 1))
  expected = math.log(1 + (p - 1) * math.exp(-1 / tau) + math.exp(-11 / tau))
  np.testing.assert_allclose(_jit(losses.patch_nce_loss, feats, feats, tau), expected, rtol=1e-6)


def test_patch_nce_gradients_and_key_detaching():
  r = _rng(4)
  q = jnp.asarray(_unit(r.normal(size=(2, 5, 8))), jnp.float32)
  k = jnp.asarray(_unit(r.normal(size=(2, 5, 8))), jnp.float32)
  gq, gk = _jgrad(losses.patch_nce_loss, argnums=(0, 1))(q, k)
  assert _finite_tree((gq, gk)) and float(jnp.abs(gq).sum()) > 0
  assert float(jnp.abs(gk).sum()) == 0.0  # CUT detaches the keys
  gk2 = _jgrad(lambda k_: _jit(losses.patch_nce_loss, q, k_, stop_gradient_keys=False))(k)
  assert float(jnp.abs(gk2).sum()) > 0
  zeros = jnp.zeros((1, 4, 8))
  assert _finite_tree(_jgrad(losses.patch_nce_loss)(zeros, zeros))
  with pytest.raises(ValueError, match='patch_nce_loss'):
    _jit(losses.patch_nce_loss, q, k[:, :3])


# --------------------------------------------------------------------------- contextual


def test_patch_features_match_numpy():
  r = _rng(5)
  x = r.normal(size=(2, 9, 11, 2)).astype(np.float32)
  ps, st = 3, 2
  out = np.asarray(losses.patch_features(x, ps, st))
  lh, lw = (9 - ps) // st + 1, (11 - ps) // st + 1
  expected = np.stack(
    [
      np.stack(
        [
          x[n, i * st : i * st + ps, j * st : j * st + ps, :].transpose(2, 0, 1).reshape(-1)
          for i in range(lh)
          for j in range(lw)
        ]
      )
      for n in range(2)
    ]
  )
  assert out.shape == (2, lh * lw, ps * ps * 2)
  np.testing.assert_allclose(out, expected, rtol=0, atol=0)
  with pytest.raises(ValueError, match='smaller than patch_size'):
    losses.patch_features(x[:, :2], 5, 2)


def _np_contextual(fx, fy, h=0.5, eps=1e-5):
  """Loop form of the reference: CX = mean_j max_i w_ij / sum_k w_ik."""
  fx = fx.astype(np.float64)
  fy = fy.astype(np.float64)
  mu = fy.mean(axis=(0, 1))
  out = []
  for n in range(fx.shape[0]):
    xs = [(v - mu) / np.linalg.norm(v - mu) for v in fx[n]]
    ys = [(v - mu) / np.linalg.norm(v - mu) for v in fy[n]]
    d = np.array([[1 - xi @ yj for yj in ys] for xi in xs])
    d_rel = d / (d.min(axis=1, keepdims=True) + eps)
    w = np.exp((1 - d_rel) / h)
    cx_ij = w / w.sum(axis=1, keepdims=True)
    cx = cx_ij.max(axis=0).mean()
    out.append(-np.log(cx + eps))
  return np.mean(out)


def test_contextual_loss_matches_numpy_on_tiny_input():
  r = _rng(6)
  x = r.normal(size=(2, 8, 8, 1)).astype(np.float32)
  y = (0.6 * x + 0.4 * r.normal(size=x.shape)).astype(np.float32)
  got = _jit(losses.contextual_loss, x, y, band_width=0.5, max_points=None)
  fx = np.asarray(losses.patch_features(x))
  fy = np.asarray(losses.patch_features(y))
  np.testing.assert_allclose(got, _np_contextual(fx, fy), rtol=1e-4)


def test_contextual_loss_identity_is_minimal_and_rises_for_other_images():
  r = _rng(7)
  x = r.normal(size=(2, 20, 20, 1)).astype(np.float32)
  same = float(_jit(losses.contextual_loss, x, x))
  # All sampled patches of a noise image are distinct: every y_j has its exact
  # match in x, CX = 1 and the loss is -log(1 + 1e-5).
  np.testing.assert_allclose(same, -math.log(1 + 1e-5), atol=1e-5)
  shuffled = r.permutation(x.reshape(-1)).reshape(x.shape)
  other = r.normal(size=x.shape).astype(np.float32)
  assert float(_jit(losses.contextual_loss, shuffled, x)) > same + 0.1
  assert float(_jit(losses.contextual_loss, other, x)) > same + 0.1
  # Translating x rigidly by one pattern row keeps most patches: a smaller loss than noise.
  shifted = np.roll(x, 2, axis=1)
  assert float(_jit(losses.contextual_loss, shifted, x)) < float(
    _jit(losses.contextual_loss, other, x)
  )


def test_contextual_loss_subsampling_and_feature_fn():
  r = _rng(8)
  x = r.normal(size=(1, 24, 24, 1)).astype(np.float32)
  y = r.normal(size=(1, 24, 24, 1)).astype(np.float32)
  # 10x10 = 100 locations. Strided subsampling: evenly spaced, static indices.
  strided = jax.jit(lambda a_, b_: losses.contextual_loss(a_, b_, max_points=30))
  sampled = jax.jit(lambda a_, b_, k_: losses.contextual_loss(a_, b_, max_points=30, rng=k_))
  idx = np.round(np.linspace(0, 99, 30)).astype(int)
  fx = np.asarray(losses.patch_features(x))[:, idx]
  fy = np.asarray(losses.patch_features(y))[:, idx]
  np.testing.assert_allclose(strided(x, y), _np_contextual(fx, fy), rtol=1e-4)
  # Random subsampling: a function of the key only.
  key = jax.random.PRNGKey(0)
  c, d = sampled(x, y, key), sampled(x, y, key)
  e = sampled(x, y, jax.random.PRNGKey(1))
  assert float(c) == float(d) and float(c) != float(e)
  idx = losses.subsample_indices(100, 30)
  assert len(np.unique(idx)) == 30 and idx[0] == 0 and idx[-1] == 99
  assert losses.subsample_indices(100, 200) is None

  # A feature function returning a [N, h, w, C] map: per-pixel intensities + gradients.
  def grad_feats(img):
    return jnp.concatenate(
      [img[:, 1:, 1:], img[:, 1:, 1:] - img[:, :-1, 1:], img[:, 1:, 1:] - img[:, 1:, :-1]], axis=-1
    )

  fx = np.asarray(grad_feats(x)).reshape(1, -1, 3)
  fy = np.asarray(grad_feats(y)).reshape(1, -1, 3)
  got = _jit(losses.contextual_loss, x, y, feature_fn=grad_feats, max_points=None)
  np.testing.assert_allclose(got, _np_contextual(fx, fy), rtol=1e-4)


def test_contextual_loss_gradients_finite():
  r = _rng(9)
  x = jnp.asarray(r.normal(size=(1, 12, 12, 1)), jnp.float32)
  value_and_grad = _jvgrad(losses.contextual_loss, argnums=(0, 1))
  for a, b in (
    (x, x),
    (x, jnp.zeros_like(x)),
    (jnp.zeros_like(x), jnp.zeros_like(x)),
    (x, x[:, ::-1]),
  ):
    val, g = value_and_grad(a, b)
    assert np.isfinite(float(val)) and _finite_tree(g)


def _np_random_conv(x):
  """NumPy re-derivation of `random_conv_features` from its weights: VALID 3x3 convolutions."""
  h = x.astype(np.float64)
  for kernel, (_, stride) in zip(
    losses.random_conv_weights(x.shape[-1]), losses.RANDOM_CONV_LAYERS
  ):
    windows = np.lib.stride_tricks.sliding_window_view(h, (3, 3), axis=(1, 2))  # [N,h,w,C,3,3]
    windows = windows[:, ::stride, ::stride]
    h = np.maximum(np.einsum('nhwcij,ijco->nhwo', windows, kernel.astype(np.float64)), 0)
  return h


def test_random_conv_features_match_numpy_and_are_a_fixed_function():
  r = _rng(15)
  for shape in ((2, 21, 17, 1), (1, 12, 9, 3)):
    x = r.uniform(-1, 1, size=shape).astype(np.float32)
    out = np.asarray(_jit(losses.random_conv_features, x))
    size = lambda s: (s - 5) // 2 - 1
    assert out.shape == (shape[0], size(shape[1]), size(shape[2]), 64)
    np.testing.assert_allclose(out, _np_random_conv(x), rtol=1e-4, atol=1e-5)
  # Fixed weights: the same after clearing the cache and drawing from numpy's and jax's PRNGs.
  first = np.asarray(losses.random_conv_features(x))
  losses.random_conv_weights.cache_clear()
  np.random.seed(123)
  np.random.normal(size=10)
  jax.random.normal(jax.random.PRNGKey(123), (10,))
  np.testing.assert_array_equal(np.asarray(losses.random_conv_features(x)), first)
  w1, w3 = losses.random_conv_weights(1), losses.random_conv_weights(3)
  assert [k.shape for k in w1] == [(3, 3, 1, 16), (3, 3, 16, 32), (3, 3, 32, 64)]
  np.testing.assert_array_equal(w1[2], w3[2])  # Only the first layer depends on C.
  # Zero-mean first layer: adding a constant to the image changes nothing.
  np.testing.assert_allclose(w1[0].sum(axis=(0, 1, 2)), 0, atol=1e-6)
  shifted = np.asarray(losses.random_conv_features(x + 0.3))
  np.testing.assert_allclose(shifted, first, atol=1e-5)
  with pytest.raises(ValueError, match='smaller than 9x9'):
    losses.random_conv_features(x[:, :8])
  with pytest.raises(ValueError, match=r'\[N, H, W, C\]'):
    losses.random_conv_features(x[0])


def test_contextual_loss_with_random_conv_features():
  r = _rng(16)
  x = r.uniform(-1, 1, size=(2, 32, 32, 1)).astype(np.float32)
  other = r.uniform(-1, 1, size=x.shape).astype(np.float32)
  fn = losses.contextual_feature_fn('random_conv', 5)
  same = float(_jit(losses.contextual_loss, x, x, feature_fn=fn, max_points=None))
  np.testing.assert_allclose(same, -math.log(1 + 1e-5), atol=1e-4)
  assert float(_jit(losses.contextual_loss, other, x, feature_fn=fn)) > same + 1.0
  # Differentiable w.r.t. the translation (first argument, as in the train step).
  loss = lambda y_, x_: losses.contextual_loss(y_, x_, feature_fn=fn, max_points=64)
  val, g = _jvgrad(loss)(jnp.asarray(other), jnp.asarray(x))
  assert np.isfinite(float(val)) and _finite_tree(g) and float(jnp.abs(g).sum()) > 0
  zeros = jnp.zeros_like(x)
  for a, b in ((zeros, zeros), (zeros, x), (x, x)):
    val, g = _jvgrad(loss, argnums=(0, 1))(a, b)
    assert np.isfinite(float(val)) and _finite_tree(g)


def _disc_scene(seed, size=96, n=2):
  """(x, y_contrast, y_unrelated) [n, size, size, 1]: smooth texture with a disc of radius
  0.2 * size, darker than its surroundings in x, brighter in y (same texture); y_unrelated is
  x with its pixels shuffled (same histogram, no structure)."""
  r = _rng(seed)
  tex = ndimage.gaussian_filter(r.normal(size=(n, size, size)), (0, 3, 3))
  tex = 0.2 * tex / tex.std() + 0.05 * r.normal(size=tex.shape)
  yy, xx = np.mgrid[:size, :size]
  c = r.uniform(0.35, 0.65, (n, 2, 1, 1)) * size
  disc = (yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2 < (0.2 * size) ** 2
  x = np.where(disc, 0.5 * tex - 0.5, tex)[..., None].astype(np.float32)
  y = np.where(disc, 0.5 * tex + 0.5, tex)[..., None].astype(np.float32)
  return x, y, r.permutation(x.reshape(-1)).reshape(x.shape)


def test_random_conv_features_penalise_a_contrast_change_less_than_raw_patches():
  """loss(y_contrast, x) / loss(y_unrelated, x) is smaller with 'random_conv' than with
  5x5 'patches': 0.035-0.039 vs 0.047-0.050 over 10 seeds at this size (96x96, 256 points).

  Only where the region is large against the 9x9 receptive field (disc radius 19 px here).
  With radius 13 px (64x64, 256 points) the order reverses, 0.063-0.068 vs 0.056-0.059:
  presumably because the disc's edges, whose polarity flips, then weigh more and raw patches
  (centred, compared by cosine) tolerate a flipped edge better than rectified filters.
  """
  ratios = {}
  for kind in losses.CONTEXTUAL_FEATURE_KINDS:
    fn = losses.contextual_feature_fn(kind, 5)
    loss = jax.jit(lambda y_, x_: losses.contextual_loss(y_, x_, feature_fn=fn, max_points=256))
    ratios[kind] = [float(loss(y, x)) / float(loss(u, x)) for x, y, u in map(_disc_scene, range(3))]
  for patches, random_conv in zip(ratios['patches'], ratios['random_conv']):
    assert random_conv < 0.9 * patches, ratios


def test_contextual_feature_fn_kinds():
  x = _rng(17).normal(size=(1, 12, 12, 1)).astype(np.float32)
  np.testing.assert_array_equal(
    losses.contextual_feature_fn('patches', 3)(x), losses.patch_features(x, patch_size=3)
  )
  assert losses.contextual_feature_fn('random_conv', 3) is losses.random_conv_features
  with pytest.raises(ValueError, match=r"method\.contextual_features .*'vgg'"):
    losses.contextual_feature_fn('vgg', 5)


# --------------------------------------------------------------------------- segmentation


def _np_seg(logits, labels, k, mask, include_bg, smooth):
  logits = logits.astype(np.float64)
  logp = _np_log_softmax(logits)
  onehot = np.eye(k)[labels]
  w = np.broadcast_to(mask[:, None, None], labels.shape)
  ce_pix = -(onehot * logp).sum(-1)
  ce = (ce_pix * w).sum() / w.sum()
  p = np.exp(logp) * w[..., None]
  g = onehot * w[..., None]
  dices = [
    (2 * (p[..., c] * g[..., c]).sum() + smooth) / (p[..., c].sum() + g[..., c].sum() + smooth)
    for c in range(0 if include_bg else 1, k)
  ]
  return ce, 1 - np.mean(dices)


@pytest.mark.parametrize('include_bg', [False, True])
def test_segmentation_loss_matches_numpy(include_bg):
  r = _rng(10)
  k = 4
  logits = r.normal(size=(3, 6, 5, k)).astype(np.float32) * 2
  labels = r.integers(0, k, size=(3, 6, 5))
  mask = np.array([1.0, 0.0, 0.5], np.float32)
  total, parts = _jit(
    losses.segmentation_loss,
    logits,
    labels,
    k,
    ce_weight=0.7,
    dice_weight=1.3,
    mask=mask,
    include_background=include_bg,
  )
  ce, dice = _np_seg(logits, labels, k, mask, include_bg, 1.0)
  np.testing.assert_allclose(parts['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(parts['dice'], dice, rtol=1e-5)
  np.testing.assert_allclose(total, 0.7 * ce + 1.3 * dice, rtol=1e-5)
  # No mask = all ones; smooth is configurable.
  _, parts = _jit(losses.segmentation_loss, logits, labels, k, smooth=1e-5)
  ce, dice = _np_seg(logits, labels, k, np.ones(3), False, 1e-5)
  np.testing.assert_allclose([parts['ce'], parts['dice']], [ce, dice], rtol=1e-5)


def test_segmentation_loss_closed_forms():
  k = 3
  labels = jnp.asarray(_rng(11).integers(0, k, size=(2, 8, 8)))
  # Uniform logits: CE = log K exactly.
  _, parts = _jit(losses.segmentation_loss, jnp.zeros((2, 8, 8, k)), labels, k)
  np.testing.assert_allclose(parts['ce'], math.log(k), rtol=1e-6)
  # Perfect, confident prediction: CE ~ 0 and Dice loss ~ 0.
  perfect = 30.0 * jax.nn.one_hot(labels, k)
  total, parts = _jit(losses.segmentation_loss, perfect, labels, k)
  assert float(parts['ce']) < 1e-6 and float(parts['dice']) < 1e-6 and float(total) < 1e-5
  # All examples masked out: both terms 0, gradients finite.
  fn = lambda lg: _jit(losses.segmentation_loss, lg, labels, k, mask=jnp.zeros(2))[0]
  assert float(fn(perfect)) == 0.0 and _finite_tree(_jgrad(fn)(perfect))


def test_segmentation_loss_empty_class_and_bf16():
  k = 3
  labels = jnp.zeros((2, 8, 8), jnp.int32).at[:, 2:4, 2:4].set(1)  # class 2 absent
  logits = jnp.asarray(_rng(12).normal(size=(2, 8, 8, k)), jnp.bfloat16)
  (total, parts), g = _jvgrad(
    lambda lg: _jit(losses.segmentation_loss, lg, labels, k), has_aux=True
  )(logits)
  assert total.dtype == jnp.float32 and np.isfinite(float(total)) and _finite_tree(g)
  ce, dice = _np_seg(np.asarray(logits, np.float32), np.asarray(labels), k, np.ones(2), False, 1.0)
  np.testing.assert_allclose([parts['ce'], parts['dice']], [ce, dice], rtol=1e-4)
  with pytest.raises(ValueError, match='num_classes'):
    _jit(losses.segmentation_loss, logits, labels, 4)
  with pytest.raises(ValueError, match='labels shape'):
    _jit(losses.segmentation_loss, logits, labels[:, :4], k)


def test_cross_entropy_gradients_have_no_scatter():
  """Segmentation and PatchNCE cross-entropies pick the label's logit without a gather, so
  their gradients hold no scatter: with constant loss weights XLA:CPU spent seconds
  constant-folding optax's scatter-add and logged an error-level slow_operation_alarm."""
  k = 2
  labels = jnp.asarray(_rng(13).integers(0, k, size=(2, 8, 8)))
  seg = lambda lg: losses.segmentation_loss(lg, labels, k)[0]
  hlo = jax.jit(jax.grad(seg)).lower(jnp.zeros((2, 8, 8, k))).as_text()
  assert 'scatter' not in hlo and 'gather' not in hlo
  q = jnp.zeros((2, 4, 3))
  hlo = jax.jit(jax.grad(losses.patch_nce_loss)).lower(q, q).as_text()
  assert 'scatter' not in hlo and 'gather' not in hlo


# --------------------------------------------------------------------------- hint


def _np_hint(s, t, kind):
  s = s.astype(np.float64)
  t = t.astype(np.float64)
  if kind == 'l2':
    return np.mean((s - t) ** 2)
  if kind == 'l1':
    return np.mean(np.abs(s - t))
  cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return np.mean(1 - cos)


@pytest.mark.parametrize('kind', ['l2', 'l1', 'cosine'])
def test_hint_loss_matches_numpy(kind):
  r = _rng(13)
  s = {
    'dec3': r.normal(size=(2, 8, 8, 4)).astype(np.float32),
    'dec4': r.normal(size=(2, 16, 16, 2)).astype(np.float32),
  }
  t = {
    'dec3': r.normal(size=(2, 8, 8, 4)).astype(np.float32),
    'dec4': r.normal(size=(2, 16, 16, 2)).astype(np.float32),
  }
  total, per_tap = _jit(losses.hint_loss, s, t, ['dec3', 'dec4'], kind=kind)
  for tap in ('dec3', 'dec4'):
    np.testing.assert_allclose(per_tap[tap], _np_hint(s[tap], t[tap], kind), rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * (per_tap['dec3'] + per_tap['dec4']), rtol=1e-6)
  total1, per_tap1 = _jit(losses.hint_loss, s, t, ['dec4'], kind=kind)
  assert list(per_tap1) == ['dec4'] and float(total1) == float(per_tap['dec4'])


def test_hint_loss_resizes_teacher_and_uses_adapter_outputs():
  # Teacher map at half resolution, constant per channel: bilinear resize keeps the
  # constants, so the loss is the closed form mean over channels of (s_c - t_c)^2.
  t_vals = np.array([1.0, -2.0, 0.5], np.float32)
  s_vals = np.array([0.0, -1.0, 2.5], np.float32)
  teacher = {'a': np.broadcast_to(t_vals, (2, 4, 4, 3))}
  student = {'a': np.broadcast_to(s_vals, (2, 8, 8, 3))}
  _, per_tap = _jit(losses.hint_loss, student, teacher, ['a'])
  np.testing.assert_allclose(per_tap['a'], np.mean((s_vals - t_vals) ** 2), rtol=1e-6)
  # Downsampling the teacher works too (antialiased).
  teacher_big = {'a': np.broadcast_to(t_vals, (2, 16, 16, 3))}
  _, per_tap = _jit(losses.hint_loss, student, teacher_big, ['a'], kind='l1')
  np.testing.assert_allclose(per_tap['a'], np.mean(np.abs(s_vals - t_vals)), rtol=1e-6)
  # adapters_out replaces the student features of its taps; width mismatch is an error.
  narrow = {'a': np.ones((2, 8, 8, 2), np.float32)}
  with pytest.raises(ValueError, match='HintAdapters'):
    _jit(losses.hint_loss, narrow, teacher, ['a'])
  _, per_tap = _jit(losses.hint_loss, narrow, teacher, ['a'], adapters_out=student)
  np.testing.assert_allclose(per_tap['a'], np.mean((s_vals - t_vals) ** 2), rtol=1e-6)
  with pytest.raises(KeyError, match="'b'"):
    _jit(losses.hint_loss, student, teacher, ['b'])
  with pytest.raises(ValueError, match='kind'):
    _jit(losses.hint_loss, student, teacher, ['a'], kind='l3')


@pytest.mark.parametrize('kind', ['l2', 'l1', 'cosine'])
def test_hint_loss_gradients_finite_at_edge_cases(kind):
  r = _rng(14)
  f = jnp.asarray(r.normal(size=(1, 4, 4, 3)), jnp.float32)
  z = jnp.zeros((1, 4, 4, 3))
  fn = lambda s_, t_: losses.hint_loss({'x': s_}, {'x': t_}, ['x'], kind=kind)[0]
  value_and_grad = _jvgrad(fn, argnums=(0, 1))
  for s, t in ((f, f), (z, z), (z, f), (f, f[:, :2, :2])):
    val, g = value_and_grad(s, t)
    assert np.isfinite(float(val)) and _finite_tree(g)
  if kind == 'cosine':  # identical inputs: 1 - cos = 0
    assert abs(float(_jit(losses.hint_loss, {'x': f}, {'x': f}, ['x'], kind=kind)[0])) < 1e-6


# --------------------------------------------------------------------------- KL


def test_kl_distillation_matches_numpy_and_is_zero_for_equal_logits():
  r = _rng(15)
  s = r.normal(size=(2, 5, 5, 3)).astype(np.float32) * 3
  t = r.normal(size=(2, 5, 5, 3)).astype(np.float32) * 3
  temp = 2.0
  lps = _np_log_softmax(s.astype(np.float64) / temp)
  lpt = _np_log_softmax(t.astype(np.float64) / temp)
  expected = temp**2 * np.mean((np.exp(lpt) * (lpt - lps)).sum(-1))
  np.testing.assert_allclose(_jit(losses.kl_distillation_loss, s, t, temp), expected, rtol=1e-5)
  assert abs(float(_jit(losses.kl_distillation_loss, t, t))) < 1e-6
  g = _jgrad(losses.kl_distillation_loss, argnums=(0, 1))(jnp.asarray(t), jnp.asarray(t))
  assert _finite_tree(g)
  # Saturated logits stay finite.
  big = jnp.asarray([[1e4, -1e4, 0.0]])
  assert np.isfinite(float(_jit(losses.kl_distillation_loss, big, -big)))
  assert _finite_tree(_jgrad(losses.kl_distillation_loss)(big, -big))


# --------------------------------------------------------------------------- adapters


def test_hint_adapters_project_only_mismatched_widths():
  r = _rng(16)
  feats = {
    'dec3': jnp.asarray(r.normal(size=(2, 4, 4, 8)), jnp.float32),
    'dec4': jnp.asarray(r.normal(size=(2, 8, 8, 16)), jnp.float32),
    'extra': jnp.ones((2, 2, 2, 5)),
  }
  module = HintAdapters(out_channels={'dec3': 12, 'dec4': 16})
  variables = module.init(jax.random.PRNGKey(0), feats)
  params = variables['params']
  assert set(params) == {'adapter_dec3'}
  kernel = params['adapter_dec3']['kernel']
  bias = params['adapter_dec3']['bias']
  assert kernel.shape == (1, 1, 8, 12) and kernel.dtype == jnp.float32
  out = module.apply(variables, feats)
  assert out['dec3'].shape == (2, 4, 4, 12)
  expected = np.asarray(feats['dec3']) @ np.asarray(kernel[0, 0]) + np.asarray(bias)
  np.testing.assert_allclose(out['dec3'], expected, rtol=1e-5, atol=1e-6)
  assert out['dec4'] is feats['dec4'] and out['extra'] is feats['extra']
  # bf16 inputs keep float32 params; the adapted features then feed the hint loss.
  bf = {k: v.astype(jnp.bfloat16) for k, v in feats.items()}
  variables_bf = module.init(jax.random.PRNGKey(0), bf)
  assert jax.tree_util.tree_leaves(variables_bf)[0].dtype == jnp.float32
  teacher = {'dec3': jnp.zeros((2, 4, 4, 12)), 'dec4': jnp.zeros((2, 8, 8, 16))}

  def loss_fn(p):
    adapted = module.apply({'params': p}, feats)
    return _jit(losses.hint_loss, feats, teacher, ['dec3', 'dec4'], adapters_out=adapted)[0]

  g = _jgrad(loss_fn)(params)
  assert _finite_tree(g) and float(jnp.abs(g['adapter_dec3']['kernel']).sum()) > 0


def test_all_losses_jit():
  r = _rng(17)
  x = jnp.asarray(r.normal(size=(2, 12, 12, 1)), jnp.float32)
  logits = jnp.asarray(r.normal(size=(2, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(r.integers(0, 3, size=(2, 12, 12)))
  q = losses.l2_normalize(jnp.asarray(r.normal(size=(2, 9, 4)), jnp.float32))

  @jax.jit
  def everything(x, logits, labels, q):
    return (
      losses.lsgan_generator_loss(x),
      losses.lsgan_discriminator_loss(x, -x),
      losses.l1_loss(x, -x),
      losses.patch_nce_loss(q, q[:, ::-1]),
      losses.contextual_loss(x, -x, max_points=16),
      losses.segmentation_loss(logits, labels, 3, mask=jnp.array([1.0, 0.0]))[0],
      losses.hint_loss({'t': logits}, {'t': logits[:, ::2, ::2]}, ['t'], 'cosine')[0],
      losses.kl_distillation_loss(logits, -logits),
    )

  outs = everything(x, logits, labels, q)
  assert all(o.shape == () and o.dtype == jnp.float32 and np.isfinite(float(o)) for o in outs)
