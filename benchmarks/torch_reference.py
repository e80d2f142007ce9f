"""Eager PyTorch reference of one CMEDL joint train step (benchmark only, not a dependency).

Same architectures and parameter counts as `cmedl_jax.models` (NCHW here, NHWC there), same
losses and the same update as `cmedl_jax.train_step.train_step`:

  translator  CycleGAN (G, F; LSGAN, cycle L1 + identity L1) or CUT (G + PatchNCE MLP heads;
              LSGAN, PatchNCE on x/G(x) and t/G(t)), plus the contextual loss on 1024 random
              5x5-patch features of x and G(x);
  teacher     on [G(x), t] (one batch-norm batch), CE + soft Dice, its loss flows into G;
  student     on x, CE + soft Dice + L2 hint loss to the detached teacher taps;
  D's         LSGAN on real vs detached fakes, gradients at the pre-update parameters;
  Adam        (2e-4, betas 0.5/0.999) on every group, one step after both backward passes.

Dropout is off in both (the JAX step passes no dropout rng). No torch.compile (eager; oneDNN
convolutions on CPU, cuDNN on a GPU: CMEDLStep(device='cuda') and inputs there). Needs
`pip install torch==2.13.0` (CPU build) or any CUDA build.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------- GAN parts


class ResnetBlock(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.body = nn.Sequential(
      nn.ReflectionPad2d(1),
      nn.Conv2d(dim, dim, 3),
      nn.InstanceNorm2d(dim),
      nn.ReLU(True),
      nn.ReflectionPad2d(1),
      nn.Conv2d(dim, dim, 3),
      nn.InstanceNorm2d(dim),
    )

  def forward(self, x):
    return x + self.body(x)


class ResnetGenerator(nn.Module):
  """junyanz/pytorch-CycleGAN-and-pix2pix ResnetGenerator (instance norm, reflect, no dropout)."""

  def __init__(self, in_ch=1, out_ch=1, ngf=64, n_blocks=9):
    super().__init__()
    m = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(2):
      c = ngf * 2**i
      m += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
    m += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]
    for i in range(2):
      c = ngf * 2 ** (2 - i)
      m += [
        nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1),
        nn.InstanceNorm2d(c // 2),
        nn.ReLU(True),
      ]
    m += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
    self.model = nn.Sequential(*m)

  def forward(self, x, nce_layers=(), encode_only=False):
    if not encode_only:
      return self.model(x)
    feats, h = [], x
    for i, layer in enumerate(self.model):
      h = layer(h)
      if i in nce_layers:
        feats.append(h)
      if i == max(nce_layers):
        break
    return feats


class PatchGAN(nn.Module):
  """NLayerDiscriminator with InstanceNorm2d(affine=False) (so every conv has a bias)."""

  def __init__(self, in_ch=1, ndf=64, n_layers=3):
    super().__init__()
    m = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    prev = 1
    for n in range(1, n_layers + 1):
      mult = min(2**n, 8)
      m += [
        nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1),
        nn.InstanceNorm2d(ndf * mult),
        nn.LeakyReLU(0.2, True),
      ]
      prev = mult
    m += [nn.Conv2d(ndf * prev, 1, 4, 1, 1)]
    self.model = nn.Sequential(*m)

  def forward(self, x):
    return self.model(x)


class PatchSampleF(nn.Module):
  """CUT's PatchSampleF: per layer Linear-ReLU-Linear to `nc` features, L2-normalised."""

  def __init__(self, channels, nc=256):
    super().__init__()
    self.mlps = nn.ModuleList(
      nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)) for c in channels
    )

  def forward(self, feats, num_patches, patch_ids=None):
    out, ids_out = [], []
    for l, f in enumerate(feats):
      n, c, h, w = f.shape
      flat = f.permute(0, 2, 3, 1).reshape(n, h * w, c)
      ids = (
        patch_ids[l]
        if patch_ids is not None
        else torch.randperm(h * w, device=f.device)[: min(num_patches, h * w)]
      )
      x = self.mlps[l](flat[:, ids, :])
      out.append(x / (x.norm(dim=-1, keepdim=True) + 1e-7))
      ids_out.append(ids)
    return out, ids_out


# ---------------------------------------------------------------------------------- segmenters


class BatchNorm2d(nn.BatchNorm2d):
  """BatchNorm2d without PyTorch's "more than 1 value per channel" check: PSPNet's 1-bin
  pyramid branch at batch 1 normalises one value per channel (output = beta, as in Flax)."""

  def forward(self, x):
    return torch.batch_norm(
      x,
      self.weight,
      self.bias,
      self.running_mean,
      self.running_var,
      self.training,
      self.momentum,
      self.eps,
      False,
    )


def conv_bn_relu(cin, cout, k=3, stride=1, dilation=1):
  return nn.Sequential(
    nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, bias=False),
    BatchNorm2d(cout),
    nn.ReLU(True),
  )


