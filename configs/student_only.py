"""Baseline: the student alone on source images (no translator, no teacher, no distillation).

Arg as configs/cmedl.py (the translator part is ignored).
"""

from configs import cmedl


def get_config(arg=None):
  return apply_method(cmedl.get_config(arg))


def apply_method(config):
  """Turns a CMEDL config into this baseline (in place; returns it)."""
  config.method.name = 'student_only'
  config.method.distill = 'none'
  return config
