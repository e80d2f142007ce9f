"""The train state: every parameter group, its optimiser, and their initialisation.

Parameter collections and their optimiser groups are `method.GROUP_OF`; one optax
`multi_transform` applies one Adam per group (learning rate constant, then linear decay to 0).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cmedl_jax import image_pool
from cmedl_jax import method


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {collection: params}, collections as in method.GROUP_OF.
  batch_stats: Any  # {'student': ..., 'teacher': ...} (batch norm running averages).
  opt_state: Any  # optax multi_transform state, one Adam per group.
  pool: Any  # {'target': pool, 'source': pool} history pools (image_pool.py).
  rng: jax.Array


def _schedule(config, scale):
  lr = config.optim.lr * scale
  n = config.train.num_steps
  flat = int(round(config.optim.constant_fraction * n))
  return optax.join_schedules(
    [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(n - flat, 1))], [flat]
  )


def make_optimizer(config):
  """One Adam per group (lr 2e-4, beta1 0.5, constant then linear decay); frozen groups: zero."""

  def adam(group):
    return optax.adam(
      _schedule(config, config.optim.lr_scale[group]),
      b1=config.optim.b1,
      b2=config.optim.b2,
      eps=config.optim.eps,
    )

  transforms = {g: adam(g) for g in method.GROUPS}
  if config.method.freeze_translator:
    transforms['translator'] = optax.set_to_zero()
  return optax.multi_transform(
    transforms,
    lambda params: {
      name: jax.tree.map(lambda _: method.GROUP_OF[name], p) for name, p in params.items()
    },
  )


def learning_rates(config, step):
  """Scalar learning rate per group at `step` (for logging)."""
  return {g: _schedule(config, config.optim.lr_scale[g])(step) for g in method.GROUPS}


def create_train_state(config, nets, rng, image_shape):
  """Initialises all parameter groups. image_shape: (H, W, C) of one source image.

  Returns (TrainState, the optax transformation).
  """
  h, w, c = image_shape
  names = (*method.GROUP_OF, 'step_rng')
  keys = dict(zip(names, jax.random.split(rng, len(names))))
  params, batch_stats = _init_networks(config, nets, keys, image_shape)
  if method.parts(config)['adapters']:
    params['adapters'] = _init_adapters(
      config, nets, keys['adapters'], params, batch_stats, image_shape
    )
  pool = {}
  if config.method.history_pool > 0 and method.parts(config)['trains_translator']:
    pool['target'] = image_pool.init_pool(config.method.history_pool, (h, w, c))
    if nets.disc_source is not None:
      pool['source'] = image_pool.init_pool(config.method.history_pool, (h, w, c))
  tx = make_optimizer(config)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    pool=pool,
    rng=keys['step_rng'],
  ), tx


def _init_networks(config, nets, keys, image_shape):
  """({collection: params}, {segmenter: batch stats}) of every network of `nets`."""
  h, w, c = image_shape
  x = jnp.zeros((1, h, w, c), jnp.float32)
  params, batch_stats = {}, {}
  for name in ('student', 'teacher'):
    net = getattr(nets, name)
    if net is None:
      continue
    cin = method.student_in_channels(config, c) if name == 'student' else c
    variables = net.init(keys[name], jnp.zeros((1, h, w, cin)), train=False)
    params[name] = variables['params']
    batch_stats[name] = variables.get('batch_stats', {})
  for name in ('translator', 'translator_inv', 'disc_target', 'disc_source'):
    net = getattr(nets, name)
    if net is not None:
      params[name] = net.init(keys[name], x)['params']
  if nets.nce_head is not None:
    _, feats = nets.translator.apply(
      {'params': params['translator']}, x, nce_layers=tuple(config.model.nce.layers)
    )
    params['nce_head'] = nets.nce_head.init(
      keys['nce_head'], feats, config.model.nce.num_patches, None, keys['nce_head']
    )['params']
  return params, batch_stats


def _init_adapters(config, nets, key, params, batch_stats, image_shape):
  """Parameters of the hint adapters, sized by the student's and teacher's tapped features."""
  h, w, c = image_shape

  def feats(name, cin):
    net = getattr(nets, name)
    variables = {'params': params[name], 'batch_stats': batch_stats[name]}
    return net.apply(variables, jnp.zeros((1, h, w, cin)), train=False)[1]

  t_feats = feats('teacher', c)
  s_feats = method.hint_taps(config, feats('student', method.student_in_channels(config, c)))
  return method.hint_adapters(config, t_feats).init(key, s_feats).get('params', {})
