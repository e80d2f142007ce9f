"""The methods: the parts each one trains and the network it runs at test time.

  method.name      trains                                        at test time, on source x
  cmedl            translator, discriminators, teacher, student  student(x)
                   (+ hint adapters)
  student_only     student                                       student(x)
  two_channel      translator, discriminators, student           student([x, G(x)])
  pmri_teacher     translator, discriminators, teacher           teacher(G(x))
  translator_only  translator, discriminators                    nothing (segments nothing)
  self_distill     teacher, student (+ hint adapters)            student(x)
  paired_teacher   teacher, student (+ hint adapters)            student(x)

self_distill [ours] is CMEDL with an identity translator: the teacher segments the source
images themselves, with their labels, and the student distils it; the control that separates
what distillation does as a regulariser from anything the target modality adds (the study's
premise factorial, docs/STUDY_PLAN.md). Its teacher never sees target images.

paired_teacher [Hu et al., MICCAI 2020: multi-modal to mono-modal distillation; the positive
control of issue 46] needs co-registered data (data.paired): the teacher segments the real
target image of each source slice with the labels, the student segments the source and distils
the teacher's features of the same slice; no translator. Its teacher is validated on the
co-registered target volumes (cmedl_jax/validation.py), never on the source.

Translator: G (source -> target); CycleGAN adds F (target -> source) and a discriminator on
each side, CUT adds PatchNCE heads. `method.freeze_translator` keeps a translator (e.g. one
loaded by the two-stage ablation) fixed: then no discriminator is trained.
The part names are the parameter collections of the train state (`GROUP_OF`); everything that
asks "does this method have X" or "what runs at test time" reads this module.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp

from cmedl_jax import models
from cmedl_jax.models.adapters import HintAdapters

# Parameter collections of the state and the optimiser group each belongs to.
GROUP_OF = {
  'translator': 'translator',  # G: source -> target.
  'translator_inv': 'translator',  # F: target -> source (CycleGAN only).
  'nce_head': 'translator',  # PatchNCE MLPs (CUT only).
  'disc_target': 'discriminator',  # D on target images: real t vs G(x).
  'disc_source': 'discriminator',  # D on source images: real x vs F(t) (CycleGAN only).
  'teacher': 'teacher',
  'student': 'student',
  'adapters': 'student',  # 1x1 convs from student to teacher widths (hint loss).
}
GROUPS = ('translator', 'discriminator', 'teacher', 'student')
DISCRIMINATORS = ('disc_target', 'disc_source')

# What runs at test time: the networks applied to a source batch, and the collections it reads.
STUDENT = 'student'  # student(x)
STUDENT_ON_TRANSLATION = 'student_on_source_and_translation'  # student([x, G(x)])
TEACHER_ON_TRANSLATION = 'teacher_on_translation'  # teacher(G(x))
TEACHER = 'teacher'  # teacher(x): self_distill's teacher, for validation
TEST_TIME_COLLECTIONS = {
  STUDENT: ('student',),
  STUDENT_ON_TRANSLATION: ('translator', 'student'),
  TEACHER_ON_TRANSLATION: ('translator', 'teacher'),
  TEACHER: ('teacher',),
}


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method trains (besides the translator) and what it runs at test time."""

  student: bool
  teacher: bool
  translator: bool
  test_time: Optional[str]  # A key of TEST_TIME_COLLECTIONS; None: no segmentation network.
  distills: bool = False  # The student learns from the teacher (method.distill).
  paired: bool = False  # The teacher sees the co-registered real target (needs data.paired).


METHODS = {
  'cmedl': Method(student=True, teacher=True, translator=True, test_time=STUDENT, distills=True),
  'student_only': Method(student=True, teacher=False, translator=False, test_time=STUDENT),
  'two_channel': Method(
    student=True, teacher=False, translator=True, test_time=STUDENT_ON_TRANSLATION
  ),
  'pmri_teacher': Method(
    student=False, teacher=True, translator=True, test_time=TEACHER_ON_TRANSLATION
  ),
  'translator_only': Method(student=False, teacher=False, translator=True, test_time=None),
  'self_distill': Method(
    student=True, teacher=True, translator=False, test_time=STUDENT, distills=True
  ),
  'paired_teacher': Method(
    student=True, teacher=True, translator=False, test_time=STUDENT, distills=True, paired=True
  ),
}
DISTILLATIONS = ('hint', 'kl', 'none')
# Choices of the method's switches (configs/default.py documents each; a run saved before one
# existed is given the behaviour of then when loaded: checkpoint.LEGACY_DEFAULTS).
CHOICES = {
  'distill': DISTILLATIONS,
  'hint_adapters': ('auto', 'always', 'none'),
  'teacher_bn': ('joint', 'separate'),
  'contextual_features': ('patches', 'random_conv'),
}


def switch(config, field):
  """config.method.<field>, checked against CHOICES."""
  value = config.method[field]
  if value not in CHOICES[field]:
    raise ValueError(f'method.{field}={value!r}: expected one of {CHOICES[field]}')
  return value


def get(config):
  """The Method of `config.method.name`; ValueError naming the field when unknown."""
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f'method.name={name!r}: expected one of {tuple(METHODS)}')
  return METHODS[name]