class UNet(nn.Module):
  """As cmedl_jax.models.unet.UNet (up='transpose'): returns (logits, taps)."""

  def __init__(self, in_ch=1, num_classes=2, base_width=32, depth=4):
    super().__init__()
    self.enc = nn.ModuleList()
    c = in_ch
    for level in range(depth):
      w = base_width * 2**level
      self.enc.append(nn.Sequential(conv_bn_relu(c, w), conv_bn_relu(w, w)))
      c = w
    w = base_width * 2**depth
    self.bottleneck = nn.Sequential(conv_bn_relu(c, w), conv_bn_relu(w, w))
    self.up, self.dec0, self.dec1 = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    c = w
    for level in reversed(range(depth)):
      w = base_width * 2**level
      self.up.append(nn.ConvTranspose2d(c, w, 2, 2))
      self.dec0.append(conv_bn_relu(2 * w, w))
      self.dec1.append(conv_bn_relu(w, w))
      c = w
    self.classifier = nn.Conv2d(c, num_classes, 1)

  def forward(self, x):
    skips, h = [], x
    for block in self.enc:
      h = block(h)
      skips.append(h)
      h = F.max_pool2d(h, 2)
    h = self.bottleneck(h)
    for up, d0, d1, skip in zip(self.up, self.dec0, self.dec1, reversed(skips)):
      pen = d0(torch.cat([skip, up(h)], 1))
      h = d1(pen)
    logits = self.classifier(h)
    return logits, {'penultimate': pen, 'last': h, 'logits': logits}


DENSE_VARIANTS = {
  56: (12, (4,) * 11),
  67: (16, (5,) * 11),
  103: (16, (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4)),
}


class DenseFCN(nn.Module):
  """As cmedl_jax.models.densefcn.DenseFCN (dropout off): returns (logits, taps)."""

  def __init__(self, in_ch=1, num_classes=2, variant=103, n_pool=5, first_filters=48):
    super().__init__()
    growth, lpb = DENSE_VARIANTS[variant]
    self.lpb, self.n_pool = lpb, n_pool
    self.conv_in = nn.Conv2d(in_ch, first_filters, 3, padding=1)
    self.blocks, self.tdown, self.tup = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    c, skip_c = first_filters, []

    def block(c, n):
      layers = nn.ModuleList()
      for i in range(n):
        layers.append(
          nn.Sequential(
            nn.BatchNorm2d(c + i * growth),
            nn.ReLU(True),
            nn.Conv2d(c + i * growth, growth, 3, padding=1),
          )
        )
      return layers

    for i in range(n_pool):
      self.blocks.append(block(c, lpb[i]))
      c += growth * lpb[i]
      skip_c.append(c)
      self.tdown.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(True), nn.Conv2d(c, c, 1)))
    self.blocks.append(block(c, lpb[n_pool]))
    new = growth * lpb[n_pool]
    for i in range(n_pool):
      keep = growth * lpb[n_pool + i]
      self.tup.append(nn.ConvTranspose2d(new, keep, 3, 2, 1, output_padding=1))
      c = keep + skip_c[n_pool - 1 - i]
      self.blocks.append(block(c, lpb[n_pool + i + 1]))
      new = growth * lpb[n_pool + i + 1]
      c += new
    self.classifier = nn.Conv2d(c, num_classes, 1)

  @staticmethod
  def _dense(layers, stack):
    new = []
    for layer in layers:
      t = layer(stack)
      new.append(t)
      stack = torch.cat([stack, t], 1)
    return stack, torch.cat(new, 1)

  def forward(self, x):
    stack = self.conv_in(x)
    skips = []
    for i in range(self.n_pool):
      stack, _ = self._dense(self.blocks[i], stack)
      skips.append(stack)
      stack = F.max_pool2d(self.tdown[i](stack), 2)
    _, to_up = self._dense(self.blocks[self.n_pool], stack)
    for i in range(self.n_pool):
      stack = torch.cat([self.tup[i](to_up), skips[self.n_pool - 1 - i]], 1)
      pen = stack
      stack, to_up = self._dense(self.blocks[self.n_pool + 1 + i], stack)
    logits = self.classifier(stack)
    return logits, {'penultimate': pen, 'last': stack, 'logits': logits}


class ResidualBlock(nn.Module):
  def __init__(self, cin, width, stride, dilation):
    super().__init__()
    self.body = nn.Sequential(
      conv_bn_relu(cin, width, 3, stride, dilation),
      nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False),
      nn.BatchNorm2d(width),
    )
    self.short = None
    if stride != 1 or cin != width:
      self.short = nn.Sequential(
        nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
      )

  def forward(self, x):
    s = x if self.short is None else self.short(x)
    return F.relu(s + self.body(x))


