"""Baseline: translator + teacher; at test time the teacher segments the pseudo-target.

Arg as configs/cmedl.py.
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg)
  config.method.name = 'pmri_teacher'
  config.method.distill = 'none'
  return config
