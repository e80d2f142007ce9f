"""70x70 PatchGAN discriminator (CycleGAN's `NLayerDiscriminator`, Isola et al. 2017).

[conv 4x4 s2 p1, LeakyReLU 0.2] + (n_layers-1) x [conv 4x4 s2 p1, IN, LeakyReLU] +
[conv 4x4 s1 p1, IN, LeakyReLU] + [conv 4x4 s1 p1 -> 1]. Zero padding, instance norm
without affine parameters (so every conv has a bias), weights N(0, 0.02). For 1 input
channel, ndf 64, 3 layers: 2,762,689 parameters, as the PyTorch reference. A 256x256 input
gives a 30x30 map of raw logits (LSGAN: no sigmoid).
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers


def biases_before_norm(params) -> list[tuple[str, ...]]:
  """Paths in a PatchGAN's params of the conv biases an instance norm follows at once (conv_1 ..
  conv_n): they change no output and their true gradient is 0. Kept, as the reference keeps them
  (resnet_generator.biases_before_norm)."""
  return [
    path
    for path in traverse_util.flatten_dict(params)
    if path[-1] == 'bias' and path[0] not in ('conv_0', 'conv_out')
  ]


class PatchGAN(nn.Module):
  """[N, H, W, C] -> [N, h, w, 1] float32 logits (h = H/8 - 2 for H divisible by 8)."""

  ndf: int = 64
  n_layers: int = 3
  dtype: Any = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = layers.resolve_dtype(self.dtype)

    def conv(features, stride, name):
      return nn.Conv(
        features,
        (4, 4),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.gan_init,
        bias_init=layers.zeros_init,
        name=name,
        conv_general_dilated=layers.conv_general_dilated,
      )

    h = x.astype(dtype)
    h = nn.leaky_relu(conv(self.ndf, 2, 'conv_0')(h), 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * mult, stride, f'conv_{n}')(h)
      h = nn.leaky_relu(layers.instance_norm(h), 0.2)
    h = conv(1, 1, 'conv_out')(h)
    return h.astype(jnp.float32)
