"""Demo: a short CMEDL run on the phantoms that reaches a real student DSC in minutes on 2 CPU cores.

Small images (96x96 at 4 mm, the phantoms' whole 384 mm field of view) and narrow networks
(U-Net width 8, CycleGAN ngf 8 with 3 residual blocks); otherwise the paper's method and losses.
Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".

  python -m cmedl_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg, __file__)
  config.data.source.prepared_dir = 'data/prepared/demo_thorax_ct'
  config.data.target.prepared_dir = 'data/prepared/demo_thorax_t2w'
  config.data.image_size = 96
  config.data.spacing_mm = 4.0
  cmedl.set_sizes(
    config,
    segmenter=dict(base_width=8, depth=3),
    translator=dict(ngf=8, n_blocks=3),
    discriminator=dict(ndf=8, n_layers=2),
    nce=dict(layers=(0, 4, 8), num_patches=64, num_features=64),
  )
  config.method.contextual_points = 256
  config.optim.lr = 1e-3
  config.train.update(
    global_batch_size=8,
    num_steps=600,
    log_every=25,
    image_every=200,
    eval_every=200,
    checkpoint_every=100,
    keep_checkpoints=2,
  )
  config.eval.batch_size = 16
  return config
