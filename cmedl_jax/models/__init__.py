"""Networks of cmedl-jax (Flax linen, NHWC) and a registry built from config objects.

A network's defaults are its module's field defaults, written once, in its class (UNet,
DenseFCN, PSPNet, ResnetGenerator, PatchGAN, PatchSampleMLP). The registry maps a name to a
module and sets each field that `cfg` gives: `cfg` is an ml_collections ConfigDict, a dict, or
any attribute object; a missing (or None) field keeps the module's default. Config keys are the
field names, except `dropout` for `dropout_rate`. Every network takes dtype "float32" |
"bfloat16" (compute; parameters stay float32); those with blocks take remat (recompute each
block's activations in the backward pass).

get_segmenter(cfg):  cfg.name in SEGMENTERS, cfg.num_classes (required).
  unet:     UNet (base_width, depth, up "transpose" | "resize")
  densefcn: DenseFCN (variant 56 | 67 | 103, or growth_rate, layers_per_block, n_pool for tiny
            nets; first_filters, dropout)
  pspnet:   PSPNet (base_width, blocks, bottleneck, bins, aux_head, dropout)
  Model: `apply(variables, x [N,H,W,C], train) -> (logits [N,H,W,K] f32, taps)`, taps keys
  "penultimate", "last", "logits" (+ "aux_logits" for PSPNet with aux_head); batch norm
  statistics in the `batch_stats` collection (pass mutable=["batch_stats"] when train=True).
get_translator(cfg): cfg.name in TRANSLATORS (both a ResnetGenerator: out_channels, ngf, n_blocks).
get_discriminator(cfg): PatchGAN (ndf, n_layers).
get_patch_sampler(cfg): PatchSampleMLP, CUT's PatchSampleF (num_features).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cmedl_jax.models.densefcn import DenseFCN
from cmedl_jax.models.layers import cfg_get
from cmedl_jax.models.patchgan import PatchGAN
from cmedl_jax.models.patchnce import PatchSampleMLP
from cmedl_jax.models.pspnet import PSPNet
from cmedl_jax.models.resnet_generator import ResnetBlock, ResnetGenerator
from cmedl_jax.models.unet import UNet

_SEGMENTERS = {'unet': UNet, 'densefcn': DenseFCN, 'pspnet': PSPNet}
SEGMENTERS = tuple(_SEGMENTERS)
TRANSLATORS = ('cyclegan', 'cut')  # The same network; CUT reads its nce_layers.
TAP_NAMES = ('penultimate', 'last', 'logits')
# Config key of a module field, where the two differ.
_CONFIG_KEYS = {'dropout_rate': 'dropout'}

__all__ = [
  'UNet',
  'DenseFCN',
  'PSPNet',
  'ResnetGenerator',
  'ResnetBlock',
  'PatchGAN',
  'PatchSampleMLP',
  'get_segmenter',
  'get_translator',
  'get_discriminator',
  'get_patch_sampler',
  'SEGMENTERS',
  'TRANSLATORS',
  'TAP_NAMES',
]


def _from_cfg(module, cfg, **given):
  """`module(**given)` with each other field that `cfg` sets; the rest keep their defaults.

  Values take the type of the field's default (int, float, bool); sequences become tuples of
  ints (hashable module attributes, also from lists read back from JSON).
  """
  kwargs = dict(given)
  for field in dataclasses.fields(module):
    if field.name in ('parent', 'name') or field.name in given:
      continue
    value = cfg_get(cfg, _CONFIG_KEYS.get(field.name, field.name))
    if value is None:
      continue
    if isinstance(value, (list, tuple)):
      value = tuple(int(v) for v in value)
    elif isinstance(field.default, (bool, int, float)):
      value = type(field.default)(value)
    kwargs[field.name] = value
  return module(**kwargs)


def get_segmenter(cfg: Any):
  """UNet / DenseFCN / PSPNet from `cfg` (see module docstring)."""
  name = cfg_get(cfg, 'name')
  num_classes = cfg_get(cfg, 'num_classes')
  if num_classes is None or int(num_classes) < 1:
    raise ValueError(f'get_segmenter: cfg.num_classes must be a positive int, got {num_classes!r}')
  if name not in _SEGMENTERS:
    raise ValueError(f'get_segmenter: cfg.name must be one of {SEGMENTERS}, got {name!r}')
  return _from_cfg(_SEGMENTERS[name], cfg, num_classes=int(num_classes))


def get_translator(cfg: Any) -> ResnetGenerator:
  """ResnetGenerator for CycleGAN or CUT (the same network; CUT reads nce_layers)."""
  name = cfg_get(cfg, 'name')
  if name not in TRANSLATORS:
    raise ValueError(f'get_translator: cfg.name must be one of {TRANSLATORS}, got {name!r}')
  return _from_cfg(ResnetGenerator, cfg)


def get_discriminator(cfg: Any) -> PatchGAN:
  """70x70 PatchGAN (LSGAN logits)."""
  return _from_cfg(PatchGAN, cfg)


def get_patch_sampler(cfg: Any = None) -> PatchSampleMLP:
  """CUT's PatchSampleF: per-layer 2-layer MLP heads, L2-normalised samples."""
  return _from_cfg(PatchSampleMLP, cfg)
