"""Loss functions of CMEDL: adversarial, cycle/identity, PatchNCE, contextual,
segmentation (CE + soft Dice), hint (feature distillation) and KL distillation.

All functions are pure `jax.numpy`, jit-able, and cast their inputs to float32
before reducing, so bfloat16 activations are accumulated in float32. None of them
applies `jax.lax.stop_gradient` unless its docstring says so (only `patch_nce_loss`
does, on the keys, as CUT does); the train step decides what is detached.

Similarity matrix products use `Precision.HIGHEST` so that results do not depend on
the accelerator's default matmul precision (TF32 on recent GPUs, bfloat16 passes on
TPU), which matters for the contextual loss where distances near 0 are divided.

Array layout is NHWC throughout (channels last).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, in float32; finite value and gradient at x = 0."""
  x = _f32(x)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


# ---------------------------------------------------------------------------
# Adversarial (least-squares GAN) and L1.
# ---------------------------------------------------------------------------


def lsgan_generator_loss(d_fake: jax.Array) -> jax.Array:
  """mean((D(G(x)) - 1)^2); d_fake: discriminator outputs of any shape (PatchGAN map)."""
  return jnp.mean(jnp.square(_f32(d_fake) - 1.0))


def lsgan_discriminator_loss(d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
  """0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2)), CycleGAN's 0.5 factor."""
  return 0.5 * (jnp.mean(jnp.square(_f32(d_real) - 1.0)) + jnp.mean(jnp.square(_f32(d_fake))))


def l1_loss(a: jax.Array, b: jax.Array) -> jax.Array:
  """mean |a - b| over all elements (cycle and identity losses)."""
  return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


# ---------------------------------------------------------------------------
# PatchNCE (CUT, Park et al. 2020).
# ---------------------------------------------------------------------------


def patch_nce_loss(
  feat_q: jax.Array,
  feat_k: jax.Array,
  temperature: float = 0.07,
  *,
  stop_gradient_keys: bool = True,
) -> jax.Array:
  """PatchNCE loss of CUT (`nce_includes_all_negatives_from_minibatch=False`).

  Args:
    feat_q: [N, P, C] L2-normalised query features of P sampled patches of the
      translated image (from the generator's encoder + MLP head).
    feat_k: [N, P, C] L2-normalised key features at the same P locations of the
      source image.
    temperature: tau.
    stop_gradient_keys: CUT detaches the keys (`feat_k.detach()`); default True.

  For query p of image n the positive is key p of image n; the negatives are all P
  keys of the same image with the diagonal (the positive) filled with -10, exactly as
  CUT's PatchNCELoss: logits = [q.k_p, q.k_1..P (diag = -10)] / tau, cross-entropy
  with target 0, averaged over the N*P queries. Returns a float32 scalar.
  """
  if feat_q.ndim != 3 or feat_q.shape != feat_k.shape:
    raise ValueError(
      f'patch_nce_loss: feat_q and feat_k must both be [N, P, C] with equal shapes; '
      f'got {feat_q.shape} and {feat_k.shape}'
    )
  q = _f32(feat_q)
  k = _f32(feat_k)
  if stop_gradient_keys:
    k = jax.lax.stop_gradient(k)
  num_patches = q.shape[1]
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)  # [N, P, 1]
  l_neg = jnp.einsum('npc,nmc->npm', q, k, precision=_HIGHEST)  # [N, P, P]
  diagonal = jnp.eye(num_patches, dtype=bool)[None]
  l_neg = jnp.where(diagonal, -10.0, l_neg)
  logits = jnp.concatenate([l_pos, l_neg], axis=-1) / temperature  # [N, P, P+1]
  # Cross-entropy with the positive (index 0) as the label: logsumexp minus its logit.
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])


# ---------------------------------------------------------------------------
# Contextual loss (Mechrez, Talmi & Zelnik-Manor, ECCV 2018).
# ---------------------------------------------------------------------------


