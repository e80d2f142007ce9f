"""2D U-Net (Ronneberger et al. 2015) with batch norm.

Encoder: `depth` levels of [conv 3x3 - BN - ReLU] x 2 at widths base_width * 2^l, each
followed by 2x2 max pooling; a bottleneck double conv at base_width * 2^depth; decoder:
up (2x2 stride-2 transposed conv, or nearest x2 resize + 3x3 conv, halving the width),
concatenation with the skip, double conv; a 1x1 classifier conv. Convs before BN have no
bias. He-normal initialisation.

Taps: "last" = output of the final decoder double conv (what the 1x1 classifier reads,
base_width channels, input resolution), "penultimate" = output of the first conv-BN-ReLU of
that double conv (base_width channels), "logits".
remat=True recomputes each conv-BN-ReLU's intermediates in the backward pass instead of keeping
them (`nn.remat`; same parameters and results, less activation memory, more compute).
H, W need not be multiples of 2^depth: the input is edge-padded at the bottom/right and the
logits and taps are cropped back to H x W.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers

Array = jax.Array


class ConvBNReLU(nn.Module):
  """conv kxk (no bias) - BatchNorm - ReLU."""

  features: int
  kernel: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      padding='SAME',
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.he_init,
      conv_general_dilated=layers.conv_general_dilated,
    )(x)
    return nn.relu(layers.batch_norm(train, self.dtype)(x))


class UNet(nn.Module):
  """[N, H, W, C] -> (logits [N, H, W, num_classes] float32, taps dict float32)."""

  num_classes: int
  base_width: int = 32
  depth: int = 4
  up: str = 'transpose'  # "transpose" | "resize"
  dtype: Any = 'float32'
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool):
    if self.up not in ('transpose', 'resize'):
      raise ValueError(f"UNet: up must be 'transpose' or 'resize', got {self.up!r}")
    dtype = layers.resolve_dtype(self.dtype)
    h_in, w_in = x.shape[1], x.shape[2]
    h = layers.pad_to_multiple(x, 2**self.depth).astype(dtype)
    conv_block = nn.remat(ConvBNReLU, static_argnums=(2,)) if self.remat else ConvBNReLU

    skips = []
    for level in range(self.depth):
      width = self.base_width * 2**level
      h = conv_block(width, dtype=dtype, name=f'enc_{level}_0')(h, train)
      h = conv_block(width, dtype=dtype, name=f'enc_{level}_1')(h, train)
      skips.append(h)
      h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2))
    width = self.base_width * 2**self.depth
    h = conv_block(width, dtype=dtype, name='bottleneck_0')(h, train)
    h = conv_block(width, dtype=dtype, name='bottleneck_1')(h, train)

    penultimate = None
    for level in reversed(range(self.depth)):
      width = self.base_width * 2**level
      if self.up == 'transpose':
        h = layers.ConvTranspose2x2S2(width, dtype=dtype, name=f'up_{level}')(h)
      else:
        h = nn.Conv(
          width,
          (3, 3),
          padding='SAME',
          dtype=dtype,
          param_dtype=jnp.float32,
          kernel_init=layers.he_init,
          name=f'up_{level}',
          conv_general_dilated=layers.conv_general_dilated,
        )(layers.upsample_nearest2x(h))
      h = jnp.concatenate([skips[level], h], axis=-1)
      h = conv_block(width, dtype=dtype, name=f'dec_{level}_0')(h, train)
      penultimate = h
      h = conv_block(width, dtype=dtype, name=f'dec_{level}_1')(h, train)
    logits = nn.Conv(
      self.num_classes,
      (1, 1),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.he_init,
      name='classifier',
      conv_general_dilated=layers.conv_general_dilated,
    )(h)
    crop = lambda t: t[:, :h_in, :w_in, :].astype(jnp.float32)
    logits = crop(logits)
    return logits, {'penultimate': crop(penultimate), 'last': crop(h), 'logits': logits}
