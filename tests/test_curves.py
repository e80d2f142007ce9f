"""Training curves from a run's TensorBoard events."""

from clu import metric_writers
import numpy as np

from cmedl_jax import curves


def test_curves_read_what_the_trainer_writes(tmp_path):
  writer = metric_writers.SummaryWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write_scalars(
      step, {'loss/student_seg': 1.0 / step, 'val_dsc': step / 100, 'perf/steps_per_sec': 2.0}
    )
  writer.write_images(30, {'source': np.zeros((1, 4, 4, 1), np.float32)})
  writer.write_scalars(20, {'loss/student_seg': 7.0})  # A resumed run rewrites step 20.
  writer.flush()
  scalars = curves.read_scalars(str(tmp_path))
  steps, values = scalars['loss/student_seg']
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_allclose(values, [0.1, 7.0, 1 / 30], rtol=1e-6)
  assert 'source' not in scalars
  out = tmp_path / 'out' / 'curves'
  assert curves.main(['--workdir', str(tmp_path), '--out', str(out)]) == 0
  assert (tmp_path / 'out' / 'curves.png').stat().st_size > 1000
  text = (tmp_path / 'out' / 'curves.md').read_text()
  assert '| loss/student_seg | 10 | 0.1 | 30 | 0.03333 |' in text
  assert '| val_dsc | 10 | 0.1 | 30 | 0.3 |' in text
  assert 'perf/' not in text