def patch_features(x: jax.Array, patch_size: int = 5, stride: int = 2) -> jax.Array:
  """Raw image patches as features, the default for the contextual loss.

  Args:
    x: [N, H, W, C] images.
    patch_size: side of the square patch, pixels.
    stride: step between patch origins, pixels ('VALID' padding, no patch crosses
      the border).

  Returns:
    [N, L, patch_size * patch_size * C] float32, L = Lh * Lw patch locations in
    row-major order, Lh = (H - patch_size) // stride + 1. Within a feature vector the
    order is (channel, row, column), channel slowest, as produced by
    `jax.lax.conv_general_dilated_patches`.
  """
  if x.ndim != 4:
    raise ValueError(f'patch_features: expected [N, H, W, C] images, got shape {x.shape}')
  n, h, w, _ = x.shape
  if h < patch_size or w < patch_size:
    raise ValueError(f'patch_features: image {h}x{w} is smaller than patch_size={patch_size}')
  patches = jax.lax.conv_general_dilated_patches(
    _f32(x),
    filter_shape=(patch_size, patch_size),
    window_strides=(stride, stride),
    padding='VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision=_HIGHEST,
  )
  return patches.reshape(n, -1, patches.shape[-1])


# Fixed random convolutional features: (out channels, stride) of each 3x3 'VALID' layer.
RANDOM_CONV_LAYERS = ((16, 1), (32, 2), (64, 1))
RANDOM_CONV_SEED = 20180917  # Fixed: the network is the same in every run, whatever its seed.
CONTEXTUAL_FEATURE_KINDS = ('patches', 'random_conv')


@functools.lru_cache(maxsize=None)
def random_conv_weights(in_channels: int) -> tuple:
  """He-normal 3x3 kernels [3, 3, C_in, C_out] (numpy float32) of `random_conv_features`.

  Drawn with numpy from `RANDOM_CONV_SEED` and the layer index, so they depend on neither
  the run's seed nor jax's PRNG; layers after the first are the same for any `in_channels`.
  Each first-layer kernel has its mean (over 3 x 3 x C_in) removed: the network does not
  see the local mean intensity, only its variations (edges, blobs, texture).
  """
  kernels, c_in = [], in_channels
  for layer, (c_out, _) in enumerate(RANDOM_CONV_LAYERS):
    rng = np.random.default_rng([RANDOM_CONV_SEED, layer])
    std = np.sqrt(2.0 / (9 * c_in))  # He-normal, fan-in = 3 * 3 * c_in.
    kernel = rng.standard_normal((3, 3, c_in, c_out)) * std
    if layer == 0:
      kernel = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    kernel = kernel.astype(np.float32)
    kernel.setflags(write=False)  # Cached: shared by every caller.
    kernels.append(kernel)
    c_in = c_out
  return tuple(kernels)


def random_conv_features(x: jax.Array) -> jax.Array:
  """Features of a fixed, untrained random CNN, for the contextual loss.

  Three 3x3 convolutions (16, 32, 64 channels; strides 1, 2, 1; 'VALID' padding, no
  bias) with ReLU after each, He-normal weights from `random_conv_weights` (a fixed
  seed; zero-mean first-layer kernels): a fixed, differentiable function of the image
  with a 9x9 receptive field, nothing to download, no parameters in the train state.
  Unlike raw intensity patches its features ignore the local mean intensity (adding a
  constant to the image leaves them unchanged) and describe local structure.

  Args:
    x: [N, H, W, C] images, intensities in [-1, 1]; H, W >= 9.

  Returns:
    [N, h, w, 64] float32, h = (H - 5) // 2 - 1 (96 -> 44), the [N, h, w, C] form
    `contextual_loss` accepts from a `feature_fn`.
  """
  if x.ndim != 4:
    raise ValueError(f'random_conv_features: expected [N, H, W, C] images, got shape {x.shape}')
  if min(x.shape[1:3]) < 9:
    raise ValueError(f'random_conv_features: image {x.shape[1:3]} is smaller than 9x9')
  h = _f32(x)
  for kernel, (_, stride) in zip(random_conv_weights(x.shape[-1]), RANDOM_CONV_LAYERS):
    h = jax.lax.conv_general_dilated(
      h,
      jnp.asarray(kernel),
      window_strides=(stride, stride),
      padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=_HIGHEST,
    )
    h = jax.nn.relu(h)
  return h


def contextual_feature_fn(kind: str, patch_size: int = 5) -> Callable[[jax.Array], jax.Array]:
  """The contextual loss's `feature_fn` for config field `method.contextual_features`.

  'patches': raw patch_size x patch_size intensity patches (`patch_features`, stride 2).
  'random_conv': `random_conv_features` (patch_size is not used).
  """
  if kind == 'patches':
    return functools.partial(patch_features, patch_size=patch_size)
  if kind == 'random_conv':
    return random_conv_features
  raise ValueError(
    f'method.contextual_features must be one of {CONTEXTUAL_FEATURE_KINDS}, got {kind!r}'
  )


