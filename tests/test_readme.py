"""CI runs exactly the README's test command (block 2)."""

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
