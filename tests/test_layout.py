"""The code's layout: one formatting, short functions, imports that go one way.

These read the source (no jax): a reformatted-by-hand file, a long function, an import cycle
or the trainer importing a command-line module fails here, naming the place.
"""

import ast
import pathlib
import shutil
import subprocess
import sys

from tiny_runs import ROOT

PACKAGES = ('cmedl_jax', 'data_prep')
# Held to the same function length (not part of the import graph: nothing imports them).
SCRIPT_PACKAGES = ('benchmarks',)
MAX_FUNCTION_LINES = 60
# The phantom generator's anatomy (long, linear descriptions of a body) is exempt.
LONG_FUNCTIONS_ALLOWED = {'data_prep/phantoms.py:_place_tumors'}
CLI_MODULES = {'cmedl_jax.main', 'cmedl_jax.predict', 'cmedl_jax.evaluate', 'cmedl_jax.curves'}


def _sources():
  return sorted(p for package in PACKAGES for p in (ROOT / package).rglob('*.py'))


def _script_sources():
  return sorted(p for package in SCRIPT_PACKAGES for p in (ROOT / package).rglob('*.py'))


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path):
  """Modules of PACKAGES that `path` imports (at any depth of the file)."""
  modules = {_module_name(p) for p in _sources()}
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from package import module` imports the module; `from module import name` the module.
      for a in node.names:
        found.add(
          f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
        )
  return {n for n in found if n in modules} - {_module_name(path)}


def test_no_function_is_longer_than_60_lines():
  long = []
  for path in _sources() + _script_sources():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        name = f'{path.relative_to(ROOT)}:{node.name}'
        if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED:
          long.append(f'{name} ({lines} lines, line {node.lineno})')
  assert not long, long


def test_imports_have_no_cycle_and_the_trainer_imports_no_command_line_module():
  graph = {_module_name(p): _imports(p) for p in _sources()}

  def reach(start):
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        todo.extend(graph.get(m, ()))
    return seen

  cycles = sorted(m for m in graph if m in reach(m))
  assert not cycles, f'modules on an import cycle: {cycles}'
  assert not reach('cmedl_jax.train') & CLI_MODULES, reach('cmedl_jax.train') & CLI_MODULES


def test_the_code_is_as_the_formatter_writes_it():
  """`ruff format` (settings in pyproject.toml: 2-space indents, single quotes, 100 columns,
  as the Flax examples) leaves every Python file as it is."""
  ruff = shutil.which('ruff', path=str(pathlib.Path(sys.executable).parent))  # requirements.txt
  assert ruff, 'ruff is not installed beside this python (pip install -r requirements.txt)'
  result = subprocess.run(
    [ruff, 'format', '--check', '--diff', '.'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