def _as_point_set(f: jax.Array, name: str) -> jax.Array:
  if f.ndim == 4:  # [N, h, w, C] feature map
    return f.reshape(f.shape[0], -1, f.shape[-1])
  if f.ndim == 3:  # [N, L, C]
    return f
  raise ValueError(
    f'contextual_loss: feature_fn({name}) must return [N, L, C] or [N, h, w, C]; '
    f'got shape {f.shape}'
  )


def subsample_indices(num_points: int, max_points: Optional[int], rng: Optional[jax.Array] = None):
  """Indices of at most `max_points` of `num_points` feature locations.

  Without `rng`: evenly spaced (deterministic, static numpy array). With `rng`: a
  uniform random subset without replacement (deterministic given `rng`). Returns None
  when no subsampling is needed.
  """
  if max_points is None or num_points <= max_points:
    return None
  if rng is None:
    return np.round(np.linspace(0, num_points - 1, max_points)).astype(np.int32)
  return jax.random.choice(rng, num_points, (max_points,), replace=False)


def contextual_loss(
  x: jax.Array,
  y: jax.Array,
  feature_fn: Callable[[jax.Array], jax.Array] = patch_features,
  band_width: float = 0.5,
  max_points: Optional[int] = 1024,
  rng: Optional[jax.Array] = None,
  eps: float = 1e-5,
) -> jax.Array:
  """Contextual loss -log CX(X, Y) between images x and y (e.g. a translation and its source).

  Follows the reference formulation (Mechrez et al. 2018, Eq. 1-5, and its widely used
  PyTorch port): with x_i = features of x, y_j = features of y,
    * centre both by the mean of y's features over batch and locations, L2-normalise;
    * d_ij = 1 - cos(x_i, y_j) (clipped at >= 0 against rounding);
    * d~_ij = d_ij / (min_k d_ik + eps);
    * w_ij = exp((1 - d~_ij) / band_width), CX_ij = w_ij / sum_k w_ik (a softmax over j);
    * CX = mean over j of max over i of CX_ij (for each y feature, its best x match);
    * loss = mean over the batch of -log(CX + eps).
  The loss is ~0 (= -log(1 + eps)) when x == y and all sampled features are distinct,
  and grows as x's features stop matching y's.

  Args:
    x, y: [N, H, W, C] images (same shape).
    feature_fn: maps an image batch to [N, L, C] or [N, h, w, C] features; default
      `patch_features` (5x5 patches, stride 2), since no pretrained VGG is available.
    band_width: h in w_ij.
    max_points: to bound memory (the similarity matrix is N x L x L), at most this
      many feature locations are used: evenly spaced ones when `rng` is None, else a
      random subset drawn from `rng`. The same locations are used for x and y. None
      uses all L locations (a 256x256 image has L = 126^2 patches: 1 GB per image).
    rng: optional PRNG key for random location sampling.
    eps: the 1e-5 of the reference, in d~ and in the log.

  Returns:
    float32 scalar.
  """
  if x.shape != y.shape:
    raise ValueError(f'contextual_loss: x and y must have the same shape; got {x.shape}, {y.shape}')
  fx = _as_point_set(_f32(feature_fn(x)), 'x')
  fy = _as_point_set(_f32(feature_fn(y)), 'y')
  if fx.shape != fy.shape:
    raise ValueError(f'contextual_loss: feature shapes differ: {fx.shape} vs {fy.shape}')
  idx = subsample_indices(fx.shape[1], max_points, rng)
  if idx is not None:
    fx = jnp.take(fx, idx, axis=1)
    fy = jnp.take(fy, idx, axis=1)
  mu = jnp.mean(fy, axis=(0, 1), keepdims=True)
  xn = l2_normalize(fx - mu)
  yn = l2_normalize(fy - mu)
  cos = jnp.einsum('nic,njc->nij', xn, yn, precision=_HIGHEST)  # [N, Lx, Ly]
  dist = jnp.maximum(1.0 - cos, 0.0)
  dist_rel = dist / (jnp.min(dist, axis=-1, keepdims=True) + eps)
  cx_ij = jax.nn.softmax((1.0 - dist_rel) / band_width, axis=-1)
  cx = jnp.mean(jnp.max(cx_ij, axis=1), axis=-1)  # [N]
  return jnp.mean(-jnp.log(cx + eps))


