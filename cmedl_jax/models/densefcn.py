"""FC-DenseNet ("Tiramisu", Jegou et al. 2017), variants 56 / 67 / 103.

As the authors' Lasagne code (SimJeg/FC-DenseNet): first conv 3x3 to 48 maps; down path of
`n_pool` [dense block, transition down]; a bottleneck dense block; up path of n_pool
[transition up, concatenation with the skip, dense block]; 1x1 classifier on the final
stack. Dense layer = BN-ReLU-conv 3x3 (growth_rate maps)-dropout, its output concatenated to
its input; transition down = BN-ReLU-conv 1x1 (same width)-dropout-max pool 2x2; transition
up = transposed conv 3x3 stride 2 of the previous block's *new* maps only, to
growth_rate * (layers of that block) maps. Convs have biases; He-normal initialisation.

  variant  growth  layers per block (down..., bottleneck, ...up)
  56       12      4 x 11
  67       16      5 x 11
  103      16      4 5 7 10 12 | 15 | 12 10 7 5 4

Difference from the Lasagne code, not in the parameter count: the transposed conv is
PyTorch's ConvTranspose2d(k3, s2, p1, output_padding=1) (output exactly 2x, computed as
sub-pixel convolutions) instead of a 'valid' deconvolution cropped to the skip size, a
one-pixel shift of the sampling grid.

Taps: "last" = the final stack (input of the 1x1 classifier; 256 maps for 103),
"penultimate" = the stack entering the last dense block (transition-up output concatenated
with the skip; 192 maps for 103), "logits". H, W are edge-padded to a multiple of 2^n_pool
and cropped back. Dropout is active only with train=True and a 'dropout' rng. remat=True
recomputes each dense block in the backward pass (`nn.remat`; the concatenated stacks and their
BN-ReLU copies are what fills memory in a DenseNet). In training each map's batch statistics
are computed once per block, not once per layer that reads it (StackBatchNorm): the same
function and variables as nn.BatchNorm in every layer, with a smaller compiled step.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers

Array = jax.Array

VARIANTS = {
  56: dict(growth_rate=12, layers_per_block=4),
  67: dict(growth_rate=16, layers_per_block=5),
  103: dict(growth_rate=16, layers_per_block=(4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4)),
}


def _conv(features: int, kernel: int, dtype: Any, name: str | None = None) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    padding='SAME',
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=layers.he_init,
    name=name,
    conv_general_dilated=layers.conv_general_dilated,
  )


def batch_statistics(x: Array) -> tuple[Array, Array, Array]:
  """[N, H, W, C] -> (x normalised with its batch statistics [N, H, W, C] in x's dtype,
  mean [C], variance [C]), both float32, as nn.BatchNorm computes them in training
  (E[x^2] - E[x]^2, clipped at 0; layers.BN_EPSILON)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(0, 1, 2))
  var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axis=(0, 1, 2)) - jnp.square(mean))
  return ((xf - mean) * jax.lax.rsqrt(var + layers.BN_EPSILON)).astype(x.dtype), mean, var


class StackBatchNorm(nn.Module):
  """A dense layer's BatchNorm of its input stack [N, H, W, C]; the variables of nn.BatchNorm
  (params scale, bias; batch_stats mean, var; layers.BN_MOMENTUM and BN_EPSILON).

  In training, batch statistics are per channel, so every layer that reads a channel would
  compute the same mean and variance of it: the block normalises each map once
  (`batch_statistics`) and passes `normalized, mean, var` of the whole stack; this layer applies
  its scale and bias and updates its running averages. The result equals nn.BatchNorm's, and
  the backward pass has one normalisation per map instead of one per (layer, map), which is
  what made FC-DenseNet103's compiled step large and slow to compile. In evaluation `stats` is
  None and the running averages normalise `stack`.
  """

  dtype: Any

  @nn.compact
  def __call__(self, stack: Array, stats: tuple[Array, Array, Array] | None) -> Array:
    c = (stack if stats is None else stats[1]).shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if stats is None:
      inv_std = jax.lax.rsqrt(ra_var.value + layers.BN_EPSILON)
      normalized = (stack.astype(jnp.float32) - ra_mean.value) * inv_std
    else:
      normalized, mean, var = stats
      if not self.is_initializing():
        m = layers.BN_MOMENTUM
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var
    return (normalized * scale.astype(self.dtype) + bias.astype(self.dtype)).astype(self.dtype)


