"""Baseline: translator + teacher; at test time the teacher segments the pseudo-target.

Arg as configs/cmedl.py.
"""

from configs import cmedl


def get_config(arg=None):
  return apply_method(cmedl.get_config(arg))


def apply_method(config):
  """Turns a CMEDL config into this baseline (in place; returns it)."""
  config.method.name = 'pmri_teacher'
  config.method.distill = 'none'
  return config
