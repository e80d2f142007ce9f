"""Default CMEDL configuration: every field is documented here, once.

Other configs start from `default.get_config()` and change what they need. The default is the
paper's informative-teacher setting (student on CT, teacher on T2w MRI) with U-Net student and
teacher and a CycleGAN translator, at 256x256.

Run: python -m cmedl_jax.main --config=configs/cmedl.py --workdir=runs/x
"""

import ml_collections
from ml_collections.config_dict import placeholder

from cmedl_jax import input_pipeline
from cmedl_jax import models
from data_prep import prepare


def get_config(arg=None):
  """Returns the default config. `arg` is unused (kept for the `file.py:arg` convention)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # One seed for initialisation, data order and augmentation.

  # --------------------------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  # Source = the student's modality, target = the teacher's. Each side is one dataset folder in
  # the MSD / nnU-Net layout (`raw_dir`), prepared once into `prepared_dir`.
  c.data.source = ml_collections.ConfigDict(
    dict(
      name='thorax_ct',  # Free-form name used in logs.
      raw_dir='data/phantoms/thorax_ct',  # dataset.json, imagesTr/, labelsTr/, imagesTs/.
      prepared_dir='data/prepared/thorax_ct',
      modality='ct',  # 'ct' (HU window) or 'mri' (percentile clip).
      # This side's label map (see data.label_map), for sets whose labels are named apart, e.g.
      # {'cancer': 1} (MSD Task06_Lung) or 'cancer=1' (as prepare's --label-map); None: the
      # shared data.label_map.
      label_map=placeholder(object),
      # Train on only the first N cases of the prepared training split (0: all), e.g. the
      # label-scarce cells of the study's premise factorial (docs/STUDY_PLAN.md). [ours]
      train_cases=0,
    )
  )
  c.data.target = ml_collections.ConfigDict(
    dict(
      name='thorax_t2w',
      raw_dir='data/phantoms/thorax_t2w',
      prepared_dir='data/prepared/thorax_t2w',
      modality='mri',
      label_map=placeholder(object),
      # A TFDS dataset folder (tfds.builder_from_directory's) to train this side from instead
      # of raw_dir/prepared_dir, e.g. one you built: split 'train', an 'image' feature [H, W]
      # or [H, W, 1] of data.image_size with values in [-1, 1], optionally 'label' [H, W]
      # (this side's class indices) and 'case_id' (for context_slices > 1). '' : none. [ours]
      tfds_dir='',
    )
  )
  # Whether the teacher also trains on labelled real target images. [authors' code] False:
  # PSIGAN's MRI segmenter learns from pseudo-MRI with CT labels only (it loads the real MRI
  # labels, no loss uses them); True gives the teacher supervision the student never sees.
  c.data.target_labels = False
  # Whether source and target are co-registered renderings of the same cases (same case ids and
  # slices, e.g. data_prep.phantoms --paired-out): each target example is then the source
  # example's slice, same augmentation (cmedl_jax/input_pipeline.py). Method paired_teacher
  # needs it. [ours; the positive control of issue 46]
  c.data.paired = False
  c.data.num_classes = 2  # Including background.
  # Label remapping, raw label (name in dataset.json, or its value as a string) -> class index,
  # for both sides unless data.source.label_map / data.target.label_map is set. Labels not listed
  # become background. On the command line: --config.data.label_map="{'tumor': 1}".
  c.data.label_map = ml_collections.ConfigDict({'tumor': 1})
  # Defaults of the preparation (data_prep/prepare.py) and the input pipeline (cmedl_jax/
  # input_pipeline.py), written there once.
  c.data.spacing_mm = prepare.SPACING_MM  # In-plane spacing after resampling, mm.
  c.data.image_size = prepare.IMAGE_SIZE  # In-plane size after crop/pad (square), voxels.
  c.data.ct_window_hu = prepare.CT_WINDOW_HU  # CT clip window in HU, mapped to [-1, 1].
  c.data.mri_percentiles = prepare.MRI_PERCENTILES  # MRI clip percentiles (per volume) -> [-1, 1].
  c.data.val_fraction = prepare.VAL_FRACTION  # Fraction of imagesTr cases held out for validation.
  c.data.foreground_ratio = input_pipeline.FOREGROUND_RATIO  # Fraction drawn with foreground.
  c.data.context_slices = 1  # 2.5D input: k neighbouring slices as channels (odd).
  # Augmentation: flip (random left-right flip; True = probability 0.5), rotate_deg (max absolute
  # in-plane rotation, degrees), scale (max relative isotropic scale change), intensity (max
  # intensity shift and relative contrast change, in [-1, 1] units); flip_ud (up-down flip, off)
  # may be added.
  c.data.augment = ml_collections.ConfigDict(input_pipeline.DEFAULT_AUGMENT)
  c.data.prefetch = input_pipeline.PREFETCH  # Batches prefetched onto the devices.

  # ------------------------------------------------------------------------------- models
  c.model = ml_collections.ConfigDict()
  c.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params f32).
  # Rematerialisation: recompute each block's activations (U-Net conv-BN-ReLU, ResNet block,
  # dense block, residual block) in the backward pass instead of keeping them: less memory for
  # larger batches or images, about one more forward pass of compute. Same results.
  c.model.remat = False
  # Segmenters: name in {'unet', 'densefcn', 'pspnet'}; unset fields take the network's
  # defaults (its module's field defaults: models.UNet, models.DenseFCN, models.PSPNet).
  c.model.student = segmenter_config('unet')
  c.model.teacher = segmenter_config('unet')
  # Translator: 'cyclegan' (two generators + cycle), 'cut' (one generator + PatchNCE); the
  # generator's width and residual blocks, default: models.ResnetGenerator's.
  c.model.translator = ml_collections.ConfigDict(
    dict(name='cyclegan', ngf=models.ResnetGenerator.ngf, n_blocks=models.ResnetGenerator.n_blocks)
  )
  # PatchGAN discriminators: width, strided conv layers (default: models.PatchGAN's).
  c.model.discriminator = ml_collections.ConfigDict(
    dict(ndf=models.PatchGAN.ndf, n_layers=models.PatchGAN.n_layers)
  )
  # CUT's PatchNCE: generator layers tapped, patches per layer, MLP width (default:
  # models.PatchSampleMLP's), temperature.
  c.model.nce = ml_collections.ConfigDict(
    dict(
      layers=(0, 4, 8, 12, 16),
      num_patches=256,
      num_features=models.PatchSampleMLP.num_features,
      temperature=0.07,
    )
  )

  # ------------------------------------------------------------------------------- method
  c.method = ml_collections.ConfigDict()
  # 'cmedl'           translator + teacher on pseudo-target + student with distillation.
  # 'student_only'    student on source alone (no translator, no teacher).
  # 'two_channel'     student on [source, pseudo-target] channels, no teacher.
  # 'pmri_teacher'    translator + teacher; at test time the teacher segments the translation.
  # 'translator_only' translator alone (stage 1 of the two-stage ablation).
  # Provenance of each default: [paper] the CMEDL paper, [authors' code] their public PSIGAN
  # code (same lab, same CycleGAN + jointly trained segmenter design), [CycleGAN] Zhu et al.
  # 2017 / its code, [ours] where both are silent (a pilot on the phantoms is to settle them).
  c.method.name = 'cmedl'  # [paper]
  c.method.distill = 'hint'  # 'hint', 'kl' or 'none'. [paper] hint (feature) distillation.
  c.method.hint_taps = ('penultimate', 'last')  # Feature taps paired by the hint loss. [paper]
  # 'l2', 'l1', 'cosine', or 'relative_l2' (|s - t|^2 / |t|^2: scale-free; ours). [paper] l2.
  c.method.hint_kind = 'l2'
  # 1x1-conv adapters from student to teacher widths: 'auto' (only where widths differ; ours),
  # 'always' (FitNets' regressor at every tap), 'none' (widths must match). [ours] auto.
  c.method.hint_adapters = 'auto'
  # Hint weight ramped linearly from 0 over this fraction of train.num_steps. [ours] 0 = off.
  c.method.hint_warmup = 0.0
  c.method.kl_temperature = 2.0  # [ours] (Hinton et al. 2015 use 2-20.)
  # Whether the hint's gradient trains the teacher, and reaches the translator through the
  # pseudo-target. [ours] both off: the hint trains the student (and its adapters) only.
  c.method.hint_trains_teacher = False
  c.method.hint_trains_translator = False
  # Teacher batch norm with real target images (data.target_labels): 'separate' passes for
  # pseudo-target and real target (running statistics: the pseudo-target's, which it meets at
  # test time; ours), or 'joint' (one pass over both, as this code did before 2026-12).
  c.method.teacher_bn = 'separate'
  c.method.freeze_translator = False  # Two-stage: translator fixed (loaded from init_from).
  c.method.translator_init = ''  # Workdir of a 'translator_only' run to load from.
  # Fake-image history pool size for the discriminators (0 = off). [CycleGAN] and [authors'
  # code]: 50.
  c.method.history_pool = 50
  # Contextual loss features: 'patches' (raw contextual_patch x contextual_patch intensity
  # patches) or 'random_conv' (a fixed random conv net; the paper family used VGG features,
  # which need a download). [ours] patches.
  c.method.contextual_features = 'patches'
  c.method.contextual_patch = 5  # 'patches' only: patch side (pixels). [ours]
  c.method.contextual_points = 1024  # Contextual loss: feature locations sampled per image.

  # ------------------------------------------------------------------------ loss weights
  c.loss = ml_collections.ConfigDict(
    dict(
      gan=1.0,  # LSGAN generator terms.
      cycle=10.0,  # CycleGAN L1 cycle, lambda.
      identity=0.5,  # CycleGAN identity, as a fraction of `cycle` (0.5 * lambda).
      nce=1.0,  # CUT PatchNCE (and identity PatchNCE on target images).
      nce_identity=True,
      contextual=1.0,  # Contextual loss between source and its translation.
      teacher_seg=1.0,  # Teacher CE+Dice on pseudo-target (and real target when labelled).
      # Scale of the teacher's segmentation gradient into the translator (0: none; the teacher
      # itself always gets its full gradient). PSIGAN's CE is averaged twice (over pixels, then
      # again by their count), so its effective scale is ~1 / (B * H * W). [ours, pilot] 1: at
      # the authors' scale neither teacher nor student did better (docs/PILOT.md, one seed).
      seg_to_translator=1.0,
      student_seg=1.0,  # Student CE+Dice on source.
      ce=1.0,  # Weight of cross-entropy inside a segmentation loss.
      dice=1.0,  # Weight of soft Dice inside a segmentation loss.
      hint=1.0,  # Distillation weight (hint or KL).
    )
  )

  # ---------------------------------------------------------------------------- optimiser
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=2e-4,
      b1=0.5,
      b2=0.999,
      eps=1e-8,
      # Learning rate constant for this fraction of num_steps, then linear decay to 0.
      constant_fraction=0.5,
      # Per-group multipliers of lr: translator, discriminator, teacher, student.
      lr_scale=ml_collections.ConfigDict(
        dict(translator=1.0, discriminator=1.0, teacher=1.0, student=1.0)
      ),
    )
  )

  # ---------------------------------------------------------------------------- training
  c.train = ml_collections.ConfigDict(
    dict(
      global_batch_size=4,  # Sharded over all devices on the 'data' mesh axis.
      num_steps=20000,
      log_every=50,  # Console + TensorBoard scalars.
      image_every=1000,  # TensorBoard image summaries.
      eval_every=1000,  # Whole-volume validation.
      checkpoint_every=1000,
      keep_checkpoints=3,  # Latest K kept (plus the best by validation DSC).
    )
  )

  c.eval = ml_collections.ConfigDict(
    dict(
      batch_size=16,  # Slices per inference batch (global).
      tolerance_mm=2.0,  # Surface Dice tolerance.
      max_volumes=0,  # Validate on at most this many volumes (0 = all).
    )
  )
  return c


def segmenter_config(name):
  """A segmenter's fields; None = the network's default (its module's, see cmedl_jax/models)."""
  return ml_collections.ConfigDict(
    dict(
      name=name,
      # U-Net: width of the first level (doubles per level), levels, 'transpose' | 'resize' up.
      base_width=placeholder(int),
      depth=placeholder(int),
      up=placeholder(str),
      # FC-DenseNet: 56 | 67 | 103, or explicit growth rate / layers per dense block / pools.
      variant=placeholder(int),
      growth_rate=placeholder(int),
      layers_per_block=placeholder(tuple),
      n_pool=placeholder(int),
      first_filters=placeholder(int),
      # PSPNet: backbone width and residual blocks per stage, pyramid bins, auxiliary head.
      blocks=placeholder(tuple),
      bottleneck=placeholder(bool),
      bins=placeholder(tuple),
      aux_head=placeholder(bool),
      dropout=placeholder(float),  # FC-DenseNet and PSPNet dropout rate.
    )
  )
