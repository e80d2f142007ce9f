"""One pure `train_step` that updates every network of a method, and `eval_step`.

Per step, with source batch x (labels y) and unpaired target batch t:
  translator  G: x -> G(x) (pseudo-target). CycleGAN adds F: t -> F(t), cycle and identity L1;
              CUT adds PatchNCE between x and G(x) (and t and G(t)). Both: LSGAN against the
              target discriminator, contextual loss between x and G(x).
  teacher     segments G(x) with y. Its loss also trains G, scaled by
              `loss.seg_to_translator` (G learns to keep tumours). With `data.target_labels`
              it also segments labelled real target images (`method.teacher_bn`: separate
              batch-norm passes, or one joint pass).
  student     segments x with y, plus distillation: hint loss between its (adapted:
              `method.hint_adapters`) features on x and the teacher's on G(x) at
              `method.hint_taps` (or KL on softened logits), weight ramped over
              `method.hint_warmup`; the teacher's side is constant unless
              `method.hint_trains_teacher` / `hint_trains_translator`.
  discriminators  real t vs G(x) (and real x vs F(t)), translations under stop_gradient.
Without a translator the teacher segments x itself (self_distill) or, with co-registered
batches (data.paired), the real t of the same slice (paired_teacher), in G(x)'s place.

Gradients: one `value_and_grad` over every generator-side group (translator, teacher, student,
adapters) of the summed losses (stop_gradients route each term to the groups it should train),
one over the discriminators; a single optax `multi_transform` applies per-group Adam.
The state is replicated and the batch sharded on the mesh's 'data' axis; batch norm statistics
are therefore those of the global batch.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cmedl_jax import image_pool
from cmedl_jax import losses
from cmedl_jax import method
from cmedl_jax.method import translate


# Loss-term names (metrics 'loss/<name>'), by the part of the step that adds them; a term whose
# weight is 0 is left out (contextual, identity, nce_identity).
TRANSLATION_TERMS = ('gan_target', 'contextual')  # Any trained translator.
CYCLEGAN_TERMS = ('gan_source', 'cycle', 'identity')
CUT_TERMS = ('nce', 'nce_identity')
TEACHER_TERMS = ('teacher_seg',)
STUDENT_TERMS = ('student_seg',)
DISTILLATION_TERMS = ('hint', 'kl')  # Named after method.distill.
DISCRIMINATOR_TERMS = ('disc_target', 'disc_source')
TOTAL_TERM = 'total_generator_side'  # The sum of the generator-side terms.


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the generator-side terms of one step read (built once per step, never changed).

  params: the differentiated collections (translator(s), nce_head, teacher, student, adapters);
  d_params: the discriminators and batch_stats: the running statistics, both constant here;
  src, tgt: the source and target batches (train_step's); parts: method.parts(config).
  """

  config: Any
  nets: method.Networks
  parts: dict
  params: dict
  d_params: dict
  batch_stats: dict
  src: dict
  tgt: dict
  step: Any = 0


class StepTerms(NamedTuple):
  """What a part of the step gives: weighted loss terms {name: scalar}, new batch statistics
  {collection: tree}, and auxiliary outputs (translations and logits, [B,H,W,*])."""

  terms: dict
  batch_stats: dict
  aux: dict


def _seg(config, logits, labels, mask=None):
  return losses.segmentation_loss(
    logits,
    labels,
    config.data.num_classes,
    ce_weight=config.loss.ce,
    dice_weight=config.loss.dice,
    mask=mask,
  )


AUX_WEIGHT = 0.4  # PSPNet auxiliary head's share of a segmentation loss (Zhao et al. 2017).


def _seg_with_aux(config, logits, feats, labels, mask=None):
  """Segmentation loss of a segmenter's output, plus its auxiliary head's when it has one."""
  loss, _ = _seg(config, logits, labels, mask)
  if 'aux_logits' in feats:
    loss = loss + AUX_WEIGHT * _seg(config, feats['aux_logits'], labels, mask)[0]
  return loss


def _apply_bn(net, params, stats, x, rng):
  """Segmenter forward in training mode: (logits, feats, new batch stats)."""
  (logits, feats), new = net.apply(
    {'params': params, 'batch_stats': stats},
    x,
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': rng},
  )
  return logits, feats, new['batch_stats']


