"""Without TensorFlow (an optional extra: only augment_on='host' needs it): a process that cannot
import it prepares the tiny datasets (the TFDS build included), trains the tiny CMEDL config
with TensorBoard events, reads the events back, draws the curves and predicts; host
augmentation is a one-line error naming the install command.

The process hides TensorFlow itself (tiny_runs.WITHOUT_TENSORFLOW), so this runs the same with
and without TensorFlow installed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmedl_jax import input_pipeline
from tiny_runs import NUM_STEPS
from tiny_runs import ROOT
from tiny_runs import WITHOUT_TENSORFLOW

_PROGRAM = """
import importlib.util, json, pathlib, sys
from cmedl_jax import curves, input_pipeline, predict, train
import tiny_runs

root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = tiny_runs.small_config(root)
for side in ('source', 'target'):  # Prepared here, without TensorFlow.
  config.data[side].prepared_dir = str(out / 'prepared' / side)
logged = {}
def on_log(step, scalars):
  for tag, value in scalars.items():
    logged.setdefault(tag, {})[step] = value
train.train_and_evaluate(config, str(out / 'run'), on_log=on_log)
read = curves.read_scalars(str(out / 'run'))
images = tiny_runs.read_images(out / 'run')
curves.main(['--workdir', str(out / 'run'), '--out', str(out / 'curves')])
ct_test = root / 'raw' / 'thorax_ct' / 'imagesTs'
predict.main(['--workdir', str(out / 'run'), f'--input={ct_test}', f'--output={out}/predictions'])
try:
  input_pipeline.create_train_iterator(config.data.source.prepared_dir,
      config.data.target.prepared_dir, global_batch_size=8, seed=0, augment_on='host')
  host_error = None
except ImportError as e:
  host_error = str(e)
json.dump({
  'tensorflow_found': importlib.util.find_spec('tensorflow') is not None,
  'tensorflow_modules': sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'),
  'logged': {tag: sorted(by_step.items()) for tag, by_step in logged.items()},
  'read': {tag: [steps.tolist(), values.tolist()] for tag, (steps, values) in read.items()},
  'images': {tag: {s: list(x.shape) for s, x in steps.items()} for tag, steps in images.items()},
  'host_error': host_error,
}, open(out / 'result.json', 'w'))
"""


@pytest.fixture(scope='module')
def run_without_tensorflow(tiny_data, tmp_path_factory):
  """The JSON record of _PROGRAM run on the tiny phantoms, and its folder."""
  out = tmp_path_factory.mktemp('without_tensorflow')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'tests')]))
  done = subprocess.run(
    [sys.executable, '-c', WITHOUT_TENSORFLOW + _PROGRAM, str(tiny_data), str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-5000:]
  return json.loads((out / 'result.json').read_text()), out


@pytest.mark.slow
def test_training_writes_and_reads_tensorboard_without_tensorflow(run_without_tensorflow):
  """Every scalar the trainer logged (on_log: losses, norms, rates, speed, validation) is in the
  events at its steps with its float32 value; the images at their steps; curves and
  predictions written; TensorFlow never found nor imported."""
  record, out = run_without_tensorflow
  assert not record['tensorflow_found'] and record['tensorflow_modules'] == []
  logged, read = record['logged'], record['read']
  assert sorted(read) == sorted(logged)
  assert {'loss/student_seg', 'grad_norm/student', 'lr/student', 'val_dsc'} <= set(read)
  for tag, pairs in logged.items():
    steps, values = zip(*pairs)
    assert read[tag][0] == list(steps), tag
    np.testing.assert_array_equal(read[tag][1], np.float32(values), err_msg=tag)
  assert read['loss/student_seg'][0] == list(range(2, NUM_STEPS + 1, 2))  # train.log_every = 2.
  assert read['val_dsc'][0] == [4, 8]
  for tag in ('source', 'label', 'pseudo_target', 'prediction/inference'):
    shapes = record['images'][tag]
    assert sorted(shapes) == ['4', '8'], (tag, shapes)
    assert all(shape[1:] == [32, 32] for shape in shapes.values()), (tag, shapes)
  assert (out / 'curves.png').stat().st_size > 1000
  assert os.listdir(out / 'predictions')
  assert (out / 'run' / 'portable' / 'network.jax_export').is_file()


@pytest.mark.slow
def test_host_augmentation_without_tensorflow_is_a_one_line_error(run_without_tensorflow):
  error = run_without_tensorflow[0]['host_error']
  assert error is not None and '\n' not in error
  assert input_pipeline.TENSORFLOW_INSTALL in error and "augment_on='device'" in error


def test_the_readme_and_ci_install_the_tensorflow_the_error_names():
  """One TensorFlow version: the one the error names, README's optional extra and .ci/run's."""
  command = input_pipeline.TENSORFLOW_INSTALL
  assert command in (ROOT / 'README.md').read_text()
  assert command.replace('pip install', 'pip install -q') in (ROOT / '.ci' / 'run').read_text()
  assert 'tensorflow' not in (ROOT / 'requirements.txt').read_text().replace(
    'tensorflow-datasets', ''
  )
