"""CUT's `PatchSampleF` (Park et al. 2020): sample spatial positions of encoder activations
and project them with one 2-layer MLP per layer (Linear-ReLU-Linear, 256 features), then
L2-normalise (x / (||x|| + 1e-7)). Weights N(0, 0.02), biases 0, as CUT's `init_net`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers

Array = jax.Array


class PatchSampleMLP(nn.Module):
  """`__call__(feats, num_patches, patch_ids=None, rng=None) -> (samples, patch_ids)`.

  feats: list of [N, H_l, W_l, C_l]. For each layer l, P_l = min(num_patches, H_l*W_l)
  positions are drawn without replacement (one set shared by the batch, as CUT does) from
  `rng`, unless `patch_ids[l]` (int32 [P_l], flat indices h*W_l + w) is given: pass the ids
  returned by the first call (query features) to the second (key features).
  Returns samples: list of [N, P_l, num_features] float32, unit L2 norm, and the ids.
  `num_patches <= 0` uses every position (P_l = H_l*W_l, ids are arange).
  """

  num_features: int = 256
  use_mlp: bool = True
  dtype: Any = 'float32'

  @nn.compact
  def __call__(
    self,
    feats: Sequence[Array],
    num_patches: int = 256,
    patch_ids: Sequence[Array] | None = None,
    rng: jax.Array | None = None,
  ):
    dtype = layers.resolve_dtype(self.dtype)
    if patch_ids is not None and len(patch_ids) != len(feats):
      raise ValueError(f'PatchSampleMLP: {len(patch_ids)} patch_ids for {len(feats)} feature maps')
    if patch_ids is None and num_patches > 0 and rng is None:
      raise ValueError('PatchSampleMLP: pass rng (or patch_ids) to sample patches')
    keys = jax.random.split(rng, len(feats)) if (patch_ids is None and num_patches > 0) else None
    samples, ids_out = [], []
    for l, feat in enumerate(feats):
      n, h, w, c = feat.shape
      flat = feat.reshape(n, h * w, c)
      if num_patches <= 0:
        ids = jnp.arange(h * w, dtype=jnp.int32)
      elif patch_ids is not None:
        ids = jnp.asarray(patch_ids[l], jnp.int32)
      else:
        ids = jax.random.permutation(keys[l], h * w)[: min(num_patches, h * w)].astype(jnp.int32)
      x = jnp.take(flat, ids, axis=1)  # [N, P, C]
      if self.use_mlp:
        dense = lambda f, name: nn.Dense(
          f,
          dtype=dtype,
          param_dtype=jnp.float32,
          kernel_init=layers.gan_init,
          bias_init=layers.zeros_init,
          name=name,
        )
        x = dense(self.num_features, f'mlp_{l}_0')(x)
        x = dense(self.num_features, f'mlp_{l}_1')(nn.relu(x))
      x = x.astype(jnp.float32)
      # CUT: x / (||x|| + 1e-7); written so the gradient stays finite at x = 0 (a dead MLP
      # output), where d||x||/dx is NaN.
      x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-14))
      samples.append(x)
      ids_out.append(ids)
    return samples, ids_out
