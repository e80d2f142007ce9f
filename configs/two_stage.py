"""Ablation: translator trained first (stage 1), then frozen while teacher and student train.

Arg: "STAGE[,SEGMENTER[,TRANSLATOR]]", STAGE in {stage1, stage2}. Stage 2 needs
  --config.method.translator_init=WORKDIR_OF_STAGE1
  python -m cmedl_jax.main --config=configs/two_stage.py:stage1 --workdir=runs/ts1
  python -m cmedl_jax.main --config=configs/two_stage.py:stage2 --workdir=runs/ts2 \
      --config.method.translator_init=runs/ts1
"""

from configs import cmedl


def get_config(arg=None):
  stage, _, rest = (arg or 'stage2').partition(',')
  return apply_stage(cmedl.get_config(rest), stage)


def apply_stage(config, stage):
  """Makes a CMEDL config stage 1 (translator alone) or stage 2 (frozen translator)."""
  if stage == 'stage1':
    config.method.name = 'translator_only'
    config.method.distill = 'none'
  elif stage == 'stage2':
    config.method.freeze_translator = True
  else:
    raise ValueError(f'two-stage: stage must be stage1 or stage2, got {stage!r}')
  return config