# ---------------------------------------------------------------------------
# Segmentation: cross-entropy + soft Dice.
# ---------------------------------------------------------------------------


def _check_segmentation_inputs(logits, labels, num_classes, include_background):
  if logits.shape[-1] != num_classes:
    raise ValueError(
      f'segmentation_loss: logits have {logits.shape[-1]} classes, num_classes={num_classes}'
    )
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
      f'segmentation_loss: labels shape {labels.shape} != logits shape without classes '
      f'{logits.shape[:-1]}'
    )
  if num_classes - (0 if include_background else 1) < 1:
    raise ValueError(
      f'segmentation_loss: no class enters the Dice (num_classes={num_classes}, '
      f'include_background={include_background})'
    )


def _pixel_weights(mask, labels):
  """Per-pixel weights [N,H,W] float32 of per-example weights `mask` [N] (None: ones)."""
  n = labels.shape[0]
  if mask is None:
    weights = jnp.ones((n,), jnp.float32)
  else:
    if mask.shape != (n,):
      raise ValueError(f'segmentation_loss: mask must have shape ({n},), got {mask.shape}')
    weights = _f32(mask)
  return jnp.broadcast_to(weights.reshape((n,) + (1,) * (labels.ndim - 1)), labels.shape)


def segmentation_loss(
  logits: jax.Array,
  labels: jax.Array,
  num_classes: int,
  ce_weight: float = 1.0,
  dice_weight: float = 1.0,
  mask: Optional[jax.Array] = None,
  *,
  include_background: bool = False,
  smooth: float = 1.0,
):
  """Softmax cross-entropy + soft Dice loss, multi-class.

  Args:
    logits: [N, H, W, K] (any spatial rank: [N, ..., K]).
    labels: int [N, H, W], values in [0, K); 0 is background. Out-of-range labels are
      not checked inside jit (they give a zero one-hot row).
    num_classes: K.
    ce_weight, dice_weight: weights of the two terms in `total`.
    mask: optional [N] per-example weights (e.g. 0 for unlabelled images); None = 1.
    include_background: whether class 0 enters the Dice mean (default False: the mean
      is over foreground classes 1..K-1, as nnU-Net's `do_bg=False`).
    smooth: added to numerator and denominator of each class's Dice. With 1.0, a
      class absent from the batch scores 1/(sum p + 1), so false positives of absent
      classes are still penalised with a usable gradient; relative to the pixel
      counts of a batch of 256x256 slices it is negligible.

  Cross-entropy is the (mask-weighted) mean over pixels. Dice is *batch Dice*: for
  each class, sums of p*g, p and g run over all pixels of all (weighted) examples of
  the batch, then dice_c = (2 sum pg + smooth) / (sum p + sum g + smooth) and
  dice loss = 1 - mean_c dice_c. Batch Dice is stable when a slice has no tumour.
  With all weights 0 both terms are 0.

  Returns:
    (total, {"ce": ce, "dice": dice_loss}), float32 scalars.
  """
  _check_segmentation_inputs(logits, labels, num_classes, include_background)
  first = 0 if include_background else 1
  logits = _f32(logits)
  labels = jnp.asarray(labels, jnp.int32)
  w_pix = _pixel_weights(mask, labels)

  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [N, H, W, K]
  # CE = logsumexp - label logit, picked by the one-hot mask, not optax's gather: its gradient's
  # scatter-add took XLA:CPU seconds of constant folding (an E-level slow_operation_alarm).
  ce_pix = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(onehot * logits, axis=-1)
  w_sum = jnp.sum(w_pix)
  ce = jnp.sum(ce_pix * w_pix) / jnp.where(w_sum > 0, w_sum, 1.0)

  probs = jax.nn.softmax(logits, axis=-1) * w_pix[..., None]
  onehot = onehot * w_pix[..., None]
  reduce_axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=reduce_axes)  # [K]
  denominator = jnp.sum(probs, axis=reduce_axes) + jnp.sum(onehot, axis=reduce_axes)
  dice_per_class = (2.0 * intersection + smooth) / (denominator + smooth)
  dice = 1.0 - jnp.mean(dice_per_class[first:])

  total = ce_weight * ce + dice_weight * dice
  return total, {'ce': ce, 'dice': dice}


# ---------------------------------------------------------------------------
# Distillation: hint (feature) loss and KL on softened logits.
# ---------------------------------------------------------------------------

_HINT_KINDS = ('l2', 'l1', 'cosine', 'relative_l2')


