"""The CMEDL method: networks, train state, and one pure `train_step` that updates them all.

Per step, with source batch x (labels y) and unpaired target batch t:
  translator  G: x -> G(x) (pseudo-target). CycleGAN adds F: t -> F(t), cycle and identity L1;
              CUT adds PatchNCE between x and G(x) (and t and G(t)). Both: LSGAN against the
              target discriminator, contextual loss between x and G(x).
  teacher     segments G(x) with y (and t with its labels when the target set has them).
              Its loss also trains G when `method.seg_feedback` (G learns to keep tumours).
  student     segments x with y, plus distillation: hint loss between its features on x and the
              teacher's on G(x) at `method.hint_taps` (or KL on softened logits).
  discriminators  real t vs G(x) (and real x vs F(t)), translations under stop_gradient.

Gradients: one `value_and_grad` over every generator-side group (translator, teacher, student,
adapters) of the summed losses (stop_gradients route each term to the groups it should train),
one over the discriminators; a single optax `multi_transform` applies per-group Adam.
The state is replicated and the batch sharded on the mesh's 'data' axis; batch norm statistics
are therefore those of the global batch.
"""

import functools
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cmedl_jax import image_pool
from cmedl_jax import losses
from cmedl_jax import models
from cmedl_jax.models.adapters import HintAdapters

# Parameter collections of the state and the optimiser group each belongs to.
GROUP_OF = {
    'translator': 'translator',      # G: source -> target.
    'translator_inv': 'translator',  # F: target -> source (CycleGAN only).
    'nce_head': 'translator',        # PatchNCE MLPs (CUT only).
    'disc_target': 'discriminator',  # D on target images: real t vs G(x).
    'disc_source': 'discriminator',  # D on source images: real x vs F(t) (CycleGAN only).
    'teacher': 'teacher',
    'student': 'student',
    'adapters': 'student',           # 1x1 convs from student to teacher widths (hint loss).
}
DISCRIMINATORS = ('disc_target', 'disc_source')


class Networks(NamedTuple):
  """The Flax modules a method needs; None where the method has no such network."""
  student: Any
  teacher: Any
  translator: Any
  translator_inv: Any
  disc_target: Any
  disc_source: Any
  nce_head: Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any         # {collection: params}, collections as in GROUP_OF.
  batch_stats: Any    # {'student': ..., 'teacher': ...} (batch norm running averages).
  opt_state: Any      # optax multi_transform state, one Adam per group.
  pool: Any           # {'target': pool, 'source': pool} history pools (image_pool.py).
  rng: jax.Array


# ------------------------------------------------------------------------------ structure

def uses(config):
  """Which parts a method needs: dict of booleans."""
  m = config.method.name
  known = ('cmedl', 'student_only', 'two_channel', 'pmri_teacher', 'translator_only')
  if m not in known:
    raise ValueError(f'method.name={m!r}: expected one of {known}')
  translator = m != 'student_only'
  cyclegan = translator and config.model.translator.name == 'cyclegan'
  trains_translator = translator and not config.method.freeze_translator
  distill = m == 'cmedl' and config.method.distill != 'none'
  if config.method.distill not in ('hint', 'kl', 'none'):
    raise ValueError(f'method.distill={config.method.distill!r}: expected hint, kl or none')
  return dict(
      student=m in ('cmedl', 'student_only', 'two_channel'),
      teacher=m in ('cmedl', 'pmri_teacher'),
      translator=translator,
      translator_inv=cyclegan,
      disc_target=trains_translator,
      disc_source=trains_translator and cyclegan,
      nce_head=trains_translator and config.model.translator.name == 'cut',
      trains_translator=trains_translator,
      distill=distill,
      adapters=distill and config.method.distill == 'hint',
  )


def _segmenter_config(cfg, num_classes, dtype, remat):
  cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  cfg.update(num_classes=num_classes, dtype=dtype, remat=remat)
  return cfg


