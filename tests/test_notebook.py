"""CI executes the Colab demo notebook top to bottom; a failing cell fails the test."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv('CMEDL_DEMO_DIR', str(tmp_path))
  # Brief, tiny networks: the cells run, the demo is not judged.
  monkeypatch.setenv('CMEDL_DEMO_STEPS', '20')
  monkeypatch.setenv('CMEDL_DEMO_CONFIG', 'tiny')
  nb = nbformat.read(ROOT / 'notebooks' / 'cmedl_demo.ipynb', as_version=4)
  NotebookClient(
    nb,
    timeout=900,
    kernel_name='python3',
    resources={'metadata': {'path': str(ROOT / 'notebooks')}},
  ).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert "'dice'" in text and "'hd95'" in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 3  # Live loss plot, the networks' views, the overlay.
  assert (tmp_path / 'run' / 'export').is_dir()