def _patch_nce(ctx, source, translated, rng):
  """CUT's PatchNCE between `source` and its translation, averaged over tapped layers."""
  config, nets, params = ctx.config, ctx.nets, ctx.params
  layers = tuple(config.model.nce.layers)
  n = config.model.nce.num_patches
  _, feat_k = nets.translator.apply({'params': params['translator']}, source, nce_layers=layers)
  _, feat_q = nets.translator.apply({'params': params['translator']}, translated, nce_layers=layers)
  head = {'params': params['nce_head']}
  k_pool, ids = nets.nce_head.apply(head, feat_k, n, None, rng)
  q_pool, _ = nets.nce_head.apply(head, feat_q, n, ids, rng)
  per_layer = [
    losses.patch_nce_loss(q, k, config.model.nce.temperature) for q, k in zip(q_pool, k_pool)
  ]
  return sum(per_layer) / len(per_layer)


def generator_losses(params, d_params, batch_stats, config, nets, src, tgt, rng, step=0):
  """Total loss of all generator-side groups and its parts: translation + teacher + student.

  params: the differentiated groups (translator(s), nce_head, teacher, student, adapters);
  d_params: the discriminators (constants here). Returns (total, (terms, new batch stats,
  aux: translations and logits)).
  """
  u = method.parts(config)
  ctx = StepContext(config, nets, u, params, d_params, batch_stats, src, tgt, step)
  r_nce, r_ctx, r_teacher, r_student = jax.random.split(rng, 4)
  outs = []
  fake_t = teacher_feats = None
  if u['translator']:
    out, fake_t = translation_terms(ctx, r_nce, r_ctx)
    outs.append(out)
  elif u['teacher']:  # paired_teacher: the real co-registered t; self_distill: x itself.
    fake_t = tgt['image'] if method.get(config).paired else src['image']
  if u['teacher']:
    out, teacher_feats = teacher_terms(ctx, fake_t, r_teacher)
    outs.append(out)
  if u['student']:
    outs.append(student_terms(ctx, fake_t, teacher_feats, r_student))
  terms, new_stats, aux = _joined(outs)
  total = sum(terms.values())
  return total, (terms, new_stats, aux)


def _joined(outs):
  """One StepTerms of several: each of their dicts joined, in order."""
  joined = StepTerms({}, {}, {})
  for out in outs:
    for mine, theirs in zip(joined, out):
      mine.update(theirs)
  return joined


def translation_terms(ctx, r_nce, r_ctx):
  """The translator's terms: gan_target, contextual, then CycleGAN's gan_source, cycle,
  identity or CUT's nce, nce_identity. Returns (StepTerms, G(x) [B,H,W,C], detached when the
  translator is frozen)."""
  config, nets = ctx.config, ctx.nets
  lw = config.loss
  x = ctx.src['image']
  fake_t = translate(nets, ctx.params, x)  # G(x): pseudo-target.
  out = StepTerms({}, {}, {'fake_target': fake_t})
  if ctx.parts['trains_translator']:
    d_t = nets.disc_target.apply({'params': ctx.d_params['disc_target']}, fake_t)
    out.terms['gan_target'] = lw.gan * losses.lsgan_generator_loss(d_t)
    if lw.contextual > 0:
      # Reference = the source: every source patch should have a match in G(x).
      out.terms['contextual'] = lw.contextual * losses.contextual_loss(
        fake_t,
        x,
        feature_fn=losses.contextual_feature_fn(
          method.switch(config, 'contextual_features'), config.method.contextual_patch
        ),
        max_points=config.method.contextual_points,
        rng=r_ctx,
      )
    if nets.translator_inv is not None:
      own = _cyclegan_terms(ctx, fake_t)
    else:
      own = _cut_terms(ctx, fake_t, r_nce)
    out.terms.update(own.terms)
    out.aux.update(own.aux)
  if not ctx.parts['trains_translator']:
    fake_t = jax.lax.stop_gradient(fake_t)
  return out, fake_t