def build_networks(config, in_channels):
  """Flax modules for `config.method.name`. in_channels: channels of one source image."""
  u = uses(config)
  dtype = config.model.dtype
  remat = bool(config.model.get('remat', False))  # Runs saved before the field existed: off.
  k = config.data.num_classes

  def translator_cfg(out_channels):
    cfg = config.model.translator.to_dict()
    cfg.update(out_channels=out_channels, dtype=dtype, remat=remat)
    return cfg

  disc_cfg = dict(config.model.discriminator.to_dict(), dtype=dtype)
  return Networks(
      student=models.get_segmenter(_segmenter_config(config.model.student, k, dtype, remat))
      if u['student'] else None,
      teacher=models.get_segmenter(_segmenter_config(config.model.teacher, k, dtype, remat))
      if u['teacher'] else None,
      translator=models.get_translator(translator_cfg(in_channels)) if u['translator'] else None,
      translator_inv=models.get_translator(translator_cfg(in_channels))
      if u['translator_inv'] else None,
      disc_target=models.get_discriminator(disc_cfg) if u['disc_target'] else None,
      disc_source=models.get_discriminator(disc_cfg) if u['disc_source'] else None,
      nce_head=models.get_patch_sampler(dict(num_features=config.model.nce.num_features,
                                             dtype=dtype)) if u['nce_head'] else None,
  )


def _schedule(config, scale):
  lr = config.optim.lr * scale
  n = config.train.num_steps
  flat = int(round(config.optim.constant_fraction * n))
  return optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(n - flat, 1))], [flat])


def make_optimizer(config):
  """One Adam per group (lr 2e-4, beta1 0.5, constant then linear decay); frozen groups: zero."""
  def adam(group):
    return optax.adam(_schedule(config, config.optim.lr_scale[group]),
                      b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps)
  transforms = {g: adam(g) for g in ('translator', 'discriminator', 'teacher', 'student')}
  if config.method.freeze_translator:
    transforms['translator'] = optax.set_to_zero()
  return optax.multi_transform(
      transforms, lambda params: {name: jax.tree.map(lambda _: GROUP_OF[name], p)
                                  for name, p in params.items()})


def learning_rates(config, step):
  """Scalar learning rate per group at `step` (for logging)."""
  return {g: _schedule(config, config.optim.lr_scale[g])(step)
          for g in ('translator', 'discriminator', 'teacher', 'student')}


# ------------------------------------------------------------------------- initialisation

def student_in_channels(config, in_channels):
  return 2 * in_channels if config.method.name == 'two_channel' else in_channels


def create_train_state(config, nets, rng, image_shape):
  """Initialises all parameter groups. image_shape: (H, W, C) of one source image."""
  h, w, c = image_shape
  x = jnp.zeros((1, h, w, c), jnp.float32)
  names = (*GROUP_OF, 'step_rng')
  keys = dict(zip(names, jax.random.split(rng, len(names))))
  params, batch_stats = {}, {}
  for name in ('student', 'teacher'):
    net = getattr(nets, name)
    if net is None:
      continue
    cin = student_in_channels(config, c) if name == 'student' else c
    variables = net.init(keys[name], jnp.zeros((1, h, w, cin)), train=False)
    params[name] = variables['params']
    batch_stats[name] = variables.get('batch_stats', {})
  for name in ('translator', 'translator_inv', 'disc_target', 'disc_source'):
    net = getattr(nets, name)
    if net is not None:
      params[name] = net.init(keys[name], x)['params']
  if nets.nce_head is not None:
    _, feats = nets.translator.apply({'params': params['translator']}, x,
                                     nce_layers=tuple(config.model.nce.layers))
    params['nce_head'] = nets.nce_head.init(
        keys['nce_head'], feats, config.model.nce.num_patches, None, keys['nce_head'])['params']
  if uses(config)['adapters']:
    def feats(name, cin):
      net = getattr(nets, name)
      variables = {'params': params[name], 'batch_stats': batch_stats[name]}
      return net.apply(variables, jnp.zeros((1, h, w, cin)), train=False)[1]
    t_feats = feats('teacher', c)
    s_feats = _hint_taps(config, feats('student', student_in_channels(config, c)))
    params['adapters'] = hint_adapters(config, t_feats).init(
        keys['adapters'], s_feats).get('params', {})
  pool = {}
  if config.method.history_pool > 0 and uses(config)['trains_translator']:
    pool['target'] = image_pool.init_pool(config.method.history_pool, (h, w, c))
    if nets.disc_source is not None:
      pool['source'] = image_pool.init_pool(config.method.history_pool, (h, w, c))
  tx = make_optimizer(config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), pool=pool, rng=keys['step_rng']), tx


