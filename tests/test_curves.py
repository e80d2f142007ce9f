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


def test_the_teacher_s_validation_dsc_shares_the_student_s_panel(tmp_path, monkeypatch):
  """val_teacher_X is drawn, labelled, in the panel of val_X (not a panel of its own)."""
  writer = metric_writers.SummaryWriter(str(tmp_path))
  for step in (4, 8):
    writer.write_scalars(
      step, {'loss/student_seg': 1.0 / step, 'val_dsc': step / 10, 'val_teacher_dsc': step / 20}
    )
  writer.flush()
  figures = []
  monkeypatch.setattr(curves.plots, 'save_figure', lambda fig, path: figures.append(fig))
  assert curves.main(['--workdir', str(tmp_path), '--out', str(tmp_path / 'curves')]) == 0
  (fig,) = figures
  titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
  assert sorted(titled) == ['loss/student_seg', 'val_dsc']
  lines = titled['val_dsc'].get_lines()
  assert [line.get_label() for line in lines] == [
    'test-time net (val_dsc)',
    'teacher on G(x) (val_teacher_dsc)',
  ]
  np.testing.assert_allclose(lines[0].get_ydata(), [0.4, 0.8], rtol=1e-6)
  np.testing.assert_allclose(lines[1].get_ydata(), [0.2, 0.4], rtol=1e-6)
  assert [t.get_text() for t in titled['val_dsc'].get_legend().get_texts()] == [
    'test-time net (val_dsc)',
    'teacher on G(x) (val_teacher_dsc)',
  ]
