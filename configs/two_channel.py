"""Baseline: student on two channels, source and its pseudo-target; no teacher.

Arg as configs/cmedl.py.
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg)
  config.method.name = 'two_channel'
  config.method.distill = 'none'
  return config
