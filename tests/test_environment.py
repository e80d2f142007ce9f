"""WORKDIR/environment.json: what a run trained with, and a warning on a resume elsewhere."""

import json

import jax

from cmedl_jax import environment


def test_a_run_records_its_environment_and_a_resume_elsewhere_warns(tmp_path, caplog):
  assert environment.record(str(tmp_path)) == []
  saved = json.loads((tmp_path / 'environment.json').read_text())
  current = saved['current']
  assert current['packages']['jax'] == jax.__version__
  assert current['devices']['count'] == jax.device_count() == 8
  assert '--xla_force_host_platform_device_count=8' in current['xla_flags']
  assert len(current['git']['commit']) == 40 and isinstance(current['git']['dirty'], bool)
  assert environment.record(str(tmp_path)) == []  # Same environment: no warning, no entry.
  assert len(json.loads((tmp_path / 'environment.json').read_text())['history']) == 1

  saved['current']['packages']['jax'] = '0.0.1'
  saved['current']['devices']['count'] = 1
  (tmp_path / 'environment.json').write_text(json.dumps(saved))
  with caplog.at_level('WARNING'):
    changes = environment.record(str(tmp_path))
  assert changes == ['devices.count: 1 -> 8', f"packages.jax: '0.0.1' -> '{jax.__version__}'"]
  assert 'another environment' in caplog.text and 'packages.jax' in caplog.text
  history = json.loads((tmp_path / 'environment.json').read_text())['history']
  assert len(history) == 2 and history[-1]['packages']['jax'] == jax.__version__
