"""The ONNX copy of the test-time network (cmedl_jax.portable.onnx_network), for FC-DenseNet
and PSPNet students (U-Net: tests/test_predict.py checks the file the tiny run's training
wrote): valid ONNX (onnx's checker with full_check, strict shape inference, every intermediate
shape as onnx infers it), loaded by onnxruntime without warnings, and run alike by onnxruntime,
onnx's reference evaluator and jax. Tiny networks, 32 x 32 slices."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import reference
import pytest

from cmedl_jax import method
from cmedl_jax import portable
from configs import tiny

STUDENTS = {
  'densefcn': dict(
    name='densefcn', growth_rate=3, layers_per_block=(1, 1, 1, 1, 1), n_pool=2, first_filters=6
  ),
  'pspnet': dict(name='pspnet', base_width=4, blocks=(1, 1, 1, 1), aux_head=True),
}

# Runs an ONNX file with onnxruntime alone (neither jax nor this package), its warnings logged.
_ONNXRUNTIME_ALONE = """
import sys
sys.modules['cmedl_jax'] = sys.modules['data_prep'] = sys.modules['jax'] = None
import numpy as np
import onnxruntime
options = onnxruntime.SessionOptions()
options.log_severity_level = 1  # Info and above, warnings included.
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])
name = session.get_inputs()[0].name
np.save(sys.argv[3], session.run(None, {name: np.load(sys.argv[2])})[0])
"""


def onnxruntime_alone(path, x, tmp_path):
  """(onnxruntime's output on float32 x [B, H, W, C], the warnings and errors it logged: lines)
  of the ONNX file `path`, run in a process that can import neither jax nor this package."""
  np.save(tmp_path / 'x.npy', x)
  result = subprocess.run(
    [sys.executable, '-c', _ONNXRUNTIME_ALONE, str(path)]
    + [str(tmp_path / 'x.npy'), str(tmp_path / 'y.npy')],
    cwd=tmp_path,
    env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  logged = [line for line in result.stderr.splitlines() if re.search(r'\[[WE]:onnxruntime', line)]
  return np.load(tmp_path / 'y.npy'), logged


def _shapes(model):
  """{name: (element type, [dim value or name])} of a ModelProto's graph.value_info."""
  return {
    v.name: (
      v.type.tensor_type.elem_type,
      [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
    )
    for v in model.graph.value_info
  }


def assert_valid_onnx(path):
  """The ONNX file `path` passes onnx's checker (full_check) and strict shape inference, and
  records every intermediate shape (value_info) as onnx infers it from the graph (with data
  propagation: the shapes Reshape reads from Shape -> Concat)."""
  onnx.checker.check_model(str(path), full_check=True)
  model = onnx.load(path)
  onnx.shape_inference.infer_shapes(model, strict_mode=True)
  recorded = _shapes(model)
  del model.graph.value_info[:]
  inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
  assert recorded == _shapes(inferred)


@pytest.fixture(scope='module', params=sorted(STUDENTS))
def converted(request, tmp_path_factory):
  """(ONNX file, its record, 2 random slices [2, 32, 32, 1], jax's probabilities on them) of an
  initialised tiny `request.param` student, converted once per module."""
  config = tiny.get_config('unet,cyclegan')
  config.model.student.update(STUDENTS[request.param])
  nets = method.build_networks(config, in_channels=1)
  init = jax.jit(lambda x: nets.student.init(jax.random.key(0, impl='rbg'), x, train=False))
  variables = init(jnp.zeros((1, 32, 32, 1)))
  probabilities = portable.probabilities_fn(
    config,
    {'student': variables['params']},
    {'student': variables['batch_stats']},
    method.STUDENT,
    channels=1,
  )
  data, record = portable.onnx_network(probabilities, (32, 32, 1))
  assert data is not None, record
  path = tmp_path_factory.mktemp(request.param) / portable.ONNX
  path.write_bytes(data)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  return path, record, x, np.asarray(jax.jit(probabilities)(x))


def test_the_onnx_file_is_valid_onnx(converted):
  """Issue 44: jax2onnx 0.17.1 recorded NHWC shapes for Relus it had moved into NCHW."""
  path, record, _, _ = converted
  assert record['checker_full_check'] == record['strict_shape_inference'] == 'passed'
  assert record['file'] == portable.ONNX and record['max_abs_difference_vs_jax'] < 1e-5
  assert_valid_onnx(path)


def test_onnxruntime_loads_it_without_warnings_and_runs_it_as_jax(converted, tmp_path):
  path, _, x, want = converted
  got, logged = onnxruntime_alone(path, x, tmp_path)
  assert not logged  # E.g. '[W:onnxruntime:, graph.cc:128 MergeShapeInfo] Error merging ...'
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_onnx_reference_evaluator_runs_it_as_jax(converted):
  path, _, x, want = converted
  evaluator = reference.ReferenceEvaluator(str(path))
  got = evaluator.run(None, {evaluator.input_names[0]: x})[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
