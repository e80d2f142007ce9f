"""Demo: a short CMEDL run on the phantoms in which the translator, the teacher and the student
all learn, within README block 1's budget on 2 CPU cores.

The paper's method and losses with the authors' defaults (configs/default.py); only sizes and the
training length are the demo's. 64x64 slices at 6 mm (the phantoms' whole 384 mm field of view),
narrow networks (U-Net width 8, depth 3; CycleGAN ngf 8 with 3 residual blocks; PatchGAN ndf 8,
2 layers) and Adam at lr 1e-3 [ours], as configs/study.py, whose pilot (docs/PILOT.md) saw the
teacher pass DSC 0.1 at step 500 and reach ~0.5 by step 1250. Chosen from measurements on the
README's 16 + 16 phantoms (seed 0), 2026-12-08, AMD EPYC, 2 cores:
- 96x96 at 4 mm, 600 steps (this config before): teacher validation DSC 0.00 at steps 200, 400
  and 600 (issue 43), student 0.00 / 0.61 / 0.51.
- 64x64 at 6 mm, 1500 steps: validation every 250 steps, student 0.22 / 0.56 / 0.60 / 0.60,
  teacher on its pseudo-MRI 0.00 / 0.10 / 0.43 / 0.47 (steps 250-1000).
- 64x64 at 6 mm, 1000 steps (this config): student 0.22 / 0.56 / 0.51 / 0.61, teacher 0.00 /
  0.10 / 0.44 / 0.43 at steps 250 / 500 / 750 / 1000 (the learning rate is constant to step
  500, then decays linearly to 0); on the 4 test CTs the student's DSC was 0.34 per case and it
  found 2 of 5 tumours: the 3 it missed are 0.9, 1.5 and 2.7 ml, 2-3 voxels across at 6 mm.
Validation every 250 steps gives the console's summary line its first and last point.
Arg as configs/cmedl.py: "SEGMENTER[,TRANSLATOR]".

  python -m cmedl_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from configs import cmedl


def get_config(arg=None):
  config = cmedl.get_config(arg, __file__)
  config.data.source.prepared_dir = 'data/prepared/demo_thorax_ct'
  config.data.target.prepared_dir = 'data/prepared/demo_thorax_t2w'
  config.data.image_size = 64
  config.data.spacing_mm = 6.0
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
    num_steps=1000,
    log_every=25,
    image_every=500,
    eval_every=250,
    checkpoint_every=250,
    keep_checkpoints=2,
  )
  config.eval.batch_size = 16
  return config
