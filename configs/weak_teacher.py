"""CMEDL, weak teacher: T2w MRI student, CT teacher (source and target swapped).

Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".
"""

from configs import cmedl


def get_config(arg=None):
  return apply_setting(cmedl.get_config(arg, __file__))


def apply_setting(config):
  """Swaps source and target of an informative-teacher config (in place; returns it)."""
  config.data.source, config.data.target = config.data.target, config.data.source
  return config
