"""The joint CMEDL train step.

Every method steps and trains its groups; every loss term carries its weight and equals the
networks' outputs put through the losses directly; every term's gradient reaches exactly the
parameter collections it should (one jitted Jacobian per configuration); eval_step equals the
networks applied directly; FC-DenseNet, PSPNet, bfloat16 and 2.5D steps; 1 == 8 devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import losses
from cmedl_jax import method
from cmedl_jax import sharding
from cmedl_jax import train_state
from cmedl_jax import train_step as ts
from configs import tiny

H = W = 32


def make_batch(seed, n=8, has_label=1.0, channels=1):
  """Images in [-1, 1] with a bright disc labelled 1; `channels` noisy copies (2.5D)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:H, :W]
  images, labels = [], []
  for _ in range(n):
    cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 7)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    images.append(np.where(disc, 0.6, -0.4) + 0.1 * rng.standard_normal((H, W)))
    labels.append(disc)
  images = np.stack(images)[..., None]
  if channels > 1:
    images = images + 0.05 * rng.standard_normal((n, H, W, channels))
  return {
    'image': jnp.asarray(images, jnp.float32),
    'label': jnp.asarray(np.stack(labels), jnp.int32),
    'has_label': jnp.full((n,), has_label, jnp.float32),
  }


_SETUPS = {}


def _session_key(config, devices, channels):
  """(the key of `config`, `devices` (default: the first) and `channels`, those devices)."""
  devices = devices or jax.devices()[:1]
  return (config.to_json(), tuple(d.id for d in devices), channels), devices


def setup(config, devices=None, channels=1):
  """Networks, a replicated initial state (initialised under jit), the jitted step, the mesh;
  once per configuration, devices and channels in a session."""
  key, devices = _session_key(config, devices, channels)
  if key not in _SETUPS:
    _SETUPS[key] = _setup(config, devices, channels)
  return _SETUPS[key]


def _setup(config, devices, channels):
  nets = method.build_networks(config, in_channels=channels)
  tx = train_state.make_optimizer(config)
  mesh = sharding.make_mesh(devices)
  init = jax.jit(
    lambda r: train_state.create_train_state(config, nets, r, (H, W, channels))[0],
    out_shardings=sharding.replicated(mesh),
  )
  state = init(jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(ts.train_step, config=config, nets=nets, tx=tx))
  return nets, state, step, mesh


_RUNS = {}


def run_one(config, devices=None, channels=1):
  """(initial state, state after one step, metrics); each configuration compiled once per
  session (tests that share a configuration share its run)."""
  key, devices = _session_key(config, devices, channels)
  if key not in _RUNS:
    nets, state, step, mesh = setup(config, devices, channels)
    src = jax.device_put(make_batch(1, channels=channels), sharding.data_sharded(mesh))
    tgt = jax.device_put(make_batch(2, channels=channels), sharding.data_sharded(mesh))
    new_state, metrics = step(state, src, tgt)
    _RUNS[key] = (state, new_state, jax.device_get(metrics))
  return _RUNS[key]


def run_method(key):
  """run_one for METHODS[key] on one device."""
  return run_one(method_config(key))


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


METHODS = {
  'cmedl_cyclegan': ('tiny', 'unet,cyclegan', {}),
  'cmedl_cut': ('tiny', 'unet,cut', {}),
  'cmedl_kl': ('tiny', 'unet,cyclegan', {'distill': 'kl'}),
  'student_only': ('tiny', 'unet', {'name': 'student_only', 'distill': 'none'}),
  'two_channel': ('tiny', 'unet', {'name': 'two_channel', 'distill': 'none'}),
  'pmri_teacher': ('tiny', 'unet', {'name': 'pmri_teacher', 'distill': 'none'}),
  'translator_only': ('tiny', 'unet', {'name': 'translator_only', 'distill': 'none'}),
  'frozen_translator': ('tiny', 'unet', {'freeze_translator': True}),
  'self_distill': ('tiny', 'unet', {'name': 'self_distill'}),
  'paired_teacher': ('tiny', 'unet', {'name': 'paired_teacher'}),
}


# The generator-side terms of CMEDL with CycleGAN and hint distillation (every weight > 0).
CYCLEGAN_HINT_TERMS = (
  ts.TRANSLATION_TERMS + ts.CYCLEGAN_TERMS + ts.TEACHER_TERMS + ts.STUDENT_TERMS + ('hint',)
)


def method_config(key):
  _, arg, fields = METHODS[key]
  config = tiny.get_config(arg)
  config.method.update(fields)
  return config


