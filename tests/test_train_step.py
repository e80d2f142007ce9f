"""The joint CMEDL train step: every method runs, gradients go where they should, 1 == 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import sharding
from cmedl_jax import train_step as ts
from configs import tiny

H = W = 32


def make_batch(seed, n=8, has_label=1.0):
  """Images in [-1, 1] with a bright disc labelled 1."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:H, :W]
  images, labels = [], []
  for _ in range(n):
    cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 7)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    images.append(np.where(disc, 0.6, -0.4) + 0.1 * rng.standard_normal((H, W)))
    labels.append(disc)
  return {'image': jnp.asarray(np.stack(images)[..., None], jnp.float32),
          'label': jnp.asarray(np.stack(labels), jnp.int32),
          'has_label': jnp.full((n,), has_label, jnp.float32)}


def setup(config, devices=None):
  nets = ts.build_networks(config, in_channels=1)
  state, tx = ts.create_train_state(config, nets, jax.random.PRNGKey(0), (H, W, 1))
  mesh = sharding.make_mesh(devices or jax.devices()[:1])
  step = jax.jit(functools.partial(ts.train_step, config=config, nets=nets, tx=tx))
  state = jax.device_put(state, sharding.replicated(mesh))
  return nets, state, step, mesh


def run_one(config, devices=None):
  nets, state, step, mesh = setup(config, devices)
  src = jax.device_put(make_batch(1), sharding.data_sharded(mesh))
  tgt = jax.device_put(make_batch(2), sharding.data_sharded(mesh))
  new_state, metrics = step(state, src, tgt)
  return state, new_state, jax.device_get(metrics)


_RUNS = {}


def run_method(key):
  """run_one for METHODS[key] on one device, compiled once per test session."""
  if key not in _RUNS:
    _RUNS[key] = run_one(method_config(key))
  return _RUNS[key]


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
}


def method_config(key):
  _, arg, method = METHODS[key]
  config = tiny.get_config(arg)
  config.method.update(method)
  return config


@pytest.mark.parametrize('key', list(METHODS))
def test_every_method_steps_and_trains_its_groups(key):
  u = ts.uses(method_config(key))
  state, new_state, metrics = run_method(key)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(new_state.step) == 1
  expected = {'student': u['student'], 'teacher': u['teacher'],
              'translator': u['trains_translator'], 'disc_target': u['disc_target']}
  for name, trains in expected.items():
    if name in state.params:
      assert changed(state.params[name], new_state.params[name]) == trains, name
    else:
      assert not trains, f'{name} should exist'
  # Computing nothing it does not need: no parameters for unused networks.
  if key == 'student_only':
    assert set(state.params) == {'student'}
  if key == 'cmedl_cut':
    assert 'translator_inv' not in state.params and 'nce_head' in state.params
    assert 'loss/nce' in metrics and 'loss/cycle' not in metrics
  if key == 'cmedl_cyclegan':
    for name in ('gan_target', 'gan_source', 'cycle', 'identity', 'contextual', 'teacher_seg',
                 'student_seg', 'hint', 'disc_target', 'disc_source'):
      assert f'loss/{name}' in metrics, name
    for group in ('translator', 'discriminator', 'teacher', 'student'):
      assert metrics[f'grad_norm/{group}'] > 0, group


def _term_grads(config, term):
  """Gradient of one loss term w.r.t. every generator-side group."""
  nets, state, _, _ = setup(config)
  g_params = {k: v for k, v in state.params.items() if k not in ts.DISCRIMINATORS}
  d_params = {k: v for k, v in state.params.items() if k in ts.DISCRIMINATORS}

  def term_value(p):
    _, (terms, _, _) = ts.generator_losses(p, d_params, state.batch_stats, config, nets,
                                           make_batch(1), make_batch(2), jax.random.PRNGKey(3))
    return terms[term]
  return jax.grad(term_value)(g_params)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_hint_loss_with_stop_gradient_trains_student_only():
  config = method_config('cmedl_cyclegan')
  grads = _term_grads(config, 'hint')
  assert _norm(grads['student']) > 0
  assert _norm(grads['teacher']) == 0
  assert _norm(grads['translator']) == 0


def test_hint_loss_without_stop_gradient_reaches_teacher():
  config = method_config('cmedl_cyclegan')
  config.method.teacher_stop_gradient = False
  grads = _term_grads(config, 'hint')
  assert _norm(grads['teacher']) > 0 and _norm(grads['student']) > 0


@pytest.mark.parametrize('feedback', [True, False])
def test_teacher_seg_loss_reaches_translator_only_with_feedback(feedback):
  config = method_config('cmedl_cyclegan')
  config.method.seg_feedback = feedback
  grads = _term_grads(config, 'teacher_seg')
  assert _norm(grads['teacher']) > 0
  assert (_norm(grads['translator']) > 0) == feedback
  assert _norm(grads['student']) == 0


def test_zero_distillation_weight_equals_student_only():
  config = method_config('cmedl_cyclegan')
  config.loss.hint = 0.0
  _, cmedl_state, _ = run_one(config)
  _, alone_state, _ = run_method('student_only')
  for a, b in zip(jax.tree.leaves(cmedl_state.params['student']),
                  jax.tree.leaves(alone_state.params['student'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(cmedl_state.batch_stats['student']),
                  jax.tree.leaves(alone_state.batch_stats['student'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


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
  for a, b, a0 in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params),
                      jax.tree.leaves(init.params)):
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
  config = method_config('cmedl_cyclegan')
  config.optim.eps = 1.0
  init, plain, m_plain = run_one(config)
  config.model.remat = True
  _, remat, m_remat = run_one(config)
  for k in m_plain:
    tol = 1e-2 if k.startswith('grad_norm/') else 1e-5
    np.testing.assert_allclose(m_remat[k], m_plain[k], rtol=tol, atol=1e-6, err_msg=k)
  assert jax.tree.structure(plain.params) == jax.tree.structure(remat.params)
  for a, b, a0 in zip(jax.tree.leaves(plain.params), jax.tree.leaves(remat.params),
                      jax.tree.leaves(init.params)):
    a, b, a0 = np.asarray(a), np.asarray(b), np.asarray(a0)
    np.testing.assert_allclose(b - a0, a - a0, rtol=0, atol=5e-3 * np.abs(a - a0).max() + 4e-8)


def test_eval_step_outputs():
  config = method_config('cmedl_cyclegan')
  nets, state, _, _ = setup(config)
  out = ts.eval_step(state, make_batch(1, n=2)['image'], config=config, nets=nets,
                     with_translations=True)
  assert out['logits'].shape == (2, H, W, 2)
  assert out['pseudo_target'].shape == (2, H, W, 1)
  assert out['teacher_logits'].shape == (2, H, W, 2)
  assert out['cycle'].shape == (2, H, W, 1)
