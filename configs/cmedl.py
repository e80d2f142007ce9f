"""CMEDL, informative teacher: CT student, T2w MRI teacher (the paper's main setting).

Arg: "SEGMENTER[,TRANSLATOR]" picks the student/teacher network and the I2I network, e.g.
  --config=configs/cmedl.py:densefcn,cut   (segmenter: unet|densefcn|pspnet; i2i: cyclegan|cut)
"""

from configs import default

SEGMENTERS = ('unet', 'densefcn', 'pspnet')
TRANSLATORS = ('cyclegan', 'cut')


def apply_arg(config, arg):
  """Sets student, teacher and translator from "SEGMENTER[,TRANSLATOR]" (empty: keep)."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if len(parts) > 2:
    raise ValueError(f'config arg {arg!r}: expected "SEGMENTER[,TRANSLATOR]"')
  if parts:
    if parts[0] not in SEGMENTERS:
      raise ValueError(f'config arg {arg!r}: segmenter must be one of {SEGMENTERS}')
    config.model.student.name = parts[0]
    config.model.teacher.name = parts[0]
  if len(parts) == 2:
    if parts[1] not in TRANSLATORS:
      raise ValueError(f'config arg {arg!r}: translator must be one of {TRANSLATORS}')
    config.model.translator.name = parts[1]
  return config


def get_config(arg=None):
  return apply_arg(default.get_config(), arg)