@pytest.mark.parametrize('key', list(METHODS))
def test_every_method_steps_and_trains_its_groups(key):
  u = method.parts(method_config(key))
  state, new_state, metrics = run_method(key)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(new_state.step) == 1
  expected = {
    'student': u['student'],
    'teacher': u['teacher'],
    'translator': u['trains_translator'],
    'disc_target': u['disc_target'],
  }
  for name, trains in expected.items():
    if name in state.params:
      assert changed(state.params[name], new_state.params[name]) == trains, name
    else:
      assert not trains, f'{name} should exist'
  # Computing nothing it does not need: no parameters for unused networks.
  if key == 'student_only':
    assert set(state.params) == {'student'}
  if key in ('self_distill', 'paired_teacher'):  # The teacher segments x or the paired t.
    assert set(state.params) == {'student', 'teacher', 'adapters'}
    assert {'loss/teacher_seg', 'loss/student_seg', 'loss/hint'} <= set(metrics)
    assert not any('gan' in name or 'contextual' in name for name in metrics)
  if key == 'cmedl_cut':
    assert 'translator_inv' not in state.params and 'nce_head' in state.params
    assert 'loss/nce' in metrics and 'loss/cycle' not in metrics
  if key == 'cmedl_cyclegan':
    for name in CYCLEGAN_HINT_TERMS + ts.DISCRIMINATOR_TERMS:
      assert f'loss/{name}' in metrics, name
    for group in ('translator', 'discriminator', 'teacher', 'student'):
      assert metrics[f'grad_norm/{group}'] > 0, group


# ------------------------------------------------------------------- loss terms and weights

RNG = jax.random.PRNGKey(3)
# Distinct weights, so that a weight applied to the wrong term, twice or not at all shows.
WEIGHTS = dict(
  gan=2.0,
  cycle=3.0,
  identity=0.25,
  nce=5.0,
  contextual=7.0,
  teacher_seg=11.0,
  student_seg=13.0,
  hint=17.0,
)
UNIT_WEIGHTS = {k: 1.0 for k in WEIGHTS}
# Each term's factor as a function of the weights.
FACTOR = {
  'gan_target': lambda w: w['gan'],
  'gan_source': lambda w: w['gan'],
  'cycle': lambda w: w['cycle'],
  'identity': lambda w: w['cycle'] * w['identity'],
  'contextual': lambda w: w['contextual'],
  'nce': lambda w: w['nce'],
  'nce_identity': lambda w: w['nce'],
  'teacher_seg': lambda w: w['teacher_seg'],
  'student_seg': lambda w: w['student_seg'],
  'hint': lambda w: w['hint'],
  'kl': lambda w: w['hint'],
}
# Every generator-side term of the step has its factor above.
assert set(FACTOR) == {
  *ts.TRANSLATION_TERMS,
  *ts.CYCLEGAN_TERMS,
  *ts.CUT_TERMS,
  *ts.TEACHER_TERMS,
  *ts.STUDENT_TERMS,
  *ts.DISTILLATION_TERMS,
}
# Configurations whose terms are checked: together they hold every term of the step.
TERM_CONFIGS = {'cyclegan_hint': ('unet,cyclegan', {}), 'cut_kl': ('unet,cut', {'distill': 'kl'})}


def terms_config(key, weights):
  arg, fields = TERM_CONFIGS[key]
  config = tiny.get_config(arg)
  config.method.update(fields)
  config.loss.update(weights)
  return config


def split_params(state):
  g = {k: v for k, v in state.params.items() if k not in method.DISCRIMINATORS}
  d = {k: v for k, v in state.params.items() if k in method.DISCRIMINATORS}
  return g, d


_TERMS = {}


def loss_terms(key, weights):
  """(total, terms, config, nets, state) of generator_losses on the test batches (jitted)."""
  cache_key = (key, tuple(sorted(weights.items())))
  if cache_key not in _TERMS:
    config = terms_config(key, weights)
    nets, state, _, _ = setup(config)
    g_params, d_params = split_params(state)

    def forward(g, d, stats):
      total, (terms, _, _) = ts.generator_losses(
        g, d, stats, config, nets, make_batch(1), make_batch(2), RNG
      )
      return total, terms

    total, terms = jax.device_get(jax.jit(forward)(g_params, d_params, state.batch_stats))
    _TERMS[cache_key] = (float(total), {k: float(v) for k, v in terms.items()}, config, nets, state)
  return _TERMS[cache_key]


