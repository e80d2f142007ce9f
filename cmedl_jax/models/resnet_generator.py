"""CycleGAN / CUT ResNet generator (Johnson et al. 2016; Zhu et al. 2017; Park et al. 2020).

Same architecture and parameter count as `ResnetGenerator` in junyanz/pytorch-CycleGAN-and-pix2pix
(norm 'instance' = `InstanceNorm2d(affine=False)`, so every conv has a bias; no dropout;
padding_type 'reflect'); for input_nc=output_nc=1, ngf=64, 9 blocks: 11,365,633 parameters.
CUT (taesungp/contrastive-unpaired-translation) uses this generator with `--no_antialias`
and reads activations by index into the same sequential layer list:

  index  PyTorch layer                         output (for an H x W input, ngf=64)
  0      ReflectionPad2d(3)                    [N, H+6, W+6, in]  (the padded input)
  1      Conv2d(in, ngf, 7)                    [N, H, W, 64]
  2      InstanceNorm2d                        [N, H, W, 64]
  3      ReLU                                  [N, H, W, 64]
  4      Conv2d(ngf, 2ngf, 3, s2, p1)          [N, H/2, W/2, 128]
  5, 6   InstanceNorm2d, ReLU                  [N, H/2, W/2, 128]
  7      Conv2d(2ngf, 4ngf, 3, s2, p1)         [N, H/4, W/4, 256]
  8, 9   InstanceNorm2d, ReLU                  [N, H/4, W/4, 256]
  10 .. 9+B   ResnetBlock 0 .. B-1             [N, H/4, W/4, 256]
  10+B   ConvTranspose2d(4ngf, 2ngf, 3, s2, p1, output_padding=1)   [N, H/2, W/2, 128]
  11+B, 12+B  InstanceNorm2d, ReLU
  13+B   ConvTranspose2d(2ngf, ngf, ...)       [N, H, W, 64]
  14+B, 15+B  InstanceNorm2d, ReLU
  16+B   ReflectionPad2d(3)                    [N, H+6, W+6, 64]
  17+B   Conv2d(ngf, out, 7)                   [N, H, W, out]
  18+B   Tanh                                  [N, H, W, out]

CUT's default `nce_layers=(0, 4, 8, 12, 16)` with 9 blocks therefore reads: the
reflection-padded input, the first stride-2 conv (before its norm), the second stride-2
conv after instance norm, and the outputs of ResNet blocks 2 and 6.

Inputs whose H or W is not a multiple of 4 are reflection-padded at the bottom/right to the
next multiple of 4 (needs H, W >= 4) and the output is cropped back; the returned NCE
activations are those of the padded input.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers

Array = jax.Array


def _gan_conv(features: int, kernel: int, stride: int, padding, dtype: Any, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    use_bias=True,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=layers.gan_init,
    bias_init=layers.zeros_init,
    name=name,
    conv_general_dilated=layers.conv_general_dilated,
  )


def biases_before_norm(params) -> list[tuple[str, ...]]:
  """Paths in a ResnetGenerator's params of the conv biases an instance norm follows at once:
  every conv's but conv_out's. The norm subtracts them again, so they change no output and their
  true gradient is 0 (a computed one is float32 rounding noise). Kept, as the reference
  (`use_bias = norm_layer == InstanceNorm2d`) keeps them: same parameters and checkpoints."""
  return [
    path
    for path in traverse_util.flatten_dict(params)
    if path[-1] == 'bias' and path[0] != 'conv_out'
  ]


class ResnetBlock(nn.Module):
  """x + [reflect-pad 1, conv 3x3, IN, ReLU, reflect-pad 1, conv 3x3, IN](x)."""

  dtype: Any = jnp.float32
  pad_impl: str = 'concat'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    h = layers.reflect_pad(x, 1, self.pad_impl)
    h = _gan_conv(dim, 3, 1, 'VALID', self.dtype, 'conv_0')(h)
    h = nn.relu(layers.instance_norm(h))
    h = layers.reflect_pad(h, 1, self.pad_impl)
    h = _gan_conv(dim, 3, 1, 'VALID', self.dtype, 'conv_1')(h)
    return x + layers.instance_norm(h)


class ResnetGenerator(nn.Module):
  """ResNet image translator: [N, H, W, C_in] -> tanh output [N, H, W, out_channels], float32.

  `__call__(x, nce_layers=())` returns `y`, or `(y, feats)` with `feats` the activations
  (float32) after the layers listed in `nce_layers` (indices in the module docstring), in
  the order given. Unused outputs are removed by XLA under jit, so asking only for
  features costs only the encoder.

  remat=True recomputes each ResNet block's intermediates in the backward pass (`nn.remat`).
  upsample_impl / pad_impl choose the exact formulation of ConvTranspose2d and
  ReflectionPad2d (see `layers`); defaults are the fastest measured on XLA:CPU.
  """

  out_channels: int = 1
  ngf: int = 64
  n_blocks: int = 9
  dtype: Any = 'float32'
  upsample_impl: str = 'subpixel'
  pad_impl: str = 'concat'
  remat: bool = False

  def num_layers(self) -> int:
    """Length of the PyTorch sequential layer list (28 for 9 blocks)."""
    return 19 + self.n_blocks

  @nn.compact
  def __call__(self, x: Array, nce_layers: Sequence[int] = ()):
    dtype = layers.resolve_dtype(self.dtype)
    nce_layers = tuple(int(i) for i in nce_layers)
    n_total = self.num_layers()
    for i in nce_layers:
      if not 0 <= i < n_total:
        raise ValueError(f'ResnetGenerator: nce layer {i} out of range [0, {n_total})')
    h_in, w_in = x.shape[1], x.shape[2]
    if min(h_in, w_in) < 4:
      raise ValueError(f'ResnetGenerator: input must be at least 4x4, got {h_in}x{w_in}')
    ph, pw = (-h_in) % 4, (-w_in) % 4
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='reflect')
    pad = lambda t, p: layers.reflect_pad(t, p, self.pad_impl)
    ngf, b = self.ngf, self.n_blocks

    ops = [
      lambda t: pad(t, 3),
      _gan_conv(ngf, 7, 1, 'VALID', dtype, 'conv_in'),
      layers.instance_norm,
      nn.relu,
      _gan_conv(2 * ngf, 3, 2, ((1, 1), (1, 1)), dtype, 'down_0'),
      layers.instance_norm,
      nn.relu,
      _gan_conv(4 * ngf, 3, 2, ((1, 1), (1, 1)), dtype, 'down_1'),
      layers.instance_norm,
      nn.relu,
    ]
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    ops += [block(dtype, self.pad_impl, name=f'block_{k}') for k in range(b)]
    ops += [
      layers.ConvTranspose3x3S2(2 * ngf, dtype=dtype, impl=self.upsample_impl, name='up_0'),
      layers.instance_norm,
      nn.relu,
      layers.ConvTranspose3x3S2(ngf, dtype=dtype, impl=self.upsample_impl, name='up_1'),
      layers.instance_norm,
      nn.relu,
      lambda t: pad(t, 3),
      _gan_conv(self.out_channels, 7, 1, 'VALID', dtype, 'conv_out'),
      lambda t: jnp.tanh(t.astype(jnp.float32)),
    ]
    assert len(ops) == n_total

    h = x.astype(dtype)
    feats = {}
    for i, op in enumerate(ops):
      h = op(h)
      if i in nce_layers:
        feats[i] = h.astype(jnp.float32)
    y = h[:, :h_in, :w_in, :]
    if not nce_layers:
      return y
    return y, [feats[i] for i in nce_layers]