class PSPNet(nn.Module):
  """As cmedl_jax.models.pspnet.PSPNet defaults (dilated ResNet-18, basic blocks, no aux)."""

  def __init__(self, in_ch=1, num_classes=2, base_width=64, blocks=(2, 2, 2, 2), bins=(1, 2, 3, 6)):
    super().__init__()
    b = base_width
    self.stem = nn.Sequential(conv_bn_relu(in_ch, b, 3, 2), conv_bn_relu(b, b), conv_bn_relu(b, b))
    stages, c = [], b
    for s, (n, stride, dil) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
      for k in range(n):
        stages.append(ResidualBlock(c, b * 2**s, stride if k == 0 else 1, dil))
        c = b * 2**s
    self.stages = nn.Sequential(*stages)
    self.bins = bins
    self.ppm = nn.ModuleList(conv_bn_relu(c, c // len(bins), 1) for _ in bins)
    self.head = conv_bn_relu(c + (c // len(bins)) * len(bins), c // 2)
    self.classifier = nn.Conv2d(c // 2, num_classes, 1)

  def forward(self, x):
    size = x.shape[-2:]
    h = F.max_pool2d(self.stem(x), 3, 2, 1)
    h = self.stages(h)
    fs = h.shape[-2:]
    pen = torch.cat(
      [h]
      + [
        F.interpolate(m(F.adaptive_avg_pool2d(h, b)), fs, mode='bilinear', align_corners=False)
        for m, b in zip(self.ppm, self.bins)
      ],
      1,
    )
    last = self.head(pen)
    logits = F.interpolate(self.classifier(last), size, mode='bilinear', align_corners=False)
    return logits, {'penultimate': pen, 'last': last, 'logits': logits}


SEGMENTERS = {'unet': UNet, 'densefcn': DenseFCN, 'pspnet': PSPNet}


# --------------------------------------------------------------------------------------- losses


def lsgan_g(d):
  return ((d - 1) ** 2).mean()


def lsgan_d(real, fake):
  return 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())


def patch_nce(q, k, tau=0.07):
  k = k.detach()
  p = q.shape[1]
  l_pos = (q * k).sum(-1, keepdim=True)
  l_neg = torch.bmm(q, k.transpose(1, 2))
  l_neg = l_neg.masked_fill(torch.eye(p, dtype=torch.bool, device=q.device)[None], -10.0)
  logits = torch.cat([l_pos, l_neg], -1) / tau
  target = torch.zeros(logits.shape[0] * p, dtype=torch.long, device=q.device)
  return F.cross_entropy(logits.flatten(0, 1), target)


def patch_features(x, patch=5, stride=2):
  return F.unfold(x, patch, stride=stride).transpose(1, 2)  # [N, L, C*p*p]


def contextual_loss(x, y, patch=5, max_points=1024, band_width=0.5, eps=1e-5):
  fx, fy = patch_features(x, patch), patch_features(y, patch)
  if fx.shape[1] > max_points:
    idx = torch.randperm(fx.shape[1], device=fx.device)[:max_points]
    fx, fy = fx[:, idx], fy[:, idx]
  mu = fy.mean((0, 1), keepdim=True)
  xn, yn = F.normalize(fx - mu, dim=-1, eps=1e-12), F.normalize(fy - mu, dim=-1, eps=1e-12)
  dist = (1 - torch.bmm(xn, yn.transpose(1, 2))).clamp_min(0)
  rel = dist / (dist.min(-1, keepdim=True).values + eps)
  cx = torch.softmax((1 - rel) / band_width, -1).max(1).values.mean(-1)
  return (-torch.log(cx + eps)).mean()


def seg_loss(logits, labels, k, mask=None, smooth=1.0):
  n = logits.shape[0]
  w = torch.ones(n, device=logits.device) if mask is None else mask
  wp = w.view(n, 1, 1).expand_as(labels).float()
  ce_pix = F.cross_entropy(logits, labels, reduction='none')
  ce = (ce_pix * wp).sum() / wp.sum().clamp_min(1e-12)
  probs = torch.softmax(logits, 1) * wp[:, None]
  onehot = F.one_hot(labels, k).permute(0, 3, 1, 2).float() * wp[:, None]
  inter = (probs * onehot).sum((0, 2, 3))
  den = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
  dice = 1 - ((2 * inter + smooth) / (den + smooth))[1:].mean()
  return ce + dice


# ------------------------------------------------------------------------------------ the step


class CMEDLStep:
  """Builds the networks of one segmenter x translator pairing and runs eager train steps."""

  def __init__(
    self,
    segmenter='unet',
    translator='cyclegan',
    seg_kwargs=None,
    ngf=64,
    n_blocks=9,
    ndf=64,
    n_layers=3,
    num_classes=2,
    nce_layers=(0, 4, 8, 12, 16),
    num_patches=256,
    nce_features=256,
    contextual_points=1024,
    contextual_patch=5,
    taps=('penultimate', 'last'),
    device='cpu',
  ):
    self.k, self.translator, self.taps = num_classes, translator, taps
    self.nce_layers, self.num_patches = tuple(nce_layers), num_patches
    self.ctx_points, self.ctx_patch = contextual_points, contextual_patch
    seg = SEGMENTERS[segmenter]
    kw = dict(seg_kwargs or {}, num_classes=num_classes)
    self.nets = nn.ModuleDict(
      dict(
        student=seg(**kw),
        teacher=seg(**kw),
        translator=ResnetGenerator(ngf=ngf, n_blocks=n_blocks),
        disc_target=PatchGAN(ndf=ndf, n_layers=n_layers),
      )
    )
    if translator == 'cyclegan':
      self.nets['translator_inv'] = ResnetGenerator(ngf=ngf, n_blocks=n_blocks)
      self.nets['disc_source'] = PatchGAN(ndf=ndf, n_layers=n_layers)
    else:
      with torch.no_grad():
        chans = [
          f.shape[1]
          for f in self.nets['translator'](
            torch.zeros(1, 1, 32, 32), self.nce_layers, encode_only=True
          )
        ]
      self.nets['nce_head'] = PatchSampleF(chans, nce_features)
    self.nets.to(device)
    self.disc_names = [n for n in ('disc_target', 'disc_source') if n in self.nets]
    self.opt = torch.optim.Adam(self.nets.parameters(), lr=2e-4, betas=(0.5, 0.999))

  def param_counts(self):
    return {name: count_params(net) for name, net in self.nets.items()}

  def _set_disc_grad(self, flag):
    for name in self.disc_names:
      self.nets[name].requires_grad_(flag)

  def _nce(self, src, fake):
    g, head = self.nets['translator'], self.nets['nce_head']
    fk = g(src, self.nce_layers, encode_only=True)
    fq = g(fake, self.nce_layers, encode_only=True)
    k, ids = head(fk, self.num_patches)
    q, _ = head(fq, self.num_patches, ids)
    return sum(patch_nce(a, b) for a, b in zip(q, k)) / len(q)

  def step(self, x, y, t, ty, t_has_label):
    """x, t: [N, 1, H, W] in [-1, 1]; y, ty: [N, H, W] int64; t_has_label: [N] float."""
    nets = self.nets
    G, Dt = nets['translator'], nets['disc_target']
    self.opt.zero_grad(set_to_none=True)
    self._set_disc_grad(False)
    fake_t = G(x)
    loss = lsgan_g(Dt(fake_t)) + contextual_loss(fake_t, x, self.ctx_patch, self.ctx_points)
    if self.translator == 'cyclegan':
      Fn, Ds = nets['translator_inv'], nets['disc_source']
      fake_s = Fn(t)
      loss = loss + lsgan_g(Ds(fake_s))
      loss = loss + 10.0 * ((Fn(fake_t) - x).abs().mean() + (G(fake_s) - t).abs().mean())
      loss = loss + 5.0 * ((G(t) - t).abs().mean() + (Fn(x) - x).abs().mean())
    else:
      loss = loss + self._nce(x, fake_t) + self._nce(t, G(t))
    n = x.shape[0]
    t_logits, t_feats = nets['teacher'](torch.cat([fake_t, t], 0))
    loss = loss + seg_loss(
      t_logits,
      torch.cat([y, ty], 0),
      self.k,
      torch.cat([torch.ones(n, device=x.device), t_has_label], 0),
    )
    s_logits, s_feats = nets['student'](x)
    loss = loss + seg_loss(s_logits, y, self.k)
    loss = loss + sum(
      ((s_feats[tap] - t_feats[tap][:n].detach()) ** 2).mean() for tap in self.taps
    ) / len(self.taps)
    loss.backward()
    self._set_disc_grad(True)
    d_loss = lsgan_d(Dt(t), Dt(fake_t.detach()))
    if self.translator == 'cyclegan':
      d_loss = d_loss + lsgan_d(nets['disc_source'](x), nets['disc_source'](fake_s.detach()))
    d_loss.backward()
    self.opt.step()
    return float(loss.detach()), float(d_loss.detach())


def make_batch(n, size, seed):
  """Images in [-1, 1] with bright discs labelled 1 (as tests/test_train_step.py), NCHW."""
  g = torch.Generator().manual_seed(seed)
  yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
  c = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
  r = torch.rand(n, generator=g) * size * 0.15 + size * 0.1
  disc = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2 < r[
    :, None, None
  ] ** 2
  img = torch.where(disc, 0.6, -0.4) + 0.1 * torch.randn(n, size, size, generator=g)
  return img[:, None].float().clamp(-1, 1), disc.long()
