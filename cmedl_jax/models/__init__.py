"""Networks of cmedl-jax (Flax linen, NHWC) and a registry built from config objects.

`cfg` is an ml_collections ConfigDict, a dict, or any attribute object; missing (or None)
architecture fields take the defaults below.

get_segmenter(cfg):  cfg.name in {"unet", "densefcn", "pspnet"}, cfg.num_classes (required),
  cfg.dtype "float32" (default) | "bfloat16" (compute; parameters stay float32),
  cfg.remat False (default) | True (recompute each block's activations in the backward pass).
  unet:     base_width=32, depth=4, up="transpose" | "resize"
  densefcn: variant=103 (56 | 67 | 103), growth_rate, layers_per_block, n_pool=5 (overrides
            for tiny nets), first_filters=48, dropout=0.2
  pspnet:   base_width=64, blocks=(2, 2, 2, 2), bottleneck=False, bins=(1, 2, 3, 6),
            aux_head=False, dropout=0.1
  Model: `apply(variables, x [N,H,W,C], train) -> (logits [N,H,W,K] f32, taps)`, taps keys
  "penultimate", "last", "logits" (+ "aux_logits" for PSPNet with aux_head); batch norm
  statistics in the `batch_stats` collection (pass mutable=["batch_stats"] when train=True).
get_translator(cfg): cfg.name in {"cyclegan", "cut"}; out_channels=1, ngf=64, n_blocks=9, dtype,
  remat.
get_discriminator(cfg): ndf=64, n_layers=3, dtype.
get_patch_sampler(cfg): num_features=256 (CUT's PatchSampleF), dtype.
"""
from __future__ import annotations

from typing import Any

from cmedl_jax.models.densefcn import DenseFCN
from cmedl_jax.models.layers import cfg_get
from cmedl_jax.models.patchgan import PatchGAN
from cmedl_jax.models.patchnce import PatchSampleMLP
from cmedl_jax.models.pspnet import PSPNet
from cmedl_jax.models.resnet_generator import ResnetBlock, ResnetGenerator
from cmedl_jax.models.unet import UNet

SEGMENTERS = ("unet", "densefcn", "pspnet")
TRANSLATORS = ("cyclegan", "cut")
TAP_NAMES = ("penultimate", "last", "logits")

__all__ = ["UNet", "DenseFCN", "PSPNet", "ResnetGenerator", "ResnetBlock", "PatchGAN",
           "PatchSampleMLP", "get_segmenter", "get_translator", "get_discriminator",
           "get_patch_sampler", "SEGMENTERS", "TRANSLATORS", "TAP_NAMES"]


def _tuple(value):
  return None if value is None else tuple(int(v) for v in value) if not isinstance(value, int) else value


def get_segmenter(cfg: Any):
  """UNet / DenseFCN / PSPNet from `cfg` (see module docstring)."""
  name = cfg_get(cfg, "name")
  num_classes = cfg_get(cfg, "num_classes")
  if num_classes is None or int(num_classes) < 1:
    raise ValueError(f"get_segmenter: cfg.num_classes must be a positive int, got {num_classes!r}")
  num_classes = int(num_classes)
  dtype = cfg_get(cfg, "dtype", "float32")
  remat = bool(cfg_get(cfg, "remat", False))
  if name == "unet":
    return UNet(num_classes, base_width=int(cfg_get(cfg, "base_width", 32)),
                depth=int(cfg_get(cfg, "depth", 4)), up=cfg_get(cfg, "up", "transpose"), dtype=dtype,
                remat=remat)
  if name == "densefcn":
    return DenseFCN(num_classes, variant=int(cfg_get(cfg, "variant", 103)),
                    growth_rate=cfg_get(cfg, "growth_rate"),
                    layers_per_block=_tuple(cfg_get(cfg, "layers_per_block")),
                    n_pool=int(cfg_get(cfg, "n_pool", 5)),
                    first_filters=int(cfg_get(cfg, "first_filters", 48)),
                    dropout_rate=float(cfg_get(cfg, "dropout", 0.2)), dtype=dtype,
                    remat=remat)
  if name == "pspnet":
    return PSPNet(num_classes, base_width=int(cfg_get(cfg, "base_width", 64)),
                  blocks=_tuple(cfg_get(cfg, "blocks", (2, 2, 2, 2))),
                  bottleneck=bool(cfg_get(cfg, "bottleneck", False)),
                  bins=_tuple(cfg_get(cfg, "bins", (1, 2, 3, 6))),
                  aux_head=bool(cfg_get(cfg, "aux_head", False)),
                  dropout_rate=float(cfg_get(cfg, "dropout", 0.1)), dtype=dtype,
                  remat=remat)
  raise ValueError(f"get_segmenter: cfg.name must be one of {SEGMENTERS}, got {name!r}")


def get_translator(cfg: Any) -> ResnetGenerator:
  """ResnetGenerator for CycleGAN or CUT (the same network; CUT reads nce_layers)."""
  name = cfg_get(cfg, "name")
  if name not in TRANSLATORS:
    raise ValueError(f"get_translator: cfg.name must be one of {TRANSLATORS}, got {name!r}")
  return ResnetGenerator(out_channels=int(cfg_get(cfg, "out_channels", 1)),
                         ngf=int(cfg_get(cfg, "ngf", 64)),
                         n_blocks=int(cfg_get(cfg, "n_blocks", 9)),
                         dtype=cfg_get(cfg, "dtype", "float32"),
                         remat=bool(cfg_get(cfg, "remat", False)))


def get_discriminator(cfg: Any) -> PatchGAN:
  """70x70 PatchGAN (LSGAN logits)."""
  return PatchGAN(ndf=int(cfg_get(cfg, "ndf", 64)), n_layers=int(cfg_get(cfg, "n_layers", 3)),
                  dtype=cfg_get(cfg, "dtype", "float32"))


def get_patch_sampler(cfg: Any = None) -> PatchSampleMLP:
  """CUT's PatchSampleF: per-layer 2-layer MLP heads, L2-normalised samples."""
  return PatchSampleMLP(num_features=int(cfg_get(cfg, "num_features", 256)),
                        dtype=cfg_get(cfg, "dtype", "float32"))
