"""1x1-conv adapters that map student feature widths to teacher widths for the hint loss."""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmedl_jax.models import layers


class HintAdapters(nn.Module):
  """Per-tap 1x1 convolution from the student's width to the teacher's.

  Attributes:
    out_channels: tap name -> teacher width C_t.
    dtype: computation dtype (None: inferred from inputs and float32 params).

  `__call__(student_feats)` takes tap name -> [N, h, w, C_s] and returns a new dict
  with the same keys. A tap whose C_s differs from `out_channels[tap]` goes through its
  own 1x1 conv with bias (parameters float32, module name `adapter_<tap>`); a tap with
  equal width (unless `always`), or not listed in `out_channels`, is passed through unchanged
  and has no parameters.
  """

  out_channels: Mapping[str, int]
  dtype: Optional[jnp.dtype] = None
  always: bool = False  # Also a 1x1 conv where the widths are equal (FitNets' regressor).

  @nn.compact
  def __call__(self, student_feats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    adapted = {}
    for tap, feat in student_feats.items():
      width = self.out_channels.get(tap)
      if width is None or (feat.shape[-1] == width and not self.always):
        adapted[tap] = feat
        continue
      adapted[tap] = nn.Conv(
        features=int(width),
        kernel_size=(1, 1),
        use_bias=True,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f'adapter_{tap}',
        conv_general_dilated=layers.conv_general_dilated,
      )(feat)
    return adapted