@pytest.mark.parametrize('key', list(TERM_CONFIGS))
def test_total_is_the_sum_of_the_terms_each_with_its_weight(key):
  total_1, unit, _, _, _ = loss_terms(key, UNIT_WEIGHTS)
  total_w, weighted, _, _, _ = loss_terms(key, WEIGHTS)
  expected_terms = {
    'cyclegan_hint': set(CYCLEGAN_HINT_TERMS),
    'cut_kl': {*ts.TRANSLATION_TERMS, *ts.CUT_TERMS, *ts.TEACHER_TERMS, *ts.STUDENT_TERMS, 'kl'},
  }[key]
  assert set(unit) == set(weighted) == expected_terms
  assert all(v > 0 for v in unit.values()), unit
  np.testing.assert_allclose(total_1, sum(unit.values()), rtol=1e-6)
  np.testing.assert_allclose(total_w, sum(weighted.values()), rtol=1e-6)
  for name, value in unit.items():
    np.testing.assert_allclose(
      weighted[name], FACTOR[name](WEIGHTS) * value, rtol=1e-5, err_msg=name
    )


def test_terms_equal_the_networks_put_through_the_losses():
  """CycleGAN + hint terms (unit weights) recomputed from the networks applied directly."""
  _, terms, config, nets, state = loss_terms('cyclegan_hint', UNIT_WEIGHTS)
  p, stats = state.params, state.batch_stats
  src, tgt = make_batch(1), make_batch(2)
  x, y, t = src['image'], src['label'], tgt['image']
  g = lambda v: nets.translator.apply({'params': p['translator']}, v)
  f = lambda v: nets.translator_inv.apply({'params': p['translator_inv']}, v)
  fake_t, fake_s = g(x), f(t)
  d_t = nets.disc_target.apply({'params': p['disc_target']}, fake_t)
  d_s = nets.disc_source.apply({'params': p['disc_source']}, fake_s)
  l1 = lambda a, b: float(jnp.mean(jnp.abs(a - b)))
  want = {
    'gan_target': float(jnp.mean((d_t - 1.0) ** 2)),
    'gan_source': float(jnp.mean((d_s - 1.0) ** 2)),
    'cycle': l1(f(fake_t), x) + l1(g(fake_s), t),
    'identity': l1(g(t), t) + l1(f(x), x),
  }
  _, r_ctx, _, _ = jax.random.split(RNG, 4)
  want['contextual'] = float(
    losses.contextual_loss(
      fake_t,
      x,
      feature_fn=functools.partial(
        losses.patch_features, patch_size=config.method.contextual_patch
      ),
      max_points=config.method.contextual_points,
      rng=r_ctx,
    )
  )

  def train_mode(net, name, images):
    out, _ = net.apply(
      {'params': p[name], 'batch_stats': stats[name]}, images, train=True, mutable=['batch_stats']
    )
    return out

  k = config.data.num_classes
  s_logits, s_feats = train_mode(nets.student, 'student', x)
  want['student_seg'] = float(losses.segmentation_loss(s_logits, y, k)[0])
  # The teacher sees pseudo-target with the labels of x (data.target_labels off: the authors').
  t_logits, t_feats = train_mode(nets.teacher, 'teacher', fake_t)
  want['teacher_seg'] = float(losses.segmentation_loss(t_logits, y, k)[0])
  n = x.shape[0]
  want['hint'] = float(
    np.mean(
      [
        np.mean((np.asarray(s_feats[tap]) - np.asarray(t_feats[tap][:n])) ** 2)
        for tap in config.method.hint_taps
      ]
    )
  )
  assert set(want) == set(terms)
  for name in want:
    np.testing.assert_allclose(terms[name], want[name], rtol=2e-5, err_msg=name)


# ---------------------------------------------------------------------- gradient routing


_NORMS = {}


def routing_norms(key):
  """term_gradient_norms of routing_config(key) for the terms ROUTES[key] names, once per
  session: (norms, the names of all the configuration's terms)."""
  if key not in _NORMS:
    _NORMS[key] = term_gradient_norms(routing_config(key), ROUTES[key])
  return _NORMS[key]


def term_gradient_norms(config, names):
  """{term: {collection: sum |d term / d params|}} of the terms `names`, from one jitted
  Jacobian (one backward pass per term: the switches' cases take the terms they change)."""
  nets, state, _, _ = setup(config)
  g_params, d_params = split_params(state)
  src, tgt = make_batch(1), make_batch(2)

  def terms(p):
    return ts.generator_losses(p, d_params, state.batch_stats, config, nets, src, tgt, RNG)[1][0]

  every = set(jax.eval_shape(terms, g_params))
  assert set(names) <= every, names
  names = sorted(names)

  def vector(p):
    values = terms(p)
    return jnp.stack([values[k] for k in names])

  jac = jax.jit(jax.jacrev(vector))(g_params)  # Leaves [n_terms, *shape].
  norms = {}
  for collection, tree in jac.items():
    leaves = jax.tree.leaves(tree)
    if not leaves:  # e.g. adapters at equal widths: no parameters.
      continue
    per_term = sum(np.abs(np.asarray(l)).reshape(len(names), -1).sum(1) for l in leaves)
    for i, name in enumerate(names):
      norms.setdefault(name, {})[collection] = float(per_term[i])
  return norms, every


