"""CMEDL, weak teacher: T2w MRI student, CT teacher (source and target swapped).

Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg)
  config.data.source, config.data.target = config.data.target, config.data.source
  return config
