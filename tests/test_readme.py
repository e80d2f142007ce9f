"""The README: CI runs exactly its test command (block 2); docs/FAULTS.md, which it links, names
tests that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_readme_block_2():
  blocks = re.findall(r'```bash\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
  assert len(blocks) >= 2
  test_command = blocks[1].strip()
  ci_lines = [l.strip() for l in (ROOT / '.ci' / 'run').read_text().splitlines()]
  assert test_command in ci_lines
  assert 'pip install -q -r requirements.txt' in ci_lines
  assert 'pip install -r requirements.txt' in blocks[0]
  assert 'pip install -q --no-deps -r requirements-onnx.txt' in ci_lines
  assert 'pip install --no-deps -r requirements-onnx.txt' in blocks[0]


def test_the_faults_table_names_tests_that_exist():
  """docs/FAULTS.md (linked from the README) names existing tests, and has rows 1-14."""
  text = (ROOT / 'docs' / 'FAULTS.md').read_text()
  assert '(docs/FAULTS.md)' in (ROOT / 'README.md').read_text()
  named = re.findall(r'`(test_\w+)\.py::(\w+)', text)
  assert len(named) > 30
  for module, name in named:
    source = (ROOT / 'tests' / f'{module}.py').read_text()
    assert f'def {name}(' in source, f'{module}.py::{name}'
  rows = re.findall(r'^\| (\d+)[a-e]? \|', text, re.M)
  assert sorted(set(map(int, rows))) == list(range(1, 15))
