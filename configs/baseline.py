"""Baselines: the CMEDL config with another method and no distillation.

Arg (configs/args.py): "METHOD[,SEGMENTER[,TRANSLATOR]]", SEGMENTER and TRANSLATOR as in
configs/cmedl.py, METHOD one of
  student_only   the student alone on source images (no translator, no teacher; the
                 translator part is ignored)
  two_channel    student on two channels, source and its pseudo-target; no teacher
  pmri_teacher   translator + teacher; at test time the teacher segments the pseudo-target
e.g.  python -m cmedl_jax.main --config=configs/baseline.py:student_only --workdir=runs/baseline
"""

from configs import args
from configs import cmedl
from configs import default

METHODS = ('student_only', 'two_channel', 'pmri_teacher')
ARG = {'method': METHODS, **cmedl.ARG}


def get_config(arg=None):
  given = args.parse(__file__, arg, ARG, required=('method',))
  method = given.pop('method')
  return apply_method(cmedl.set_networks(default.get_config(), **given), method)


def apply_method(config, method):
  """Turns a CMEDL config into the baseline `method` (in place; returns it)."""
  if method not in METHODS:
    raise ValueError(f'baseline: method must be one of {METHODS}, got {method!r}')
  config.method.name = method
  config.method.distill = 'none'
  return config