def _hint_pair(student_feats, teacher_feats, tap, adapters_out):
  """(student, teacher) features [N,h,w,C] of one tap, checked."""
  if adapters_out is not None and tap in adapters_out:
    s = adapters_out[tap]
  elif tap in student_feats:
    s = student_feats[tap]
  else:
    raise KeyError(f'hint_loss: tap {tap!r} not in student features {sorted(student_feats)}')
  if tap not in teacher_feats:
    raise KeyError(f'hint_loss: tap {tap!r} not in teacher features {sorted(teacher_feats)}')
  t = teacher_feats[tap]
  if s.ndim != 4 or t.ndim != 4:
    raise ValueError(
      f'hint_loss: tap {tap!r}: expected [N, h, w, C] features, got student {s.shape}, '
      f'teacher {t.shape}'
    )
  if s.shape[0] != t.shape[0]:
    raise ValueError(f'hint_loss: tap {tap!r}: batch sizes differ: {s.shape} vs {t.shape}')
  if s.shape[-1] != t.shape[-1]:
    raise ValueError(
      f'hint_loss: tap {tap!r}: student width {s.shape[-1]} != teacher width '
      f'{t.shape[-1]}; apply HintAdapters to the student features first'
    )
  return s, t


def hint_loss(
  student_feats: Mapping[str, jax.Array],
  teacher_feats: Mapping[str, jax.Array],
  taps: Sequence[str],
  kind: str = 'l2',
  adapters_out: Optional[Mapping[str, jax.Array]] = None,
):
  """Hint (feature distillation) loss between student and teacher features at named taps.

  Args:
    student_feats: tap name -> [N, h, w, C_s] student features.
    teacher_feats: tap name -> [N, h', w', C_t] teacher features.
    taps: tap names to use (non-empty).
    kind: "l2" mean squared difference, "l1" mean absolute difference, "cosine" mean
      over pixels of 1 - cos(student channel vector, teacher channel vector),
      "relative_l2" sum (s - t)^2 / sum t^2 (scale-free: 1 for s = 0, whatever the
      teacher's feature magnitude; ours).
    adapters_out: optional output of `HintAdapters` applied to the student features;
      where it has a tap, it replaces the student feature of that tap.

  The teacher map is resized to the student's spatial size (bilinear,
  `jax.image.resize`, antialiased when shrinking) if the sizes differ; channel widths
  must then match (use `cmedl_jax.models.adapters.HintAdapters` otherwise). No
  `stop_gradient` is applied: the train step wraps the teacher features in
  `jax.lax.stop_gradient` when the hint loss must update the student only.

  Returns:
    (total, per_tap) where total is the MEAN over taps and per_tap maps each tap to
    its float32 scalar loss.
  """
  if kind not in _HINT_KINDS:
    raise ValueError(f'hint_loss: kind must be one of {_HINT_KINDS}, got {kind!r}')
  if not taps:
    raise ValueError('hint_loss: taps is empty')
  per_tap = {}
  for tap in taps:
    s, t = _hint_pair(student_feats, teacher_feats, tap, adapters_out)
    s = _f32(s)
    t = _f32(t)
    if t.shape[1:3] != s.shape[1:3]:
      t = jax.image.resize(t, s.shape, method='bilinear')
    if kind == 'l2':
      value = jnp.mean(jnp.square(s - t))
    elif kind == 'l1':
      value = jnp.mean(jnp.abs(s - t))
    elif kind == 'relative_l2':
      value = jnp.sum(jnp.square(s - t)) / (jnp.sum(jnp.square(t)) + 1e-12)
    else:
      value = jnp.mean(1.0 - jnp.sum(l2_normalize(s) * l2_normalize(t), axis=-1))
    per_tap[tap] = value
  total = sum(per_tap.values()) / len(per_tap)
  return total, per_tap


def kl_distillation_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 2.0
) -> jax.Array:
  """Hinton distillation: T^2 * mean over pixels of KL(softmax(t/T) || softmax(s/T)).

  Logits are [..., K] (e.g. [N, H, W, K]); the mean runs over all leading axes. No
  stop_gradient on the teacher (the train step decides). Returns a float32 scalar.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f'kl_distillation_loss: shapes differ: student {student_logits.shape}, '
      f'teacher {teacher_logits.shape}'
    )
  log_ps = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(_f32(teacher_logits) / temperature, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(log_ps, log_pt, axis=-1)
  return temperature**2 * jnp.mean(kl)