def hint_adapters(config, teacher_feats):
  """1x1-conv adapters from the student's widths to the teacher's at the hint taps."""
  return HintAdapters(out_channels={tap: int(teacher_feats[tap].shape[-1])
                                    for tap in config.method.hint_taps})


def _hint_taps(config, feats):
  return {tap: feats[tap] for tap in config.method.hint_taps}


# -------------------------------------------------------------------------------- the step

def _seg(config, logits, labels, mask=None):
  return losses.segmentation_loss(logits, labels, config.data.num_classes,
                                  ce_weight=config.loss.ce, dice_weight=config.loss.dice,
                                  mask=mask)


AUX_WEIGHT = 0.4  # PSPNet auxiliary head's share of a segmentation loss (Zhao et al. 2017).


def _seg_with_aux(config, logits, feats, labels, mask=None):
  """Segmentation loss of a segmenter's output, plus its auxiliary head's when it has one."""
  loss, _ = _seg(config, logits, labels, mask)
  if 'aux_logits' in feats:
    loss = loss + AUX_WEIGHT * _seg(config, feats['aux_logits'], labels, mask)[0]
  return loss


def _apply_bn(net, params, stats, x, rng):
  """Segmenter forward in training mode: (logits, feats, new batch stats)."""
  (logits, feats), new = net.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                   mutable=['batch_stats'], rngs={'dropout': rng})
  return logits, feats, new['batch_stats']


def _patch_nce(config, nets, params, source, translated, rng):
  """CUT's PatchNCE between `source` and its translation, averaged over tapped layers."""
  layers = tuple(config.model.nce.layers)
  n = config.model.nce.num_patches
  _, feat_k = nets.translator.apply({'params': params['translator']}, source, nce_layers=layers)
  _, feat_q = nets.translator.apply({'params': params['translator']}, translated,
                                    nce_layers=layers)
  head = {'params': params['nce_head']}
  k_pool, ids = nets.nce_head.apply(head, feat_k, n, None, rng)
  q_pool, _ = nets.nce_head.apply(head, feat_q, n, ids, rng)
  per_layer = [losses.patch_nce_loss(q, k, config.model.nce.temperature)
               for q, k in zip(q_pool, k_pool)]
  return sum(per_layer) / len(per_layer)


