"""CMEDL, informative teacher: CT student, T2w MRI teacher (the paper's main setting).

Arg (configs/args.py): "SEGMENTER[,TRANSLATOR]" picks the student/teacher network and the I2I
network, e.g.
  --config=configs/cmedl.py:densefcn,cut   (segmenter: unet|densefcn|pspnet; i2i: cyclegan|cut)
"""

from cmedl_jax import models
from configs import args
from configs import default

ARG = {'segmenter': models.SEGMENTERS, 'translator': models.TRANSLATORS}


def get_config(arg=None, config_file=__file__):
  """The default config with the networks `arg` names (errors name `config_file`)."""
  return set_networks(default.get_config(), **args.parse(config_file, arg, ARG))


def set_networks(config, segmenter=None, translator=None):
  """Sets student and teacher to `segmenter` and the translator to `translator` (None: keep)."""
  if segmenter:
    config.model.student.name = segmenter
    config.model.teacher.name = segmenter
  if translator:
    config.model.translator.name = translator
  return config


def set_sizes(config, segmenter, translator, discriminator, nce):
  """Updates the fields (configs/default.py) of both segmenters by the dict `segmenter`, and
  those of the translator, the discriminators and PatchNCE by theirs (in place; returns it)."""
  config.model.student.update(segmenter)
  config.model.teacher.update(segmenter)
  config.model.translator.update(translator)
  config.model.discriminator.update(discriminator)
  config.model.nce.update(nce)
  return config