def parts(config):
  """The parts `config` builds and trains: dict of booleans, one per collection of GROUP_OF
  (and 'trains_translator', 'distill')."""
  m = get(config)
  for field in CHOICES:
    switch(config, field)
  cyclegan = m.translator and config.model.translator.name == 'cyclegan'
  trains_translator = m.translator and not config.method.freeze_translator
  distill = m.distills and config.method.distill != 'none'
  return dict(
    student=m.student,
    teacher=m.teacher,
    translator=m.translator,
    translator_inv=cyclegan,
    disc_target=trains_translator,
    disc_source=trains_translator and cyclegan,
    nce_head=trains_translator and config.model.translator.name == 'cut',
    trains_translator=trains_translator,
    distill=distill,
    adapters=distill
    and config.method.distill == 'hint'
    and switch(config, 'hint_adapters') != 'none',
  )


def teacher_view(config):
  """How the teacher is validated: on G(x) (TEACHER_ON_TRANSLATION), on the images themselves
  (TEACHER: x for self_distill, the co-registered target for paired_teacher), or None without
  a teacher."""
  m = get(config)
  if not m.teacher:
    return None
  return TEACHER_ON_TRANSLATION if m.translator else TEACHER


def student_in_channels(config, in_channels):
  """Channels of the student's input: the source's, twice for two_channel ([x, G(x)])."""
  return 2 * in_channels if get(config).test_time == STUDENT_ON_TRANSLATION else in_channels


# ---------------------------------------------------------------------------- the networks


class Networks(NamedTuple):
  """The Flax modules a method needs; None where the method has no such network."""

  student: Any
  teacher: Any
  translator: Any
  translator_inv: Any
  disc_target: Any
  disc_source: Any
  nce_head: Any


def _network_config(section, dtype, remat, **fields):
  cfg = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  cfg.update(dtype=dtype, remat=remat, **fields)
  return cfg


def build_networks(config, in_channels):
  """The Flax modules of `config`'s method. in_channels: channels of one source image."""
  u = parts(config)
  dtype = config.model.dtype
  remat = bool(config.model.remat)
  k = config.data.num_classes

  def segmenter(section):
    return models.get_segmenter(_network_config(section, dtype, remat, num_classes=k))

  def translator():
    return models.get_translator(
      _network_config(config.model.translator, dtype, remat, out_channels=in_channels)
    )

  disc_cfg = dict(config.model.discriminator.to_dict(), dtype=dtype)
  return Networks(
    student=segmenter(config.model.student) if u['student'] else None,
    teacher=segmenter(config.model.teacher) if u['teacher'] else None,
    translator=translator() if u['translator'] else None,
    translator_inv=translator() if u['translator_inv'] else None,
    disc_target=models.get_discriminator(disc_cfg) if u['disc_target'] else None,
    disc_source=models.get_discriminator(disc_cfg) if u['disc_source'] else None,
    nce_head=models.get_patch_sampler(dict(num_features=config.model.nce.num_features, dtype=dtype))
    if u['nce_head']
    else None,
  )


def hint_adapters(config, teacher_feats):
  """1x1-conv adapters from the student's widths to the teacher's at the hint taps."""
  return HintAdapters(
    out_channels={tap: int(teacher_feats[tap].shape[-1]) for tap in config.method.hint_taps},
    always=switch(config, 'hint_adapters') == 'always',
  )


def hint_taps(config, feats):
  """The features of `feats` at `config.method.hint_taps`."""
  return {tap: feats[tap] for tap in config.method.hint_taps}


# ------------------------------------------------------------------------------ test time


def translate(nets, params, images):
  """G(images): the translator's pseudo-target, [N,H,W,C] in [-1, 1]."""
  return nets.translator.apply({'params': params['translator']}, images)


def segment(net, params, batch_stats, name, images):
  """Logits [N,H,W,K] of segmenter `net` (collection `name`) in inference mode."""
  variables = {'params': params[name], 'batch_stats': batch_stats[name]}
  return net.apply(variables, images, train=False)[0]


def infer_logits(params, batch_stats, images, *, nets, test_time):
  """Segmentation logits [N,H,W,K] of the test-time network `test_time` (a key of
  TEST_TIME_COLLECTIONS) on source images [N,H,W,C] in [-1, 1]."""
  if test_time == TEACHER_ON_TRANSLATION:
    return segment(nets.teacher, params, batch_stats, 'teacher', translate(nets, params, images))
  if test_time == TEACHER:
    return segment(nets.teacher, params, batch_stats, 'teacher', images)
  if test_time == STUDENT_ON_TRANSLATION:
    images = jnp.concatenate([images, translate(nets, params, images)], -1)
  elif test_time != STUDENT:
    raise ValueError(f'no segmentation network at test time ({test_time!r})')
  return segment(nets.student, params, batch_stats, 'student', images)


def test_time_variables(test_time, params, batch_stats):
  """(params, batch_stats) restricted to the collections the test-time network reads."""
  names = TEST_TIME_COLLECTIONS[test_time]
  return ({k: params[k] for k in names}, {k: batch_stats[k] for k in names if k in batch_stats})


def biases_before_norm(params):
  """Paths (collection, module, ..., 'bias') in a train state's params of the conv biases that
  an instance norm follows at once, in translators and discriminators (the networks'
  `biases_before_norm`): they change no output, their true gradient is 0, so a computed one is
  rounding noise and runs may differ there freely. U-Net and PSPNet convs before a batch norm
  have no bias; FC-DenseNet's (BN-ReLU-conv layers) are not listed."""
  from cmedl_jax.models import patchgan, resnet_generator  # pylint: disable=g-import-not-at-top

  of_network = {'translator': resnet_generator, 'translator_inv': resnet_generator}
  of_network.update({name: patchgan for name in DISCRIMINATORS})
  return [
    (name, *path)
    for name, tree in params.items()
    if name in of_network
    for path in of_network[name].biases_before_norm(tree)
  ]
