"""The one grammar of a config's argument, `--config=configs/NAME.py:ARG`.

ARG is a comma-separated list of values, each given by position (in the order of the config's
`ARG` keys) or as key=value; positional values come first. Spaces around a part and empty parts
are ignored. E.g. for configs/study.py (keys setting, method, segmenter, translator):
  informative,cmedl,densefcn,cut    weak,student_only,translator=cut    method=cmedl,setting=equal
"""

import os


def parse(config_file, arg, keys, required=()):
  """{key: value} of the keys that `arg` gives (None or '' gives none).

  config_file: the config's `__file__` (errors name it). keys: {key: allowed values}, in
  positional order; required: keys `arg` must give (the first ones). Raises ValueError, one line
  naming the config, the arg and the bad part.
  """
  names = list(keys)
  assert tuple(required) == tuple(names[: len(required)]), (required, names)
  usage = ''
  for i, k in enumerate(names):
    usage += ('' if k in required else '[') + (',' if i else '') + k.upper()
  usage += ']' * (len(names) - len(required))

  where = f'configs/{os.path.basename(config_file)}' + ('' if arg is None else f':{arg}')

  def error(problem):
    return ValueError(f'{where}: {problem} (expected {usage}, or KEY=VALUE parts)')

  given = {}
  by_name = False
  for part in (p.strip() for p in (arg or '').split(',')):
    if not part:
      continue
    key, is_named, value = (s.strip() for s in part.partition('='))
    if is_named:
      by_name = True
      if key not in keys:
        raise error(f'unknown key {key!r} in {part!r}, keys: {", ".join(names)}')
    else:
      if by_name:
        raise error(f'{part!r} by position after a key=value part')
      if len(given) == len(names):
        raise error(f'one value too many: {part!r}')
      key, value = names[len(given)], part
    if key in given:
      raise error(f'{key} given twice')
    if value not in keys[key]:
      raise error(f'{key} must be one of {", ".join(keys[key])}, got {value!r}')
    given[key] = value
  missing = [k for k in required if k not in given]
  if missing:
    raise error(f'missing {", ".join(missing)}')
  return given
