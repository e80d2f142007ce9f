"""CMEDL, equal teacher: abdominal T1w MRI student, T2w MRI teacher, 4 organs.

Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".
"""

from configs import cmedl


def get_config(arg=None):
  return apply_setting(cmedl.get_config(arg, __file__))


def apply_setting(config):
  """Turns an informative-teacher config into the abdominal T1w/T2w one (in place)."""
  config.data.source.update(
    name='abdomen_t1w',
    raw_dir='data/phantoms/abdomen_t1w',
    prepared_dir='data/prepared/abdomen_t1w',
    modality='mri',
  )
  config.data.target.update(
    name='abdomen_t2w',
    raw_dir='data/phantoms/abdomen_t2w',
    prepared_dir='data/prepared/abdomen_t2w',
    modality='mri',
  )
  config.data.num_classes = 5
  config.data.label_map = {'liver': 1, 'spleen': 2, 'kidney_left': 3, 'kidney_right': 4}
  config.data.augment.flip = False  # A left-right flip would swap the kidneys' sides.
  return config
