"""Building blocks shared by the networks (layout NHWC, parameters float32).

Everything here is exact with respect to the PyTorch operation it stands for; where a
faster XLA:CPU formulation is used (sub-pixel transposed convolution, reflection padding by
concatenation) a test checks it against the direct form with the same parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Initialisers. GAN parts follow CycleGAN/CUT `init_weights('normal', 0.02)`: weights
# N(0, 0.02), biases 0. Segmenters use He (kaiming) normal, fan-in, for ReLU networks.
gan_init = nn.initializers.normal(stddev=0.02)
he_init = nn.initializers.he_normal()
zeros_init = nn.initializers.zeros

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def resolve_dtype(dtype: Any) -> Any:
  """Maps "float32" / "bfloat16" (or a jnp dtype of those) to the jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'cmedl_jax.models: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}')
    return _DTYPES[dtype]
  if dtype in (jnp.float32, jnp.bfloat16) or np.dtype(dtype) in (
    np.dtype(jnp.float32),
    np.dtype(jnp.bfloat16),
  ):
    return dtype
  raise ValueError(f'cmedl_jax.models: unsupported compute dtype {dtype!r}')


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg.get(key, default)` for ConfigDicts and dicts, `getattr` for other objects.

  A field present but set to None also gives `default`.
  """
  if cfg is None:
    return default
  getter = getattr(cfg, 'get', None)
  value = getter(key, default) if callable(getter) else getattr(cfg, key, default)
  return default if value is None else value


# ----------------------------------------------------------------------------- padding


def reflect_pad(x: Array, pad: int, impl: str = 'concat') -> Array:
  """Reflection padding of H and W by `pad` (PyTorch `ReflectionPad2d(pad)`), NHWC.

  impl: "concat" (slices + reversal + concatenation), "gather" (one static-index take per
  axis) or "jnp" (`jnp.pad(mode="reflect")`). All three are exact; which lowers fastest on
  XLA:CPU is measured in benchmarks/models.py.
  """
  if pad == 0:
    return x
  h, w = x.shape[1], x.shape[2]
  if pad >= h or pad >= w:
    raise ValueError(f'reflect_pad: pad {pad} needs H and W > {pad}, got {h}x{w}')
  if impl == 'jnp':
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  if impl == 'gather':
    idx_h = np.concatenate([np.arange(pad, 0, -1), np.arange(h), np.arange(h - 2, h - 2 - pad, -1)])
    idx_w = np.concatenate([np.arange(pad, 0, -1), np.arange(w), np.arange(w - 2, w - 2 - pad, -1)])
    return jnp.take(jnp.take(x, idx_h, axis=1), idx_w, axis=2)
  if impl == 'concat':
    x = jnp.concatenate([x[:, pad:0:-1], x, x[:, h - 2 : h - 2 - pad : -1]], axis=1)
    return jnp.concatenate([x[:, :, pad:0:-1], x, x[:, :, w - 2 : w - 2 - pad : -1]], axis=2)
  raise ValueError(f"reflect_pad: impl must be 'concat', 'gather' or 'jnp', got {impl!r}")


def pad_to_multiple(x: Array, multiple: int, mode: str = 'edge') -> Array:
  """Pads H and W at the bottom/right up to the next multiple of `multiple` (NHWC)."""
  h, w = x.shape[1], x.shape[2]
  ph, pw = (-h) % multiple, (-w) % multiple
  if ph == 0 and pw == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


# ----------------------------------------------------------------------------- norms


def instance_norm(x: Array, eps: float = 1e-5) -> Array:
  """PyTorch `InstanceNorm2d(affine=False)`: per sample and channel over H, W (biased
  variance), statistics in float32, result in the input dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 2), keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# BatchNorm as PyTorch's defaults (momentum 0.1 = flax 0.9, eps 1e-5); densefcn.StackBatchNorm
# uses the same two numbers.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm as PyTorch's defaults (momentum 0.1 = flax 0.9, eps 1e-5), stats in
  `batch_stats`. Under jit with the batch sharded over a mesh the batch mean/variance are
  global-batch statistics (XLA inserts the all-reduce); no axis_name is needed."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


# ----------------------------------------------------------------------------- upsampling


def depth_to_space(x: Array, block: int = 2) -> Array:
  """[N, H, W, b*b*C] (channels ordered (row phase, column phase, C)) -> [N, bH, bW, C]."""
  n, h, w, c = x.shape
  c_out = c // (block * block)
  x = x.reshape(n, h, w, block, block, c_out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * block, w * block, c_out)


def interleave_phases(p00: Array, p01: Array, p10: Array, p11: Array) -> Array:
  """Four [N, H, W, C] phase images -> [N, 2H, 2W, C] with out[2i+a, 2j+b] = p_ab[i, j]."""
  n, h, w, c = p00.shape
  row0 = jnp.stack([p00, p01], axis=3)  # [N, H, W, 2, C]
  row1 = jnp.stack([p10, p11], axis=3)
  x = jnp.stack([row0, row1], axis=2)  # [N, H, 2, W, 2, C]
  return x.reshape(n, 2 * h, 2 * w, c)


_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Below this many images, the weight gradient of a convolution is computed on bands
# of rows (`_banded_weight_gradient`); 0 turns the banding off (for measurements).
BANDED_WEIGHT_GRADIENT_BELOW_BATCH = 8
# Name scopes of the platform-dependent weight gradient and of its CPU branch: the names of
# their operations in lowered (exported) modules.
BY_PLATFORM_SCOPE = 'weight_gradient_by_platform'
BANDED_SCOPE = 'banded_weight_gradient'


def _row_bands(batch: int, out_rows: int, kernel_rows: int) -> int:
  """Number of row bands for the weight gradient of a convolution: the fewest that
  divide the output rows and make batch x bands >= BANDED_WEIGHT_GRADIENT_BELOW_BATCH, with
  each band at least as tall as the kernel; 1 (no banding) when there is none."""
  if batch >= BANDED_WEIGHT_GRADIENT_BELOW_BATCH:
    return 1
  need = -(-BANDED_WEIGHT_GRADIENT_BELOW_BATCH // batch)
  for bands in range(need, out_rows + 1):
    if out_rows % bands == 0:
      return bands if out_rows // bands >= max(kernel_rows, 2) else 1
  return 1


def _lax_conv(x: Array, kernel: Array, strides, padding, precision) -> Array:
  return jax.lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
  )


def _xla_weight_gradient(x: Array, g: Array, kernel: Array, strides, padding, precision):
  conv = lambda k: _lax_conv(x, k, strides, padding, precision)
  return jax.vjp(conv, kernel)[1](g)[0]


def _banded_weight_gradient(
  x: Array, g: Array, kernel: Array, strides, padding, precision, bands: int
) -> Array:
  """d(loss)/d(kernel) of the convolution x [N, H, W, Cin] * kernel [kh, kw, Cin, Cout]
  (`strides`, explicit `padding`, NHWC/HWIO) with output cotangent g [N, Ho, Wo, Cout],
  summed over `bands` (> 1, from `_row_bands`) bands of output rows.

  XLA:CPU computes a weight gradient as a convolution that contracts over the batch; for one
  or two large images (256x256) that runs at a few GFLOP/s (measured: 3x3 32->32 on 1x256x256,
  86 vs 22 ms; 7x7 64->1, 694 vs 38 ms). Cutting the output into B bands of rows, each with
  its input rows plus the kernel's kh - 1 halo rows, as N x B images makes the contraction
  N x B long: the same sum in another order.
  """
  n, out_rows = g.shape[0], g.shape[1]
  kh, stride = kernel.shape[0], strides[0]
  with jax.named_scope(BANDED_SCOPE):
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    rows = out_rows // bands
    span = (rows - 1) * stride + kh  # input rows that one band of output rows reads
    index = np.arange(bands)[:, None] * rows * stride + np.arange(span)[None, :]
    x = x[:, index].reshape(n * bands, span, *x.shape[2:])
    g = g.reshape(n * bands, rows, *g.shape[2:])
    return _xla_weight_gradient(x, g, kernel, strides, 'VALID', precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_banded(x: Array, kernel: Array, strides, padding, precision) -> Array:
  return _lax_conv(x, kernel, strides, padding, precision)


def _conv_banded_fwd(x, kernel, strides, padding, precision):
  return _conv_banded(x, kernel, strides, padding, precision), (x, kernel)


def _conv_banded_bwd(strides, padding, precision, residuals, g):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, padding, precision), x)[1](g)[0]
  xla = lambda x, g, k: _xla_weight_gradient(x, g, k, strides, padding, precision)
  bands = _row_bands(g.shape[0], g.shape[1], kernel.shape[0])
  if bands == 1:
    return dx, xla(x, g, kernel)
  with jax.named_scope(BY_PLATFORM_SCOPE):
    dkernel = jax.lax.platform_dependent(
      x,
      g,
      kernel,
      cpu=lambda x, g, k: _banded_weight_gradient(x, g, k, strides, padding, precision, bands),
      default=xla,
    )
  return dx, dkernel


_conv_banded.defvjp(_conv_banded_fwd, _conv_banded_bwd)


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> Array:
  """`jax.lax.conv_general_dilated` with the same values and gradients; on CPU the weight
  gradient of an undilated, ungrouped 2D convolution (NHWC/HWIO) of a batch smaller than
  BANDED_WEIGHT_GRADIENT_BELOW_BATCH is computed on row bands (`_banded_weight_gradient`).
  Every convolution of the networks goes through here (`nn.Conv(conv_general_dilated=...)`).
  """
  plain = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  ones = lambda d: d is None or all(v == 1 for v in d)
  if (
    lhs.ndim != 4
    or not all(isinstance(d, int) for d in lhs.shape)  # symbolic (jax.export): no gradients
    or lhs.shape[0] >= BANDED_WEIGHT_GRADIENT_BELOW_BATCH
    or not (ones(lhs_dilation) and ones(rhs_dilation))
    or feature_group_count != 1
    or batch_group_count != 1
    or preferred_element_type is not None
    or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  ):
    return plain(lhs, rhs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return plain(lhs, rhs)
  return _conv_banded(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)


def _conv(x: Array, kernel: Array, padding) -> Array:
  return conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def conv_transpose_3x3_s2(x: Array, kernel: Array, impl: str = 'subpixel') -> Array:
  """PyTorch `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`, no bias.

  x [N, H, W, Cin], kernel [3, 3, Cin, Cout] with PyTorch's meaning
  out[2i - 1 + ky, 2j - 1 + kx] += x[i, j] @ kernel[ky, kx]; output [N, 2H, 2W, Cout].

  Per axis, output 2m reads x[m] through tap 1, output 2m+1 reads x[m] through tap 2 and
  x[m+1] through tap 0. impl "subpixel": four stride-1 convolutions (1x1, 1x2, 2x1, 2x2:
  exactly the 9 taps, no multiplications by inserted zeros) and interleaving; "subpixel1":
  one 2x2 convolution to 4*Cout channels + depth-to-space (16 taps, 7 of them zero);
  "xla": `lax.conv_transpose` (input-dilated convolution), the direct form.
  """
  if impl == 'xla':
    return jax.lax.conv_transpose(
      x, kernel[::-1, ::-1], (2, 2), ((1, 2), (1, 2)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
  k = kernel
  if impl == 'subpixel':
    xr = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))  # x[:, :, j+1] with zero past the end
    xb = jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    xrb = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    p00 = _conv(x, k[1:2, 1:2], 'VALID')
    p01 = _conv(xr, jnp.stack([k[1, 2], k[1, 0]])[None], 'VALID')
    p10 = _conv(xb, jnp.stack([k[2, 1], k[0, 1]])[:, None], 'VALID')
    k11 = jnp.stack([jnp.stack([k[2, 2], k[2, 0]]), jnp.stack([k[0, 2], k[0, 0]])])
    p11 = _conv(xrb, k11, 'VALID')
    return interleave_phases(p00, p01, p10, p11)
  if impl == 'subpixel1':
    z = jnp.zeros_like(k[0, 0])
    # offsets (dy, dx) in {0, 1}^2; phase a uses tap 1 at offset 0 (a=0) or taps 2, 0 at
    # offsets 0, 1 (a=1).
    tap = {(0, 0): 1, (1, 0): 2, (1, 1): 0}
    phases = []
    for a in (0, 1):
      for b in (0, 1):
        rows = []
        for dy in (0, 1):
          cols = []
          for dx in (0, 1):
            ky, kx = tap.get((a, dy)), tap.get((b, dx))
            cols.append(z if ky is None or kx is None else k[ky, kx])
          rows.append(jnp.stack(cols))
        phases.append(jnp.stack(rows))  # [2, 2, Cin, Cout]
    big = jnp.concatenate(phases, axis=-1)  # [2, 2, Cin, 4*Cout], phase-major
    xrb = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return depth_to_space(_conv(xrb, big, 'VALID'), 2)
  raise ValueError(
    f"conv_transpose_3x3_s2: impl must be 'subpixel', 'subpixel1' or 'xla', got {impl!r}"
  )


class ConvTranspose3x3S2(nn.Module):
  """`nn.ConvTranspose2d(cin, features, 3, stride=2, padding=1, output_padding=1)`:
  [N, H, W, Cin] -> [N, 2H, 2W, features]. Parameters `kernel` [3, 3, Cin, features] and
  `bias` [features] (same count as PyTorch)."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = gan_init
  impl: str = 'subpixel'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    y = conv_transpose_3x3_s2(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
    if self.use_bias:
      bias = self.param('bias', zeros_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose2x2S2(nn.Module):
  """`nn.ConvTranspose2d(cin, features, 2, stride=2)` (U-Net up-convolution), computed
  exactly as a 1x1 convolution to 4*features channels + depth-to-space (the 2x2 windows do
  not overlap). Parameters `kernel` [2, 2, Cin, features], `bias` [features]."""

  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = he_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (2, 2, cin, self.features), jnp.float32)
    bias = self.param('bias', zeros_init, (self.features,), jnp.float32)
    # out[2i+a, 2j+b] = x[i, j] @ kernel[a, b]
    k1 = kernel.transpose(2, 0, 1, 3).reshape(1, 1, cin, 4 * self.features)
    y = _conv(x.astype(self.dtype), k1.astype(self.dtype), 'VALID')
    return depth_to_space(y, 2) + bias.astype(self.dtype)


def upsample_nearest2x(x: Array) -> Array:
  """Nearest-neighbour x2 upsampling, [N, H, W, C] -> [N, 2H, 2W, C]."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
  """[size_out, size_in] bilinear interpolation along one axis, half-pixel centres
  (`align_corners=False`), edges clamped, no antialiasing: `jax.image.resize(...,
  'bilinear', antialias=False)`'s weights."""
  pos = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  lo = np.floor(pos).astype(np.int64)
  frac = (pos - lo).astype(np.float32)
  m = np.zeros((size_out, size_in), np.float32)
  rows = np.arange(size_out)
  np.add.at(m, (rows, np.clip(lo, 0, size_in - 1)), 1.0 - frac)
  np.add.at(m, (rows, np.clip(lo + 1, 0, size_in - 1)), frac)
  return m


def resize_bilinear(x: Array, height: int, width: int) -> Array:
  """Bilinear resize of H, W (`bilinear_matrix`; the same as `jax.image.resize` with
  antialias=False, and as with antialiasing when upsampling, its only use here), as two small
  matrix products: independent of the batch size, so it exports with a symbolic batch."""
  mh = jnp.asarray(bilinear_matrix(height, x.shape[1]), x.dtype)
  mw = jnp.asarray(bilinear_matrix(width, x.shape[2]), x.dtype)
  return jnp.einsum('ih,jw,nhwc->nijc', mh, mw, x)


def adaptive_avg_pool_matrix(size: int, bins: int) -> np.ndarray:
  """[bins, size] averaging matrix of PyTorch `AdaptiveAvgPool` along one axis: bin i
  averages rows floor(i*size/bins) .. ceil((i+1)*size/bins) - 1."""
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, -((-(i + 1) * size) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: Array, bins: int) -> Array:
  """PyTorch `AdaptiveAvgPool2d(bins)` on NHWC: [N, H, W, C] -> [N, bins, bins, C]."""
  mh = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], bins), x.dtype)
  mw = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], bins), x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', mh, x, mw)


def dropout(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
  """Dropout that is active only when `train` and a 'dropout' rng was passed to `apply`
  (so a train step that passes no dropout rng gets a deterministic network)."""
  if rate <= 0.0 or not train or not module.has_rng('dropout'):
    return x
  return nn.Dropout(rate, deterministic=False)(x)