def generator_losses(params, d_params, batch_stats, config, nets, src, tgt, rng):
  """Total loss of all generator-side groups and its parts.

  params: the differentiated groups (translator(s), nce_head, teacher, student, adapters);
  d_params: the discriminators (constants here). Returns (total, (metrics, aux)).
  """
  u = uses(config)
  lw = config.loss
  x, y = src['image'], src['label']
  t = tgt['image']
  r_nce, r_ctx, r_teacher, r_student = jax.random.split(rng, 4)
  terms, new_stats, aux = {}, {}, {}

  # Translator.
  if u['translator']:
    g = lambda p, v: nets.translator.apply({'params': p}, v)
    fake_t = g(params['translator'], x)                       # G(x): pseudo-target.
    aux['fake_target'] = fake_t
    if u['trains_translator']:
      d_t = nets.disc_target.apply({'params': d_params['disc_target']}, fake_t)
      terms['gan_target'] = lw.gan * losses.lsgan_generator_loss(d_t)
      if lw.contextual > 0:
        # Reference = the source: every source patch should have a match in G(x).
        terms['contextual'] = lw.contextual * losses.contextual_loss(
            fake_t, x, feature_fn=functools.partial(
                losses.patch_features, patch_size=config.method.contextual_patch),
            max_points=config.method.contextual_points, rng=r_ctx)
      if nets.translator_inv is not None:                     # CycleGAN.
        f = lambda p, v: nets.translator_inv.apply({'params': p}, v)
        fake_s = f(params['translator_inv'], t)               # F(t): pseudo-source.
        aux['fake_source'] = fake_s
        d_s = nets.disc_source.apply({'params': d_params['disc_source']}, fake_s)
        terms['gan_source'] = lw.gan * losses.lsgan_generator_loss(d_s)
        rec_s = f(params['translator_inv'], fake_t)
        aux['cycle_source'] = rec_s
        terms['cycle'] = lw.cycle * (losses.l1_loss(rec_s, x) + losses.l1_loss(
            g(params['translator'], fake_s), t))
        if lw.identity > 0:
          terms['identity'] = lw.cycle * lw.identity * (
              losses.l1_loss(g(params['translator'], t), t)
              + losses.l1_loss(f(params['translator_inv'], x), x))
      else:                                                   # CUT.
        r1, r2 = jax.random.split(r_nce)
        terms['nce'] = lw.nce * _patch_nce(config, nets, params, x, fake_t, r1)
        if lw.nce_identity:
          terms['nce_identity'] = lw.nce * _patch_nce(
              config, nets, params, t, g(params['translator'], t), r2)
    if not config.method.seg_feedback:
      fake_t = jax.lax.stop_gradient(fake_t)
    if config.method.freeze_translator:
      fake_t = jax.lax.stop_gradient(fake_t)

  # Teacher: pseudo-target with source labels, plus real target where labelled; one forward
  # so its batch norm sees one batch.
  if u['teacher']:
    n = x.shape[0]
    t_in = jnp.concatenate([fake_t, t], 0)
    t_lab = jnp.concatenate([y, tgt['label']], 0)
    t_mask = jnp.concatenate([jnp.ones((n,), jnp.float32), tgt['has_label']], 0)
    t_logits, t_feats, new_stats['teacher'] = _apply_bn(
        nets.teacher, params['teacher'], batch_stats['teacher'], t_in, r_teacher)
    terms['teacher_seg'] = lw.teacher_seg * _seg_with_aux(config, t_logits, t_feats, t_lab,
                                                          t_mask)
    aux['teacher_logits'] = t_logits[:n]
    teacher_feats = {k: v[:n] for k, v in t_feats.items()}
    if config.method.teacher_stop_gradient:
      teacher_feats = jax.lax.stop_gradient(teacher_feats)

  # Student.
  if u['student']:
    s_in = x
    if config.method.name == 'two_channel':
      s_in = jnp.concatenate([x, jax.lax.stop_gradient(fake_t)], -1)
    s_logits, s_feats, new_stats['student'] = _apply_bn(
        nets.student, params['student'], batch_stats['student'], s_in, r_student)
    terms['student_seg'] = lw.student_seg * _seg_with_aux(config, s_logits, s_feats, y)
    aux['student_logits'] = s_logits
    if u['distill'] and config.method.distill == 'hint':
      adapted = hint_adapters(config, teacher_feats).apply(
          {'params': params['adapters']}, _hint_taps(config, s_feats))
      hint, _ = losses.hint_loss(adapted, teacher_feats, config.method.hint_taps,
                                 kind=config.method.hint_kind)
      terms['hint'] = lw.hint * hint
    elif u['distill']:
      terms['kl'] = lw.hint * losses.kl_distillation_loss(
          s_logits, teacher_feats['logits'], config.method.kl_temperature)

  total = sum(terms.values())
  return total, (terms, new_stats, aux)


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
  u = uses(config)
  rng = jax.random.fold_in(state.rng, state.step)
  r_gen, r_pool_t, r_pool_s = jax.random.split(rng, 3)
  g_params = {k: v for k, v in state.params.items() if k not in DISCRIMINATORS}
  d_params = {k: v for k, v in state.params.items() if k in DISCRIMINATORS}

  (g_total, (terms, new_stats, aux)), g_grads = jax.value_and_grad(
      generator_losses, has_aux=True)(g_params, d_params, state.batch_stats, config, nets,
                                      src, tgt, r_gen)
  metrics = {f'loss/{k}': v for k, v in terms.items()}
  grads = dict(g_grads)
  pool = state.pool
  if u['trains_translator']:
    fakes = {'fake_target': jax.lax.stop_gradient(aux['fake_target'])}
    if 'target' in pool:
      fakes['fake_target'], pool_t = image_pool.query_pool(pool['target'],
                                                           fakes['fake_target'], r_pool_t)
      pool = dict(pool, target=pool_t)
    if nets.disc_source is not None:
      fakes['fake_source'] = jax.lax.stop_gradient(aux['fake_source'])
      if 'source' in pool:
        fakes['fake_source'], pool_s = image_pool.query_pool(pool['source'],
                                                             fakes['fake_source'], r_pool_s)
        pool = dict(pool, source=pool_s)
    (d_total, d_terms), d_grads = jax.value_and_grad(
        discriminator_losses, has_aux=True)(d_params, nets, src, tgt, fakes)
    grads.update(d_grads)
    metrics.update({f'loss/{k}': v for k, v in d_terms.items()})
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics['loss/total_generator_side'] = g_total
  by_group = {}
  for name, grad in grads.items():
    by_group.setdefault(GROUP_OF[name], []).append(grad)
  for group, gs in by_group.items():
    metrics[f'grad_norm/{group}'] = optax.tree.norm(gs)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=dict(state.batch_stats, **new_stats),
                            opt_state=opt_state, pool=pool)
  return new_state, metrics