# term -> the parameter collections its gradient must reach; every other collection gets 0.
CYCLEGAN_ROUTES = {
  'gan_target': {'translator'},
  'gan_source': {'translator_inv'},
  'cycle': {'translator', 'translator_inv'},
  'identity': {'translator', 'translator_inv'},
  'contextual': {'translator'},
}
ROUTES = {
  'default': dict(
    CYCLEGAN_ROUTES,
    teacher_seg={'teacher', 'translator'},  # loss.seg_to_translator 1: the teacher trains G.
    student_seg={'student'},
    hint={'student', 'adapters'},  # Teacher features under stop_gradient.
  ),
  # A wider student below, so that the adapters exist; the CycleGAN terms are those of
  # 'default' (these switches do not touch them), so only the terms they route are taken.
  # No feedback, the hint trains the teacher: the training pass's features carry that route.
  'no_feedback_hint_trains_teacher': dict(
    teacher_seg={'teacher'}, student_seg={'student'}, hint={'student', 'adapters', 'teacher'}
  ),
  # Feedback on, the hint trains the teacher but not G: a second pass with G(x) detached.
  'hint_trains_teacher': dict(
    teacher_seg={'teacher', 'translator'},
    student_seg={'student'},
    hint={'student', 'adapters', 'teacher'},
  ),
  # The hint reaches G through the pseudo-target but does not train the teacher.
  'hint_trains_translator': dict(
    teacher_seg={'teacher', 'translator'},
    student_seg={'student'},
    hint={'student', 'adapters', 'translator'},
  ),
  # Both (the study's teacher_grad ablation), with the feedback scaled: a second pass.
  'hint_trains_both_scaled_feedback': dict(
    teacher_seg={'teacher', 'translator'},
    student_seg={'student'},
    hint={'student', 'adapters', 'teacher', 'translator'},
  ),
  # The teacher on the co-registered real target: no translator to reach.
  'paired_teacher': dict(
    teacher_seg={'teacher'}, student_seg={'student'}, hint={'student', 'adapters'}
  ),
  'cut_kl': dict(
    gan_target={'translator'},
    contextual={'translator'},
    nce={'translator', 'nce_head'},
    nce_identity={'translator', 'nce_head'},
    teacher_seg={'teacher', 'translator'},
    student_seg={'student'},
    kl={'student'},  # Teacher logits under stop_gradient.
  ),
}


ROUTING_SWITCHES = {
  'no_feedback_hint_trains_teacher': ({'hint_trains_teacher': True}, 0.0),
  'hint_trains_teacher': ({'hint_trains_teacher': True}, 1.0),
  'hint_trains_translator': ({'hint_trains_translator': True}, 1.0),
  'hint_trains_both_scaled_feedback': (
    {'hint_trains_teacher': True, 'hint_trains_translator': True},
    0.25,
  ),
}


def routing_config(key):
  if key == 'cut_kl':
    return terms_config('cut_kl', {})
  if key == 'paired_teacher':
    return method_config(key)
  config = tiny.get_config('unet,cyclegan')
  if key in ROUTING_SWITCHES:
    switches, feedback = ROUTING_SWITCHES[key]
    config.method.update(switches)
    config.loss.seg_to_translator = feedback
    config.model.student.base_width = 8
  return config


@pytest.mark.parametrize('key', list(ROUTES))
def test_each_term_reaches_exactly_its_parameter_collections(key):
  norms, every = routing_norms(key)
  assert set(norms) == set(ROUTES[key])
  if key not in ROUTING_SWITCHES:  # Every term of the configuration has its route.
    assert set(ROUTES[key]) == every
  if key in ROUTING_SWITCHES:
    assert 'adapters' in norms['hint']
  for term, reached in norms.items():
    got = {collection for collection, value in reached.items() if value > 0}
    assert got == ROUTES[key][term] & set(reached), (term, reached)


def test_the_translator_gets_the_teacher_s_segmentation_gradient_scaled():
  """loss.seg_to_translator scales the teacher_seg gradient into G (0.25 vs 1, same networks)
  and leaves the teacher's own gradient as it is."""
  scaled = routing_norms('hint_trains_both_scaled_feedback')[0]['teacher_seg']
  full = routing_norms('hint_trains_teacher')[0]['teacher_seg']
  np.testing.assert_allclose(scaled['translator'], 0.25 * full['translator'], rtol=1e-4)
  np.testing.assert_allclose(scaled['teacher'], full['teacher'], rtol=1e-5)


