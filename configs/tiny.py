"""A few-pixel, few-channel CMEDL config for tests (seconds per compile on one CPU core).

Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg, __file__)
  config.data.image_size = 32
  cmedl.set_sizes(
    config,
    segmenter=dict(base_width=4, depth=2),
    translator=dict(ngf=4, n_blocks=1),
    discriminator=dict(ndf=4, n_layers=2),
    nce=dict(layers=(0, 4, 8), num_patches=16, num_features=32),
  )
  config.method.contextual_points = 64
  config.method.contextual_patch = 3
  config.train.update(
    global_batch_size=8, num_steps=4, log_every=1, image_every=2, eval_every=2, checkpoint_every=2
  )
  config.eval.batch_size = 8
  return config
