"""The CMEDL programs lower for GPU and TPU, checked on this CPU (issue 42).

`jax.export` lowers for ('cuda', 'tpu') (lowering only: there is no CUDA or TPU compiler here)
three programs of configs/cmedl.py (U-Net + CycleGAN, the default losses) at configs/tiny.py's
size: the joint train step, the eval step with translations, and the test-time network
cmedl_jax/portable.py exports. Each must lower, take and give what the program does, carry no
host callback, and carry no CPU-only code: the row-banded weight gradient of
cmedl_jax/models/layers.py, the `cpu` branch of a `lax.platform_dependent`.

What the lowered text shows (jax 0.10.2): `platform_dependent` is resolved while lowering.
cuda and tpu both take its `default`, so only the XLA weight gradient is emitted (a `case` on a
constant index, one branch kept); no switch on the platform index for it. A module for several
platforms takes the platform index as its first argument (`_platform_index`), and jax's own
per-platform lowering of `conv_general_dilated` switches on it between two identical branches:
such cases are expected and are not ours. The operations are told apart by their names (MLIR
locations): layers.BY_PLATFORM_SCOPE around the platform-dependent weight gradient,
layers.BANDED_SCOPE around its CPU branch. Host callbacks do not export at all (jax.export
raises), so they are also looked for in the programs' jaxprs, where they are named.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import method
from cmedl_jax import portable
from cmedl_jax import train_state
from cmedl_jax import train_step as ts
from cmedl_jax.models import layers
from configs import default
from configs import tiny
from data_prep import prepare

PLATFORMS = ('cuda', 'tpu')
# configs/default.py's global batch (4), not tiny's 8: the platform-dependent weight gradient
# is traced only for batches below layers.BANDED_WEIGHT_GRADIENT_BELOW_BATCH (8).
TRAIN_BATCH = default.get_config().train.global_batch_size
PROGRAMS = ('train_step', 'eval_step', 'probabilities')
CALLBACK_PRIMITIVES = {'debug_callback', 'debug_print', 'io_callback', 'pure_callback'}
# Host callbacks in StableHLO: custom calls xla_python_cpu_callback, xla_ffi_python_cpu_callback,
# xla_python_gpu_callback, xla_ffi_python_gpu_callback; send/recv host transfers (TPU); infeed,
# outfeed (the old host_callback).
CALLBACK_TARGET = re.compile(r'callback|host_transfer', re.IGNORECASE)
HOST_OPS = re.compile(r'\bstablehlo\.(send|recv|infeed|outfeed)\b')
CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([\w.$-]+)|call_target_name = "([^"]+)"')
# MLIR text: `#loc12 = loc("jit(f)/.../scope/op"(...))` names a location; an operation's line
# `%3 = stablehlo.op ... loc(#loc12)` or `%3 = "stablehlo.op"(...) ... loc(#loc12)` uses it.
LOCATION = re.compile(r'^(#loc\d+) = loc\("([^"]*)"', re.MULTILINE)
BRANCH = re.compile(r'/cond/branch_(\d+)_fun/')  # A branch of a cond kept in the lowering.
OPERATION = re.compile(r'^ *(?:%[^=]+= )?"?(\w+\.\w+)\b.*loc\((#loc\d+)\)$', re.MULTILINE)


def _config():
  """configs/cmedl.py at configs/tiny.py's size, its batch configs/default.py's (TRAIN_BATCH)."""
  config = tiny.get_config()  # cmedl.get_config() (U-Net + CycleGAN) at 32x32, few channels.
  config.train.global_batch_size = TRAIN_BATCH
  return config


def _batch(n, size, channels):
  """Abstract train batch: {'image' f32 [n,H,W,C], 'label' i32 [n,H,W], 'has_label' f32 [n]}."""
  return {
    'image': jax.ShapeDtypeStruct((n, size, size, channels), jnp.float32),
    'label': jax.ShapeDtypeStruct((n, size, size), jnp.int32),
    'has_label': jax.ShapeDtypeStruct((n,), jnp.float32),
  }


def _lower(fn, args, export=None):
  """{'args', 'jaxpr', 'out' (the program's output avals), 'exported' or 'error' (why not)} of
  jit(fn) on abstract `args`; `export(*args)` (default: jax.export for PLATFORMS) exports it."""
  jitted = jax.jit(fn)
  traced = jitted.trace(*args)
  program = {'args': args, 'jaxpr': traced.jaxpr, 'out': traced.out_info}
  try:
    program['exported'] = (export or jax.export.export(jitted, platforms=PLATFORMS))(*args)
  except Exception as e:  # pylint: disable=broad-except  # Reported by the test that needs it.
    program['error'] = f'{type(e).__name__}: {e}'
  return program


@pytest.fixture(scope='module')
def programs():
  """The three programs traced and lowered for PLATFORMS from abstract inputs (nothing runs)."""
  config = _config()
  size, channels = config.data.image_size, config.data.context_slices
  nets = method.build_networks(config, in_channels=channels)
  init = functools.partial(train_state.create_train_state, config, nets)
  state = jax.eval_shape(
    lambda r: init(r, (size, size, channels))[0], jax.random.PRNGKey(config.seed)
  )
  tx = train_state.make_optimizer(config)  # As train._Programs binds it.
  batch = _batch(TRAIN_BATCH, size, channels)
  images = jax.ShapeDtypeStruct((config.eval.batch_size, size, size, channels), jnp.float32)
  step = functools.partial(ts.train_step, config=config, nets=nets, tx=tx)
  evaluate = functools.partial(ts.eval_step, config=config, nets=nets, with_translations=True)
  # The test-time network as portable.write_portable exports it (portable.export_network:
  # symbolic batch and size), for PLATFORMS instead of its own; its variables zeros, as
  # portable.probabilities_fn closes over concrete ones.
  test_time = method.get(config).test_time
  variables = method.test_time_variables(test_time, state.params, state.batch_stats)
  params, stats = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
  probabilities = portable.probabilities_fn(config, params, stats, test_time, channels)

  def export_portable(*_):
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(portable, 'PLATFORMS', PLATFORMS)
      return portable.export_network(probabilities, (size, size, channels))

  m = prepare.WHOLE_FOV_MULTIPLE
  slices = jax.export.symbolic_shape(f'b, {m}*h, {m}*w, {channels}')
  return {
    'config': config,
    'train_step': _lower(step, (state, batch, batch)),
    'eval_step': _lower(evaluate, (state, images)),
    'probabilities': _lower(
      probabilities, (jax.ShapeDtypeStruct(slices, jnp.float32),), export_portable
    ),
  }


def _exported(programs, name):
  program = programs[name]
  if 'error' in program:
    pytest.fail(f'{name} does not lower for {PLATFORMS}: {program["error"][:3000]}')
  return program['exported']


def _text(programs, name):
  """The MLIR text of program `name`'s export (once per session)."""
  if 'text' not in programs[name]:
    programs[name]['text'] = _exported(programs, name).mlir_module()
  return programs[name]['text']


def _avals(tree):
  """(shape as strings, dtype) of every leaf of `tree` (symbolic dimensions as '32*h')."""
  return jax.tree.map(lambda a: (tuple(str(d) for d in a.shape), str(a.dtype)), tree)


def _equations(jaxpr):
  """Every equation of a (closed) jaxpr and of the jaxprs in its equations' params."""
  for eqn in getattr(jaxpr, 'jaxpr', jaxpr).eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
          yield from _equations(sub)


def _platform_dependent_sites(jaxpr):
  """How many `lax.platform_dependent` (cond on the platform) the program traces."""
  return sum(
    e.primitive.name == 'cond' and e.params.get('branches_platforms') is not None
    for e in _equations(jaxpr)
  )


def _in_scope(text, scope):
  """(Counter of the StableHLO operations, set of jax's names of them, indices of the kept
  branches of the conds) in MLIR `text` whose location is inside name scope `scope` (jax writes
  '.../scope/...', or 'transpose(jvp(scope))/...' under a transformation)."""
  inside = re.compile(rf'(^|[/(]){scope}($|[/)])')
  names = {loc: name for loc, name in LOCATION.findall(text) if inside.search(name)}
  ops = collections.Counter(op for op, loc in OPERATION.findall(text) if loc in names)
  branches = {int(i) for name in names.values() for i in BRANCH.findall(name)}
  return ops, {name.rsplit('/', 1)[-1] for name in names.values()}, branches


@pytest.mark.parametrize('name', PROGRAMS)
def test_lowers_for_cuda_and_tpu_with_the_programs_shapes(programs, name):
  exported = _exported(programs, name)
  program, config = programs[name], programs['config']
  assert exported.platforms == PLATFORMS
  takes = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  gives = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  assert _avals(takes) == _avals((program['args'], {}))
  assert _avals(gives) == _avals(program['out'])
  size, c, k = config.data.image_size, config.data.context_slices, config.data.num_classes
  if name == 'train_step':
    new_state, metrics = gives
    assert _avals(new_state) == _avals(program['args'][0])  # The state comes back as it went in.
    names = (*ts.TEACHER_TERMS, *ts.STUDENT_TERMS, 'hint', 'cycle')
    assert {f'loss/{n}' for n in names} <= set(metrics)
    assert set(_avals(metrics).values()) == {((), 'float32')}
  elif name == 'eval_step':
    n = str(config.eval.batch_size)
    image, logits = (
      ((n, str(size), str(size), str(c)), 'float32'),
      ((n, str(size), str(size), str(k)), 'float32'),
    )
    assert _avals(gives) == {
      'logits': logits,
      'teacher_logits': logits,
      'pseudo_target': image,
      'cycle': image,
    }
  else:  # Any batch, any multiple of 32 pixels: float32 slices -> float32 probabilities.
    m = prepare.WHOLE_FOV_MULTIPLE
    assert _avals(takes) == (((('b', f'{m}*h', f'{m}*w', str(c)), 'float32'),), {})
    assert _avals(gives) == (('b', f'{m}*h', f'{m}*w', str(k)), 'float32')


def _xla_weight_gradients_only(text):
  """Asserts that MLIR `text` has no operation of the CPU branch (layers.BANDED_SCOPE) and that
  each platform-dependent weight gradient kept one branch, XLA's convolution (no switch on the
  platform; 'platform_index': the index of the branch, a constant). Returns those operations."""
  banded, _, _ = _in_scope(text, layers.BANDED_SCOPE)
  assert not banded, f'the CPU-only banded weight gradient is lowered: {banded}'
  ops, names, branches = _in_scope(text, layers.BY_PLATFORM_SCOPE)
  assert branches <= {0}, f'a switch between {len(branches)} weight gradients: {names}'
  assert not ops or names - {'platform_index'} == {'cond', 'conv_general_dilated'}, names
  assert not ops or set(ops) - {'stablehlo.constant', 'stablehlo.return'} == {
    'stablehlo.convolution'
  }, ops
  return ops


@pytest.mark.parametrize('name', PROGRAMS)
def test_carries_no_cpu_only_code(programs, name):
  ops = _xla_weight_gradients_only(_text(programs, name))
  sites = _platform_dependent_sites(programs[name]['jaxpr'])
  if name != 'train_step':
    assert sites == 0 and not ops  # No gradient, so no weight gradient.
    return
  # The step's weight gradients of batches below layers.BANDED_WEIGHT_GRADIENT_BELOW_BATCH: a
  # convolution each, once per platform where jax lowers convolutions per platform (cuda and
  # tpu: two identical branches); jit drops unused ones (118 of the 122 traced here).
  assert 0 < ops['stablehlo.convolution'] <= len(PLATFORMS) * sites


@pytest.mark.parametrize('name', PROGRAMS)
def test_carries_no_host_callbacks_or_custom_calls(programs, name):
  callbacks = {e.primitive.name for e in _equations(programs[name]['jaxpr'])}
  callbacks &= CALLBACK_PRIMITIVES
  assert not callbacks, f'{name} calls the host: {sorted(callbacks)}'
  text = _text(programs, name)
  targets = {a or b for a, b in CUSTOM_CALL.findall(text)}
  assert not {t for t in targets if CALLBACK_TARGET.search(t)}, targets
  assert not HOST_OPS.search(text)
  # No custom call at all (they are platform-specific), but jax's checks of symbolic shapes.
  assert targets <= {'shape_assertion'}, targets


def test_the_banded_weight_gradient_is_found_where_it_is_lowered():
  """The checks above see the CPU branch where it is lowered: the weight gradient of one
  convolution of a single 32x32 image (banded on CPU) lowered for cpu alone has it, for cuda
  alone and for cuda and tpu XLA's, for cpu and cuda both under a switch on the platform index.
  A module for several platforms takes the platform index (`_platform_index`) as argument."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 2), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32)
  nhwc = ('NHWC', 'HWIO', 'NHWC')
  conv = functools.partial(
    layers.conv_general_dilated, window_strides=(1, 1), padding='SAME', dimension_numbers=nhwc
  )
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=1))
  for platforms, has_cpu_branch in (
    (('cpu',), True),
    (('cuda',), False),
    (PLATFORMS, False),
    (('cpu', 'cuda'), True),
  ):
    text = jax.export.export(grad, platforms=platforms)(x, kernel).mlir_module()
    assert ('_platform_index' in text) == (len(platforms) > 1), platforms
    if not has_cpu_branch:
      assert _xla_weight_gradients_only(text)['stablehlo.convolution'] == len(platforms)
      continue
    banded, _, _ = _in_scope(text, layers.BANDED_SCOPE)
    assert banded['stablehlo.gather'] == 1, platforms  # The bands of rows, gathered.
    _, _, branches = _in_scope(text, layers.BY_PLATFORM_SCOPE)
    assert branches == set(range(len(platforms))), platforms  # cpu: banded; cuda: XLA's.
    with pytest.raises(AssertionError, match='banded weight gradient is lowered'):
      _xla_weight_gradients_only(text)