def test_zero_distillation_weight_equals_student_only():
  config = method_config('cmedl_cyclegan')
  config.loss.hint = 0.0
  _, cmedl_state, _ = run_one(config)
  _, alone_state, _ = run_method('student_only')
  for a, b in zip(
    jax.tree.leaves(cmedl_state.params['student']), jax.tree.leaves(alone_state.params['student'])
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for a, b in zip(
    jax.tree.leaves(cmedl_state.batch_stats['student']),
    jax.tree.leaves(alone_state.batch_stats['student']),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------- other segmenters, bf16, 2.5D input


def test_pspnet_student_densefcn_teacher_on_context_slices():
  """PSPNet student (auxiliary head, taps at 1/8 resolution), FC-DenseNet teacher, 3 context
  slices: every group trains; the student's loss includes 0.4 x its auxiliary head's; the hint
  pairs its 1/8-resolution taps, through adapters, with the teacher's resized taps."""
  config = tiny.get_config('pspnet,cyclegan')
  config.data.context_slices = 3
  config.model.student.update(
    name='pspnet', base_width=4, blocks=(1, 1, 1, 1), aux_head=True, dropout=0.0
  )
  config.model.teacher.update(
    name='densefcn',
    growth_rate=3,
    layers_per_block=(1, 1, 1, 1, 1),
    n_pool=2,
    first_filters=6,
    dropout=0.0,
  )
  nets, state, step, mesh = setup(config, channels=3)
  src, tgt = make_batch(1, channels=3), make_batch(2, channels=3)
  new_state, metrics = jax.device_get(
    step(state, *jax.device_put((src, tgt), sharding.data_sharded(mesh)))
  )
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  for name in ('student', 'teacher', 'translator', 'translator_inv', 'disc_target', 'adapters'):
    assert changed(state.params[name], new_state.params[name]), name

  # The step's losses are those of the initial state: recompute them from the networks.
  p, stats = state.params, state.batch_stats
  x, y, k = src['image'], src['label'], config.data.num_classes
  fake = nets.translator.apply({'params': p['translator']}, x)
  assert fake.shape == (8, H, W, 3)  # 2.5D: all context slices are translated.
  (s_logits, s_feats), _ = nets.student.apply(
    {'params': p['student'], 'batch_stats': stats['student']},
    x,
    train=True,
    mutable=['batch_stats'],
  )
  student_seg = (
    losses.segmentation_loss(s_logits, y, k)[0]
    + 0.4 * losses.segmentation_loss(s_feats['aux_logits'], y, k)[0]
  )
  np.testing.assert_allclose(metrics['loss/student_seg'], student_seg, rtol=2e-5)
  (_, t_feats), _ = nets.teacher.apply(  # G(x) alone: data.target_labels is off.
    {'params': p['teacher'], 'batch_stats': stats['teacher']},
    fake,
    train=True,
    mutable=['batch_stats'],
  )
  taps = config.method.hint_taps
  for tap in taps:
    assert s_feats[tap].shape[1:3] == (H // 8, W // 8), (tap, s_feats[tap].shape)
    assert t_feats[tap].shape[1:3] == (H, W)
  adapted = method.hint_adapters(config, t_feats).apply(
    {'params': p['adapters']}, {t: s_feats[t] for t in taps}
  )
  hint = np.mean(
    [
      np.mean(
        (
          np.asarray(adapted[t])
          - np.asarray(jax.image.resize(t_feats[t][:8], adapted[t].shape, 'bilinear'))
        )
        ** 2
      )
      for t in taps
    ]
  )
  np.testing.assert_allclose(metrics['loss/hint'], hint, rtol=2e-5)


def test_bfloat16_step_matches_float32():
  """bfloat16 compute: activations in bf16, parameters float32, losses equal to float32's to
  bf16 precision."""
  _, _, f32_metrics = run_method('cmedl_cyclegan')
  config = method_config('cmedl_cyclegan')
  config.model.dtype = 'bfloat16'
  nets, state, step, mesh = setup(config)
  feats = nets.student.apply(
    {'params': state.params['student'], 'batch_stats': state.batch_stats['student']},
    make_batch(1, n=1)['image'],
    train=False,
    capture_intermediates=True,
    mutable=['intermediates'],
  )[1]['intermediates']
  conv_out = feats['enc_0_0']['Conv_0']['__call__'][0]
  assert conv_out.dtype == jnp.bfloat16
  new_state, metrics = jax.device_get(
    step(state, *jax.device_put((make_batch(1), make_batch(2)), sharding.data_sharded(mesh)))
  )
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_state.params))
  assert changed(state.params, new_state.params)
  for name in (n for n in CYCLEGAN_HINT_TERMS if n != 'gan_source'):  # As before: all but it.
    np.testing.assert_allclose(
      metrics[f'loss/{name}'], f32_metrics[f'loss/{name}'], rtol=0.03, err_msg=name
    )


# --------------------------------------------------------------------------------- eval_step


def test_eval_step_equals_the_networks_applied_directly():
  config = method_config('cmedl_cyclegan')
  _, state, _ = run_method('cmedl_cyclegan')
  nets = method.build_networks(config, in_channels=1)
  x = make_batch(1, n=2)['image']
  out = jax.jit(functools.partial(ts.eval_step, config=config, nets=nets, with_translations=True))(
    state, x
  )
  p, stats = state.params, state.batch_stats
  seg = lambda name, v: nets.__getattribute__(name).apply(
    {'params': p[name], 'batch_stats': stats[name]}, v, train=False
  )[0]
  fake = nets.translator.apply({'params': p['translator']}, x)
  want = {
    'logits': seg('student', x),
    'pseudo_target': fake,
    'teacher_logits': seg('teacher', fake),
    'cycle': nets.translator_inv.apply({'params': p['translator_inv']}, fake),
  }
  assert set(out) == set(want)
  for name in want:
    assert out[name].shape == want[name].shape, name
    np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('key', ['two_channel', 'pmri_teacher'])
def test_test_time_network_of_each_method(key):
  """two_channel: the student on [x, G(x)]; pmri_teacher: the teacher on G(x)."""
  config = method_config(key)
  _, state, _ = run_method(key)
  nets = method.build_networks(config, in_channels=1)
  x = make_batch(1, n=2)['image']
  got = method.infer_logits(
    state.params, state.batch_stats, x, nets=nets, test_time=method.get(config).test_time
  )
  p, stats = state.params, state.batch_stats
  fake = nets.translator.apply({'params': p['translator']}, x)
  name, inputs = {
    'two_channel': ('student', jnp.concatenate([x, fake], -1)),
    'pmri_teacher': ('teacher', fake),
  }[key]
  want = getattr(nets, name).apply(
    {'params': p[name], 'batch_stats': stats[name]}, inputs, train=False
  )[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- method switches


def teacher_train_mode(nets, state, images):
  """(logits, new batch stats) of the teacher in training mode on `images`."""
  variables = {'params': state.params['teacher'], 'batch_stats': state.batch_stats['teacher']}
  (logits, _), new = nets.teacher.apply(variables, images, train=True, mutable=['batch_stats'])
  return logits, new['batch_stats']


@pytest.mark.parametrize('target_labels', [False, True])
def test_the_teacher_s_running_statistics_are_those_of_the_pseudo_target_batch(target_labels):
  """method.teacher_bn='separate' (default): without real target labels the teacher sees G(x)
  alone; with them the real target images go through their own pass, into the loss but not
  into the running statistics (which stay those of G(x) alone)."""
  config = tiny.get_config('unet,cyclegan')
  config.data.target_labels = target_labels
  nets, state, _, _ = setup(config)
  g, d = split_params(state)
  src, tgt = make_batch(1), make_batch(2, has_label=float(target_labels))
  forward = lambda g, d, st: ts.generator_losses(g, d, st, config, nets, src, tgt, RNG)
  _, (terms, new_stats, _) = jax.jit(forward)(g, d, state.batch_stats)
  fake = nets.translator.apply({'params': state.params['translator']}, src['image'])
  pseudo_logits, pseudo_stats = teacher_train_mode(nets, state, fake)
  _, joint_stats = teacher_train_mode(nets, state, jnp.concatenate([fake, tgt['image']], 0))
  for got, want, joint in zip(
    jax.tree.leaves(new_stats['teacher']),
    jax.tree.leaves(pseudo_stats),
    jax.tree.leaves(joint_stats),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, joint, rtol=1e-3, atol=1e-5)  # Not the joint pass's.
  k = config.data.num_classes
  if target_labels:
    real_logits, _ = teacher_train_mode(nets, state, tgt['image'])
    logits = jnp.concatenate([pseudo_logits, real_logits], 0)
    labels = jnp.concatenate([src['label'], tgt['label']], 0)
  else:
    logits, labels = pseudo_logits, src['label']
  want = losses.segmentation_loss(logits, labels, k)[0]
  np.testing.assert_allclose(terms['teacher_seg'], want, rtol=2e-5)


@pytest.mark.parametrize(
  'mode, adapters',
  [('auto', set()), ('always', {'adapter_penultimate', 'adapter_last'}), ('none', None)],
)
def test_hint_adapters_at_equal_widths_as_asked(mode, adapters):
  """Student and teacher of equal widths (tiny): 'auto' has no adapter parameters, 'always' a
  1x1 conv at every tap (FitNets), 'none' no adapters collection; each step traces."""
  config = tiny.get_config('unet,cyclegan')
  config.method.hint_adapters = mode
  nets = method.build_networks(config, in_channels=1)
  state = jax.eval_shape(
    lambda r: train_state.create_train_state(config, nets, r, (H, W, 1))[0], RNG
  )
  if adapters is None:
    assert 'adapters' not in state.params
  else:
    assert set(state.params['adapters']) == adapters
  step = functools.partial(
    ts.train_step, config=config, nets=nets, tx=train_state.make_optimizer(config)
  )
  new_state, metrics = jax.eval_shape(step, state, make_batch(1), make_batch(2))
  assert 'loss/hint' in metrics
  assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)


def test_the_contextual_loss_uses_the_features_asked_for():
  """method.contextual_features='random_conv': the step's contextual term is the contextual
  loss on the fixed random-conv features (losses.random_conv_features), not on raw patches."""
  _, patch_terms, config, nets, state = loss_terms('cyclegan_hint', UNIT_WEIGHTS)
  config = terms_config('cyclegan_hint', UNIT_WEIGHTS)
  config.method.contextual_features = 'random_conv'
  g, d = split_params(state)
  src, tgt = make_batch(1), make_batch(2)
  got = jax.jit(
    lambda: ts.generator_losses(g, d, state.batch_stats, config, nets, src, tgt, RNG)[1][0]
  )()['contextual']
  fake = nets.translator.apply({'params': state.params['translator']}, src['image'])
  _, r_ctx, _, _ = jax.random.split(RNG, 4)
  want = losses.contextual_loss(
    fake,
    src['image'],
    feature_fn=losses.random_conv_features,
    max_points=config.method.contextual_points,
    rng=r_ctx,
  )
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert abs(float(got) - patch_terms['contextual']) > 1e-3


def test_the_hint_weight_is_zero_before_its_warm_up_and_full_after():
  config = terms_config('cyclegan_hint', UNIT_WEIGHTS)
  config.train.num_steps = 100
  config.method.hint_warmup = 0.5  # 50 steps.
  weights = [float(ts.hint_weight(config, step)) for step in (0, 25, 50, 100)]
  assert weights == [0.0, 0.5, 1.0, 1.0]
  _, unwarmed, _, nets, state = loss_terms('cyclegan_hint', UNIT_WEIGHTS)
  g, d = split_params(state)
  hint = jax.jit(
    lambda step: ts.generator_losses(
      g, d, state.batch_stats, config, nets, make_batch(1), make_batch(2), RNG, step=step
    )[1][0]['hint']
  )
  assert float(hint(0)) == 0.0
  np.testing.assert_allclose(float(hint(50)), unwarmed['hint'], rtol=1e-6)


def test_the_history_pool_of_50_is_fed_and_sampled():
  """CycleGAN's and the authors' pool of 50 translations per side (the default): a step stores
  its translations while the pool fills; once full, it swaps some for stored ones."""
  config = method_config('cmedl_cyclegan')
  assert config.method.history_pool == 50
  state, new_state, _ = run_method('cmedl_cyclegan')
  x, t = make_batch(1)['image'], make_batch(2)['image']
  made = {
    'target': nets_apply(config, state, 'translator', x),
    'source': nets_apply(config, state, 'translator_inv', t),
  }
  for side, translations in made.items():
    assert state.pool[side]['images'].shape[0] == 50 and int(state.pool[side]['count']) == 0
    assert int(new_state.pool[side]['count']) == x.shape[0]
    np.testing.assert_allclose(
      new_state.pool[side]['images'][: x.shape[0]], translations, rtol=1e-5, atol=1e-6
    )
  _, _, step, mesh = setup(config)
  full = {
    side: {'images': jnp.full_like(p['images'], 0.5), 'count': jnp.array(50, jnp.int32)}
    for side, p in state.pool.items()
  }
  # Placed as run_one places its inputs: the step compiled there is the one called here.
  full = jax.device_put(full, sharding.replicated(mesh))
  batches = jax.device_put((make_batch(1), make_batch(2)), sharding.data_sharded(mesh))
  after, _ = step(state.replace(pool=full), *batches)
  for side in full:
    stored = np.asarray(after.pool[side]['images'])
    swapped = np.sum(np.any(stored != 0.5, axis=(1, 2, 3)))
    assert int(after.pool[side]['count']) == 50 and 0 < swapped <= x.shape[0], (side, swapped)


def nets_apply(config, state, name, images):
  """A translator of `config` applied to `images` with `state`'s parameters."""
  nets = method.build_networks(config, in_channels=1)
  return getattr(nets, name).apply({'params': state.params[name]}, images)


# ------------------------------------------------------------------------ devices and remat


@pytest.mark.parametrize('translator', ['cyclegan', 'cut'])
def test_one_device_equals_eight_devices(translator):
  assert jax.device_count() >= 8, 'tests/conftest.py forces 8 CPU devices'
  config = tiny.get_config(f'unet,{translator}')
  config.method.history_pool = 4
  # Adam's first update is lr * g / (|g| + eps). With eps 1e-8 every element moves by ~lr
  # whatever its size, so an element whose gradient is rounding noise (a conv bias before
  # instance norm, or one 1e-6 of its tensor's largest) moves by +-lr at random. eps = 1 makes
  # the update ~ lr * g, so comparing parameters compares the gradients.
  config.optim.eps = 1.0
  init, one, m1 = run_one(config, jax.devices()[:1])
  _, eight, m8 = run_one(config, jax.devices()[:8])
  assert m1.keys() == m8.keys()
  for k in m1:
    # Gradient norms include bias gradients that are sums with cancellation (a bias before
    # instance norm: exactly 0 up to rounding; CUT's MLP-head biases: sums of large terms),
    # whose rounding differs with the reduction order; the parameters are compared below.
    tol = 1e-2 if k.startswith('grad_norm/') else 2e-5
    np.testing.assert_allclose(m1[k], m8[k], rtol=tol, atol=1e-6, err_msg=k)
  for a, b, a0 in zip(
    jax.tree.leaves(one.params), jax.tree.leaves(eight.params), jax.tree.leaves(init.params)
  ):
    # Compare the updates a - a0 and b - a0, relative to the tensor's largest update: the
    # gradients of 1 and 8 devices differ only in reduction order (measured: <= 0.15% of the
    # largest translator update, <= 1 float32 ulp of the parameter elsewhere), while a wrong
    # sharding (per-device batch statistics, a missing all-reduce) changes them by far more.
    a, b, a0 = np.asarray(a), np.asarray(b), np.asarray(a0)
    largest = np.abs(a - a0).max()
    np.testing.assert_allclose(a - a0, b - a0, rtol=0, atol=5e-3 * largest + 4e-8)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_config_gives_the_same_step():
  """config.model.remat=True (student, teacher and translators rematerialised) changes memory,
  not results: the same losses and, with eps = 1 as above, the same updates."""
  config = tiny.get_config('unet,cyclegan')
  config.method.history_pool = 4  # As in the 1 == 8 devices test, to share its run.
  config.optim.eps = 1.0
  init, plain, m_plain = run_one(config)
  config.model.remat = True
  _, remat, m_remat = run_one(config)
  for k in m_plain:
    tol = 1e-2 if k.startswith('grad_norm/') else 1e-5
    np.testing.assert_allclose(m_remat[k], m_plain[k], rtol=tol, atol=1e-6, err_msg=k)
  assert jax.tree.structure(plain.params) == jax.tree.structure(remat.params)
  for a, b, a0 in zip(
    jax.tree.leaves(plain.params), jax.tree.leaves(remat.params), jax.tree.leaves(init.params)
  ):
    a, b, a0 = np.asarray(a), np.asarray(b), np.asarray(a0)
    np.testing.assert_allclose(b - a0, a - a0, rtol=0, atol=5e-3 * np.abs(a - a0).max() + 4e-8)


def test_paired_teacher_segments_the_real_target_and_the_student_distils_it():
  """paired_teacher: teacher_seg is the teacher's loss on the target batch t (the real
  co-registered slice, data.paired) with the source labels, and the hint compares the student's
  features on x with the teacher's on t."""
  config = method_config('paired_teacher')
  nets, state, _, _ = setup(config)
  g_params, d_params = split_params(state)
  src, tgt = make_batch(1), make_batch(2)
  terms = ts.generator_losses(g_params, d_params, state.batch_stats, config, nets, src, tgt, RNG)
  terms = terms[1][0]
  r_teacher, r_student = jax.random.split(RNG, 4)[2:]

  def train_mode(net, name, images, rng):
    variables = {'params': g_params[name], 'batch_stats': state.batch_stats[name]}
    (logits, feats), _ = net.apply(
      variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': rng}
    )
    return logits, feats

  k = config.data.num_classes
  t_logits, t_feats = train_mode(nets.teacher, 'teacher', tgt['image'], r_teacher)
  s_logits, s_feats = train_mode(nets.student, 'student', src['image'], r_student)
  want = {
    'teacher_seg': float(losses.segmentation_loss(t_logits, src['label'], k)[0]),
    'student_seg': float(losses.segmentation_loss(s_logits, src['label'], k)[0]),
    'hint': float(
      np.mean(
        [
          np.mean((np.asarray(s_feats[tap]) - np.asarray(t_feats[tap])) ** 2)
          for tap in config.method.hint_taps
        ]
      )
    ),
  }
  assert set(terms) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-5, err_msg=name)
  on_source = train_mode(nets.teacher, 'teacher', src['image'], r_teacher)[0]
  assert (
    abs(float(losses.segmentation_loss(on_source, src['label'], k)[0]) - want['teacher_seg']) > 1e-3
  )