# ------------------------------------------------------------------------------ inference

def infer_logits(params, batch_stats, images, *, config, nets):
  """Segmentation logits [N,H,W,K] of the method's test-time network on source images.

  student (cmedl, student_only); student on [x, G(x)] (two_channel); teacher on G(x)
  (pmri_teacher). images: [N,H,W,C] in [-1, 1].
  """
  m = config.method.name
  if m == 'pmri_teacher':
    fake = nets.translator.apply({'params': params['translator']}, images)
    return nets.teacher.apply({'params': params['teacher'],
                               'batch_stats': batch_stats['teacher']}, fake, train=False)[0]
  if m == 'two_channel':
    fake = nets.translator.apply({'params': params['translator']}, images)
    images = jnp.concatenate([images, fake], -1)
  if m == 'translator_only':
    raise ValueError('method translator_only has no segmentation network')
  return nets.student.apply({'params': params['student'],
                             'batch_stats': batch_stats['student']}, images, train=False)[0]


def eval_step(state, images, *, config, nets, with_translations=False):
  """Test-time outputs on source slices: {'logits'} and optionally translations and teacher.

  images: [N,H,W,C]. With with_translations: also 'pseudo_target' (G(x)), and where the method
  has them 'teacher_logits' (teacher on G(x)) and 'cycle' (F(G(x))). 'translator_only' has no
  segmentation network, so no 'logits'.
  """
  out = {}
  if config.method.name != 'translator_only':
    out['logits'] = infer_logits(state.params, state.batch_stats, images, config=config,
                                 nets=nets)
  if with_translations and nets.translator is not None:
    fake = nets.translator.apply({'params': state.params['translator']}, images)
    out['pseudo_target'] = fake
    if nets.teacher is not None:
      out['teacher_logits'] = nets.teacher.apply(
          {'params': state.params['teacher'], 'batch_stats': state.batch_stats['teacher']},
          fake, train=False)[0]
    if nets.translator_inv is not None:
      out['cycle'] = nets.translator_inv.apply({'params': state.params['translator_inv']}, fake)
  return out