def _cyclegan_terms(ctx, fake_t):
  """CycleGAN: LSGAN on F(t), cycle L1 of F(G(x)) and G(F(t)), identity L1 of G(t), F(x)."""
  lw, nets, params = ctx.config.loss, ctx.nets, ctx.params
  x, t = ctx.src['image'], ctx.tgt['image']
  g = lambda p, v: nets.translator.apply({'params': p}, v)
  f = lambda p, v: nets.translator_inv.apply({'params': p}, v)
  fake_s = f(params['translator_inv'], t)  # F(t): pseudo-source.
  out = StepTerms({}, {}, {'fake_source': fake_s})
  d_s = nets.disc_source.apply({'params': ctx.d_params['disc_source']}, fake_s)
  out.terms['gan_source'] = lw.gan * losses.lsgan_generator_loss(d_s)
  rec_s = f(params['translator_inv'], fake_t)
  out.aux['cycle_source'] = rec_s
  out.terms['cycle'] = lw.cycle * (
    losses.l1_loss(rec_s, x) + losses.l1_loss(g(params['translator'], fake_s), t)
  )
  if lw.identity > 0:
    out.terms['identity'] = (
      lw.cycle
      * lw.identity
      * (
        losses.l1_loss(g(params['translator'], t), t)
        + losses.l1_loss(f(params['translator_inv'], x), x)
      )
    )
  return out


def _cut_terms(ctx, fake_t, rng):
  """CUT: PatchNCE between x and G(x), and (nce_identity) between t and G(t)."""
  x, t = ctx.src['image'], ctx.tgt['image']
  r1, r2 = jax.random.split(rng)
  terms = {'nce': ctx.config.loss.nce * _patch_nce(ctx, x, fake_t, r1)}
  if ctx.config.loss.nce_identity:
    terms['nce_identity'] = ctx.config.loss.nce * _patch_nce(
      ctx, t, translate(ctx.nets, ctx.params, t), r2
    )
  return StepTerms(terms, {}, {})


