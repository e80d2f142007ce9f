"""The configs' one ARG grammar (configs/args.py) and the configs built with it."""

import pytest

from configs import args
from configs import baseline
from configs import cmedl
from configs import study
from configs import tiny
from configs import two_stage

KEYS = {'a': ('x', 'y'), 'b': ('u', 'v'), 'c': ('p', 'q')}


def test_parse_positional_and_by_name():
  parse = lambda arg, required=(): args.parse('configs/t.py', arg, KEYS, required)
  assert parse(None) == parse('') == parse(' , ') == {}
  assert parse('x') == parse('a=x') == parse(' x , ') == {'a': 'x'}
  assert (
    parse('x,v,q') == parse('x,c=q,b=v') == parse('c = q,a=x,b=v') == {'a': 'x', 'b': 'v', 'c': 'q'}
  )
  assert parse('b=u') == {'b': 'u'}
  assert parse('y,u', required=('a', 'b')) == {'a': 'y', 'b': 'u'}


@pytest.mark.parametrize(
  'arg, required, problem',
  [
    ('z', (), "a must be one of x, y, got 'z'"),
    ('x,u,p,x', (), "one value too many: 'x'"),
    ('b=u,x', (), "'x' by position after a key=value part"),
    ('d=x', (), "unknown key 'd' in 'd=x', keys: a, b, c"),
    ('x,a=y', (), 'a given twice'),
    ('x', ('a', 'b'), 'missing b'),
  ],
)
def test_parse_errors_name_the_config_and_the_bad_part(arg, required, problem):
  with pytest.raises(ValueError) as e:
    args.parse('/somewhere/configs/t.py', arg, KEYS, required)
  usage = 'A,B[,C]' if required else '[A[,B[,C]]]'
  assert str(e.value) == (f'configs/t.py:{arg}: {problem} (expected {usage}, or KEY=VALUE parts)')


def test_configs_read_their_arg():
  c = cmedl.get_config('pspnet,cut')
  assert (c.model.student.name, c.model.teacher.name, c.model.translator.name) == (
    'pspnet',
    'pspnet',
    'cut',
  )
  assert cmedl.get_config('translator=cut').to_json() == cmedl.get_config('unet,cut').to_json()
  with pytest.raises(ValueError, match=r'^configs/tiny.py:cut: segmenter must be one of'):
    tiny.get_config('cut')
  for method in baseline.METHODS:
    c = baseline.get_config(f'{method},densefcn')
    assert (c.method.name, c.method.distill, c.model.student.name) == (method, 'none', 'densefcn')
  with pytest.raises(ValueError, match=r'^configs/baseline.py: missing method'):
    baseline.get_config()
  assert two_stage.get_config().method.freeze_translator
  assert two_stage.get_config('stage1,pspnet').method.name == 'translator_only'
  c = study.get_config('weak,two_channel,translator=cut')
  assert (c.data.source.name, c.method.name, c.model.translator.name) == (
    'thorax_t2w',
    'two_channel',
    'cut',
  )
  assert study.get_config().to_json() == study.get_config('informative,cmedl').to_json()
