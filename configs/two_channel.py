"""Baseline: student on two channels, source and its pseudo-target; no teacher.

Arg as configs/cmedl.py.
"""

from configs import cmedl


def get_config(arg=None):
  return apply_method(cmedl.get_config(arg))


def apply_method(config):
  """Turns a CMEDL config into this baseline (in place; returns it)."""
  config.method.name = 'two_channel'
  config.method.distill = 'none'
  return config
