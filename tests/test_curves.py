"""TensorBoard events: cmedl_jax.summary_writer writes them (without TensorFlow), TensorBoard's
readers and cmedl_jax.curves read them."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cmedl_jax import curves
from cmedl_jax import summary_writer
from tiny_runs import read_images
from tiny_runs import ROOT


def test_curves_read_what_the_trainer_writes(tmp_path):
  writer = summary_writer.SummaryWriter(str(tmp_path))
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
  writer = summary_writer.SummaryWriter(str(tmp_path))
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


def test_images_read_back_as_written(tmp_path):
  """Float images in [0, 1] ([N, H, W, 1] or one [H, W, 1]) as TensorFlow converts them (x 255.5,
  truncated), uint8 as they are; grey and RGB; several writers (a resumed run) in one folder."""
  rng = np.random.default_rng(0)
  grey = rng.random((3, 5, 7, 1)).astype(np.float32)
  rgb = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  writer = summary_writer.SummaryWriter(str(tmp_path))
  writer.write_images(4, {'grey': grey, 'rgb': rgb, 'one': grey[0]})
  writer.close()
  later = summary_writer.SummaryWriter(str(tmp_path))
  later.write_images(8, {'grey': np.ones((1, 5, 7, 1), np.float32)})
  later.flush()
  images = read_images(tmp_path)
  np.testing.assert_array_equal(images['grey'][4], (grey[..., 0] * 255.5).astype(np.uint8))
  np.testing.assert_array_equal(images['one'][4], images['grey'][4][:1])
  np.testing.assert_array_equal(images['rgb'][4], rgb)
  np.testing.assert_array_equal(images['grey'][8], np.full((1, 5, 7), 255, np.uint8))


def test_without_a_folder_nothing_is_written(tmp_path, monkeypatch):
  """The writer of the processes other than 0."""
  monkeypatch.chdir(tmp_path)
  writer = summary_writer.SummaryWriter(None)
  writer.write_scalars(1, {'loss/x': 1.0})
  writer.write_images(1, {'source': np.zeros((1, 4, 4, 1), np.float32)})
  writer.close()
  assert not os.listdir(tmp_path)


def test_a_failed_write_is_raised_by_the_next_flush(tmp_path):
  writer = summary_writer.SummaryWriter(str(tmp_path))
  writer.write_scalars(1, {'loss/x': 'not a number'})
  with pytest.raises(Exception, match='ASYNCHRONOUSLY'):
    writer.flush()


def test_training_and_writing_import_no_tensorflow(tmp_path):
  """The trainer and its writer need no TensorFlow: where it is installed it stays unimported
  (its import takes seconds and, on a GPU, it may reserve memory)."""
  code = (
    'import sys, numpy as np; from cmedl_jax import summary_writer, train; '
    f'w = summary_writer.SummaryWriter({str(tmp_path)!r}); w.write_scalars(1, {{"x": 1.0}}); '
    'w.write_images(1, {"y": np.zeros((1, 4, 4, 1))}); w.close(); '
    'print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]', out.stdout
  assert len(curves.read_scalars(str(tmp_path))['x'][0]) == 1


@pytest.mark.tensorflow
def test_the_events_are_those_clu_writes_with_tensorflow(tmp_path):
  """The same scalars and images through clu's SummaryWriter (tf.summary): equal when read back."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  images = {'source': rng.random((2, 6, 5, 1)).astype(np.float32)}
  scalars = {'loss/a': 0.1, 'val_dsc': 1 / 3, 'lr/student': 2e-4}
  for name, writer in (
    ('ours', summary_writer.SummaryWriter(str(tmp_path / 'ours'))),
    ('clu', metric_writers.SummaryWriter(str(tmp_path / 'clu'))),
  ):
    for step in (2, 4):
      writer.write_scalars(step, {k: v * step for k, v in scalars.items()})
      writer.write_images(step, {k: v / step for k, v in images.items()})
    writer.close()
  ours, theirs = (curves.read_scalars(str(tmp_path / n)) for n in ('ours', 'clu'))
  assert ours.keys() == theirs.keys() == scalars.keys()
  for tag in scalars:
    np.testing.assert_array_equal(ours[tag][0], theirs[tag][0])
    np.testing.assert_array_equal(ours[tag][1], theirs[tag][1])
  ours, theirs = (read_images(tmp_path / n) for n in ('ours', 'clu'))
  assert ours.keys() == theirs.keys() == images.keys()
  for step in (2, 4):
    np.testing.assert_array_equal(ours['source'][step], theirs['source'][step])