class DenseBlock(nn.Module):
  """n_layers dense layers (BN-ReLU-conv 3x3-dropout, each output concatenated to its input).

  [N, H, W, C] -> (stack [N, H, W, C + n_layers * growth], new maps [N, H, W, n_layers * growth]).
  Batch statistics are computed once per map (StackBatchNorm).
  """

  n_layers: int
  growth: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, stack: Array, train: bool):
    block_input, new = stack, []
    stats = batch_statistics(stack) if train else None
    for i in range(self.n_layers):
      t = StackBatchNorm(self.dtype, name=f'BatchNorm_{i}')(stack, stats)
      t = _conv(self.growth, 3, self.dtype)(nn.relu(t))
      t = layers.dropout(self, t, self.dropout_rate, train)
      new.append(t)
      if train:  # The normalised stack grows as the stack does (two-operand concatenations).
        stats = tuple(jnp.concatenate(pair, axis=-1) for pair in zip(stats, batch_statistics(t)))
      else:
        stack = jnp.concatenate([stack, t], axis=-1)
    new = jnp.concatenate(new, axis=-1)
    return jnp.concatenate([block_input, new], axis=-1), new


class DenseFCN(nn.Module):
  """[N, H, W, C] -> (logits [N, H, W, num_classes] float32, taps dict float32).

  `growth_rate`, `layers_per_block` (int or 2*n_pool+1 ints) and `n_pool` override the
  variant (for tiny test networks).
  """

  num_classes: int
  variant: int = 103
  growth_rate: int | None = None
  layers_per_block: int | Sequence[int] | None = None
  n_pool: int = 5
  first_filters: int = 48
  dropout_rate: float = 0.2
  dtype: Any = 'float32'
  remat: bool = False  # Recompute each dense block's intermediates in the backward pass.

  def block_layers(self) -> tuple[int, ...]:
    if self.variant not in VARIANTS:
      raise ValueError(f'DenseFCN: variant must be one of {sorted(VARIANTS)}, got {self.variant!r}')
    lpb = (
      self.layers_per_block
      if self.layers_per_block is not None
      else VARIANTS[self.variant]['layers_per_block']
    )
    n_blocks = 2 * self.n_pool + 1
    if isinstance(lpb, int):
      return (lpb,) * n_blocks
    lpb = tuple(int(v) for v in lpb)
    if len(lpb) != n_blocks:
      raise ValueError(
        f'DenseFCN: layers_per_block needs {n_blocks} entries for n_pool={self.n_pool}, got {lpb}'
      )
    return lpb

  @nn.compact
  def __call__(self, x: Array, train: bool):
    dtype = layers.resolve_dtype(self.dtype)
    lpb = self.block_layers()
    growth = self.growth_rate or VARIANTS[self.variant]['growth_rate']
    h_in, w_in = x.shape[1], x.shape[2]
    x = layers.pad_to_multiple(x, 2**self.n_pool).astype(dtype)

    def bn_relu(t):
      return nn.relu(layers.batch_norm(train, dtype)(t))

    block = nn.remat(DenseBlock, static_argnums=(2,)) if self.remat else DenseBlock

    def dense_block(stack, n_layers, name):
      """Returns (stack with the new maps appended, the new maps alone)."""
      return block(n_layers, growth, self.dropout_rate, dtype, name=name)(stack, train)

    stack = _conv(self.first_filters, 3, dtype, name='conv_in')(x)
    skips = []
    for i in range(self.n_pool):
      stack, _ = dense_block(stack, lpb[i], f'down_block_{i}')
      skips.append(stack)
      t = _conv(stack.shape[-1], 1, dtype)(bn_relu(stack))
      t = layers.dropout(self, t, self.dropout_rate, train)
      stack = nn.max_pool(t, window_shape=(2, 2), strides=(2, 2))
    _, to_upsample = dense_block(stack, lpb[self.n_pool], 'bottleneck_block')

    penultimate = None
    for i in range(self.n_pool):
      keep = growth * lpb[self.n_pool + i]
      up = layers.ConvTranspose3x3S2(keep, dtype=dtype, kernel_init=layers.he_init)(to_upsample)
      stack = jnp.concatenate([up, skips[self.n_pool - 1 - i]], axis=-1)
      penultimate = stack
      stack, to_upsample = dense_block(stack, lpb[self.n_pool + i + 1], f'up_block_{i}')
    logits = _conv(self.num_classes, 1, dtype, name='classifier')(stack)
    crop = lambda t: t[:, :h_in, :w_in, :].astype(jnp.float32)
    logits = crop(logits)
    return logits, {'penultimate': crop(penultimate), 'last': crop(stack), 'logits': logits}
