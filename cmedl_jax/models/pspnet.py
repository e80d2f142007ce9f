"""PSPNet (Zhao et al. 2017) with a dilated ResNet backbone trained from scratch.

Backbone (output stride 8): deep stem [conv 3x3 s2, conv 3x3, conv 3x3] (base_width maps,
each conv-BN-ReLU) + max pool 3x3 s2; four stages of residual blocks (`blocks` per stage,
basic blocks or bottlenecks with expansion 4), widths base_width * (1, 2, 4, 8), strides
(1, 2, 1, 1), dilations (1, 1, 2, 4). Default: basic blocks (2, 2, 2, 2), base 64
(a dilated ResNet-18); `bottleneck=True, blocks=(3, 4, 6, 3)` is PSPNet's ResNet-50.
Pyramid pooling module: adaptive average pooling to bins (1, 2, 3, 6), each 1x1 conv
(C/len(bins) maps)-BN-ReLU, bilinear upsampling back, concatenated with the backbone
output. Head: conv 3x3 (head_width: C/2 for basic blocks, C/4 for bottlenecks)-BN-ReLU,
dropout 0.1, 1x1 classifier, bilinear upsampling (half-pixel centres) to the input size.
Optional auxiliary head on stage 3 (conv 3x3-BN-ReLU-dropout-1x1), its logits upsampled to
the input size in taps["aux_logits"]. Convs before BN have no bias; He-normal init.

Taps (at 1/8 of the padded input resolution, NOT the input resolution): "penultimate" = the
pyramid-pooling concatenation, "last" = the 3x3 head conv output (what the classifier reads);
"logits" (and "aux_logits") at input resolution. H, W are edge-padded to a multiple of 8 and
the logits cropped back. Dropout is active only with train=True and a 'dropout' rng.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers

Array = jax.Array


def _conv(features, kernel, dtype, stride=1, dilation=1, bias=False, name=None):
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((dilation * (kernel // 2),) * 2,) * 2,
    kernel_dilation=(dilation, dilation),
    use_bias=bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=layers.he_init,
    name=name,
    conv_general_dilated=layers.conv_general_dilated,
  )


class ResidualBlock(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block with BN; projection
  shortcut (1x1 conv-BN) when the shape changes."""

  width: int
  stride: int = 1
  dilation: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bn = lambda: layers.batch_norm(train, self.dtype)
    out_width = self.width * (4 if self.bottleneck else 1)
    if self.bottleneck:
      h = nn.relu(bn()(_conv(self.width, 1, self.dtype)(x)))
      h = nn.relu(bn()(_conv(self.width, 3, self.dtype, self.stride, self.dilation)(h)))
      h = bn()(_conv(out_width, 1, self.dtype)(h))
    else:
      h = nn.relu(bn()(_conv(self.width, 3, self.dtype, self.stride, self.dilation)(x)))
      h = bn()(_conv(self.width, 3, self.dtype, 1, self.dilation)(h))
    if self.stride != 1 or x.shape[-1] != out_width:
      x = bn()(_conv(out_width, 1, self.dtype, self.stride)(x))
    return nn.relu(x + h)


class PSPNet(nn.Module):
  """[N, H, W, C] -> (logits [N, H, W, num_classes] float32, taps dict float32)."""

  num_classes: int
  base_width: int = 64
  blocks: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  bins: Sequence[int] = (1, 2, 3, 6)
  aux_head: bool = False
  dropout_rate: float = 0.1
  dtype: Any = 'float32'
  remat: bool = False  # Recompute each residual block's intermediates in the backward pass.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    dtype = layers.resolve_dtype(self.dtype)
    if len(self.blocks) != 4:
      raise ValueError(f'PSPNet: blocks needs 4 stage lengths, got {tuple(self.blocks)}')
    h_in, w_in = x.shape[1], x.shape[2]
    x = layers.pad_to_multiple(x, 8).astype(dtype)
    hp, wp = x.shape[1], x.shape[2]
    bn = lambda name=None: layers.batch_norm(train, dtype, name=name)

    h = x
    for i, stride in enumerate((2, 1, 1)):
      h = nn.relu(bn()(_conv(self.base_width, 3, dtype, stride, name=f'stem_{i}')(h)))
    # nn.max_pool's own padding pads with -inf too; padding first lets ONNX converters take it.
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    h = nn.max_pool(h, window_shape=(3, 3), strides=(2, 2))

    block = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    stage3 = None
    for s, (n_blocks, stride, dilation) in enumerate(zip(self.blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
      for b in range(n_blocks):
        h = block(
          self.base_width * 2**s,
          stride if b == 0 else 1,
          dilation,
          self.bottleneck,
          dtype,
          name=f'stage{s + 1}_{b}',
        )(h, train)
      if s == 2:
        stage3 = h

    fh, fw, c = h.shape[1], h.shape[2], h.shape[3]
    pooled = [h]
    for b in self.bins:
      p = layers.adaptive_avg_pool(h, b)
      p = nn.relu(bn()(_conv(c // len(self.bins), 1, dtype, name=f'ppm_{b}')(p)))
      pooled.append(layers.resize_bilinear(p, fh, fw).astype(dtype))
    penultimate = jnp.concatenate(pooled, axis=-1)
    head_width = c // 4 if self.bottleneck else c // 2
    last = nn.relu(bn()(_conv(head_width, 3, dtype, name='head')(penultimate)))
    t = layers.dropout(self, last, self.dropout_rate, train)
    logits = _conv(self.num_classes, 1, dtype, bias=True, name='classifier')(t)
    to_input = lambda t: layers.resize_bilinear(t.astype(jnp.float32), hp, wp)[:, :h_in, :w_in, :]
    logits = to_input(logits)
    feats = {
      'penultimate': penultimate.astype(jnp.float32),
      'last': last.astype(jnp.float32),
      'logits': logits,
    }
    if self.aux_head:
      a = nn.relu(bn()(_conv(head_width // 2, 3, dtype, name='aux_conv')(stage3)))
      a = layers.dropout(self, a, self.dropout_rate, train)
      a = _conv(self.num_classes, 1, dtype, bias=True, name='aux_classifier')(a)
      feats['aux_logits'] = to_input(a)
    return logits, feats