def teacher_terms(ctx, fake_t, rng):
  """teacher_seg: the teacher segments G(x) with the source labels (and, with
  data.target_labels, labelled real target images: method.teacher_bn). Returns (StepTerms,
  its features on G(x): the distillation targets, with the gradient routes of _hint_targets)."""
  config = ctx.config
  n = ctx.src['label'].shape[0]
  fake_in = _teacher_input(ctx, fake_t)
  logits, feats, labels, mask, new_stats = _teacher_passes(ctx, fake_in, rng)
  seg = config.loss.teacher_seg * _seg_with_aux(config, logits, feats, labels, mask)
  out = StepTerms({'teacher_seg': seg}, {'teacher': new_stats}, {'teacher_logits': logits[:n]})
  own = {k: v[:n] for k, v in feats.items()}
  return out, _hint_targets(ctx, fake_t, own, rng)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x, scale):
  """Identity forward; the gradient multiplied by `scale` backward."""
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, residual, g):
  del residual
  return (g * scale,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _teacher_input(ctx, fake_t):
  """G(x) as the teacher's segmentation loss sees it: its gradient into the translator
  scaled by loss.seg_to_translator (the teacher's own gradient is never scaled)."""
  scale = ctx.config.loss.seg_to_translator
  if not ctx.parts['trains_translator'] or scale == 1.0:
    return fake_t
  if scale == 0.0:
    return jax.lax.stop_gradient(fake_t)
  return scale_gradient(fake_t, float(scale))


def _teacher_passes(ctx, fake_in, rng):
  """The teacher's training forward(s): (logits, feats, labels, per-example loss mask, new
  batch stats). G(x) first, then real target images where they enter."""
  src, tgt = ctx.src, ctx.tgt
  y, t = src['label'], tgt['image']
  ones = jnp.ones((y.shape[0],), jnp.float32)
  cat = lambda a, b: jnp.concatenate([a, b], 0)
  forward = functools.partial(
    _apply_bn, ctx.nets.teacher, ctx.params['teacher'], ctx.batch_stats['teacher']
  )
  if method.switch(ctx.config, 'teacher_bn') == 'joint':
    # One pass over [G(x), t], t's loss masked by has_label (this code before 2026-12).
    logits, feats, stats = forward(cat(fake_in, t), rng)
    return logits, feats, cat(y, tgt['label']), cat(ones, tgt['has_label']), stats
  logits, feats, stats = forward(fake_in, rng)
  if not ctx.config.data.target_labels:
    return logits, feats, y, ones, stats
  # Real target images in their own pass: normalised by their own batch statistics, whose
  # running averages are dropped (the teacher meets pseudo-target images at test time).
  real_logits, real_feats, _ = forward(t, jax.random.fold_in(rng, 1))
  feats = jax.tree.map(cat, feats, real_feats)
  return cat(logits, real_logits), feats, cat(y, tgt['label']), cat(ones, tgt['has_label']), stats


def _hint_targets(ctx, fake_t, feats, rng):
  """The teacher's features on G(x) that the student distils. Their gradient trains the
  teacher with method.hint_trains_teacher and reaches the translator with
  method.hint_trains_translator; with neither they are constants."""
  config, trains_translator = ctx.config, ctx.parts['trains_translator']
  to_teacher = config.method.hint_trains_teacher
  to_translator = config.method.hint_trains_translator and trains_translator
  if not (to_teacher or to_translator):
    return jax.lax.stop_gradient(feats)
  scale = config.loss.seg_to_translator if trains_translator else 0.0
  if to_teacher and scale == (1.0 if to_translator else 0.0):
    return feats  # The training pass routes gradients as asked.
  # Else a second forward on G(x) alone with the asked routes (its running averages dropped).
  p = ctx.params['teacher'] if to_teacher else jax.lax.stop_gradient(ctx.params['teacher'])
  x = fake_t if to_translator else jax.lax.stop_gradient(fake_t)
  _, feats, _ = _apply_bn(ctx.nets.teacher, p, ctx.batch_stats['teacher'], x, rng)
  return feats


def hint_weight(config, step):
  """loss.hint, ramped linearly from 0 over method.hint_warmup x train.num_steps steps."""
  warmup = config.method.hint_warmup * config.train.num_steps
  if warmup <= 0:
    return config.loss.hint
  return config.loss.hint * jnp.clip(step / warmup, 0.0, 1.0)


def student_terms(ctx, fake_t, teacher_feats, rng):
  """student_seg on x (on [x, G(x)] for two_channel), plus distillation from the teacher's
  features on G(x): hint (adapted student taps vs teacher taps) or kl (softened logits).
  Returns StepTerms."""
  config, u = ctx.config, ctx.parts
  s_in = ctx.src['image']
  if method.get(config).test_time == method.STUDENT_ON_TRANSLATION:
    s_in = jnp.concatenate([s_in, jax.lax.stop_gradient(fake_t)], -1)
  s_logits, s_feats, new_stats = _apply_bn(
    ctx.nets.student, ctx.params['student'], ctx.batch_stats['student'], s_in, rng
  )
  seg = config.loss.student_seg * _seg_with_aux(config, s_logits, s_feats, ctx.src['label'])
  out = StepTerms({'student_seg': seg}, {'student': new_stats}, {'student_logits': s_logits})
  if u['distill'] and config.method.distill == 'hint':
    taps = method.hint_taps(config, s_feats)
    if u['adapters']:
      adapters = method.hint_adapters(config, teacher_feats)
      taps = adapters.apply({'params': ctx.params['adapters']}, taps)
    hint, _ = losses.hint_loss(
      taps, teacher_feats, config.method.hint_taps, kind=config.method.hint_kind
    )
    out.terms['hint'] = hint_weight(config, ctx.step) * hint
  elif u['distill']:
    out.terms['kl'] = hint_weight(config, ctx.step) * losses.kl_distillation_loss(
      s_logits, teacher_feats['logits'], config.method.kl_temperature
    )
  return out


def discriminator_losses(d_params, nets, src, tgt, aux):
  """LSGAN discriminator losses on real images vs translations (given, already detached)."""
  terms = {}
  d_real = nets.disc_target.apply({'params': d_params['disc_target']}, tgt['image'])
  d_fake = nets.disc_target.apply({'params': d_params['disc_target']}, aux['fake_target'])
  terms['disc_target'] = losses.lsgan_discriminator_loss(d_real, d_fake)
  if nets.disc_source is not None:
    d_real = nets.disc_source.apply({'params': d_params['disc_source']}, src['image'])
    d_fake = nets.disc_source.apply({'params': d_params['disc_source']}, aux['fake_source'])
    terms['disc_source'] = losses.lsgan_discriminator_loss(d_real, d_fake)
  return sum(terms.values()), terms


def train_step(state, src, tgt, *, config, nets, tx):
  """One CMEDL update of every parameter group. Pure; jit with config/nets/tx bound.

  src, tgt: {'image': [B,H,W,C] float32 in [-1, 1], 'label': [B,H,W] int32,
             'has_label': [B] float32}. Returns (new state, metrics of scalars).
  """
  u = method.parts(config)
  rng = jax.random.fold_in(state.rng, state.step)
  r_gen, r_pool_t, r_pool_s = jax.random.split(rng, 3)
  g_params = {k: v for k, v in state.params.items() if k not in method.DISCRIMINATORS}
  d_params = {k: v for k, v in state.params.items() if k in method.DISCRIMINATORS}

  (g_total, (terms, new_stats, aux)), g_grads = jax.value_and_grad(generator_losses, has_aux=True)(
    g_params, d_params, state.batch_stats, config, nets, src, tgt, r_gen, step=state.step
  )
  metrics = {f'loss/{k}': v for k, v in terms.items()}
  grads = dict(g_grads)
  pool = state.pool
  if u['trains_translator']:
    fakes = {'fake_target': jax.lax.stop_gradient(aux['fake_target'])}
    if 'target' in pool:
      fakes['fake_target'], pool_t = image_pool.query_pool(
        pool['target'], fakes['fake_target'], r_pool_t
      )
      pool = dict(pool, target=pool_t)
    if nets.disc_source is not None:
      fakes['fake_source'] = jax.lax.stop_gradient(aux['fake_source'])
      if 'source' in pool:
        fakes['fake_source'], pool_s = image_pool.query_pool(
          pool['source'], fakes['fake_source'], r_pool_s
        )
        pool = dict(pool, source=pool_s)
    (d_total, d_terms), d_grads = jax.value_and_grad(discriminator_losses, has_aux=True)(
      d_params, nets, src, tgt, fakes
    )
    grads.update(d_grads)
    metrics.update({f'loss/{k}': v for k, v in d_terms.items()})
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics[f'loss/{TOTAL_TERM}'] = g_total
  by_group = {}
  for name, grad in grads.items():
    by_group.setdefault(method.GROUP_OF[name], []).append(grad)
  for group, gs in by_group.items():
    metrics[f'grad_norm/{group}'] = optax.tree.norm(gs)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=dict(state.batch_stats, **new_stats),
    opt_state=opt_state,
    pool=pool,
  )
  return new_state, metrics


