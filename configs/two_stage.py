"""Ablation: translator trained first (stage 1), then frozen while teacher and student train.

Arg (configs/args.py): "[STAGE[,SEGMENTER[,TRANSLATOR]]]", STAGE stage1 | stage2 (the default),
SEGMENTER and TRANSLATOR as in configs/cmedl.py. Stage 2 needs
  --config.method.translator_init=WORKDIR_OF_STAGE1
  python -m cmedl_jax.main --config=configs/two_stage.py:stage1 --workdir=runs/ts1
  python -m cmedl_jax.main --config=configs/two_stage.py:stage2 --workdir=runs/ts2 \
      --config.method.translator_init=runs/ts1
"""

from configs import args
from configs import cmedl
from configs import default

STAGES = ('stage1', 'stage2')
ARG = {'stage': STAGES, **cmedl.ARG}


def get_config(arg=None):
  given = args.parse(__file__, arg, ARG)
  stage = given.pop('stage', 'stage2')
  return apply_stage(cmedl.set_networks(default.get_config(), **given), stage)


def apply_stage(config, stage):
  """Makes a CMEDL config stage 1 (translator alone) or stage 2 (frozen translator)."""
  if stage == 'stage1':
    config.method.name = 'translator_only'
    config.method.distill = 'none'
  elif stage == 'stage2':
    config.method.freeze_translator = True
  else:
    raise ValueError(f'two-stage: stage must be one of {STAGES}, got {stage!r}')
  return config