def eval_step(state, images, *, config, nets, with_translations=False):
  """Test-time outputs on source slices: {'logits'} and optionally translations and teacher.

  images: [N,H,W,C]. With with_translations: also 'pseudo_target' (G(x)), and where the method
  has them 'teacher_logits' (teacher on G(x)) and 'cycle' (F(G(x))). A method without a
  test-time network (translator_only) gives no 'logits'.
  """
  out = {}
  test_time = method.get(config).test_time
  if test_time is not None:
    out['logits'] = method.infer_logits(
      state.params, state.batch_stats, images, nets=nets, test_time=test_time
    )
  paired = method.get(config).paired  # Its teacher reads the target: nothing to show on x.
  if with_translations and method.teacher_view(config) == method.TEACHER and not paired:
    out['teacher_logits'] = method.infer_logits(  # self_distill: the teacher on x.
      state.params, state.batch_stats, images, nets=nets, test_time=method.TEACHER
    )
  if with_translations and nets.translator is not None:
    fake = translate(nets, state.params, images)
    out['pseudo_target'] = fake
    if nets.teacher is not None:
      out['teacher_logits'] = method.segment(
        nets.teacher, state.params, state.batch_stats, 'teacher', fake
      )
    if nets.translator_inv is not None:
      out['cycle'] = nets.translator_inv.apply({'params': state.params['translator_inv']}, fake)
  return out
