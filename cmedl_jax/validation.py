"""Validation during training: whole-volume metrics, their record, the image summaries and the
post-processing chosen at the end.

Every process calls these (the jitted programs run on all devices); process 0 alone writes
WORKDIR/validation.json and WORKDIR/postprocessing.json.
"""

import functools
import json
import os

from absl import logging
import jax
import numpy as np

from cmedl_jax import inference
from cmedl_jax import input_pipeline
from cmedl_jax import method
from cmedl_jax import postprocess
from cmedl_jax import sharding
from cmedl_jax.evaluation import metrics as seg_metrics
from data_prep import files


def _to_unit(images):
  """[-1, 1] images -> [0, 1] for image summaries."""
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _labels_to_unit(labels, num_classes):
  return (np.asarray(labels, np.float32) / max(num_classes - 1, 1))[..., None]


def image_summaries(config, state, src, eval_fn, mesh, max_images=3):
  """Source, pseudo-target, cycle, student/teacher predictions and label, [N,H,W,1] in [0,1].

  Every process calls this (eval_fn runs on all devices); process 0's writer writes them.
  """
  x = sharding.to_host(src['image'])[:max_images]
  out = sharding.to_host(eval_fn(state, sharding.from_host(x, sharding.replicated(mesh))))
  c = config.data.context_slices // 2
  k = config.data.num_classes
  images = {
    'source': _to_unit(x[..., c : c + 1]),
    'label': _labels_to_unit(sharding.to_host(src['label'])[:max_images], k),
  }
  if 'logits' in out:
    images['prediction/inference'] = _labels_to_unit(out['logits'].argmax(-1), k)
  if 'pseudo_target' in out:
    images['pseudo_target'] = _to_unit(out['pseudo_target'][..., c : c + 1])
  if 'cycle' in out:
    images['cycle_source'] = _to_unit(out['cycle'][..., c : c + 1])
  if 'teacher_logits' in out:
    images['prediction/teacher_on_pseudo_target'] = _labels_to_unit(
      out['teacher_logits'].argmax(-1), k
    )
  return images


def validate(config, state, programs, volumes, mesh):
  """Metrics on whole prepared validation volumes, each a mean over cases (of finite values).

  programs: the run's train._Programs. Returns {'val_dsc', 'val_sdsc', 'val_hd95' (mm)} of the
  test-time network; where the method has a teacher also 'val_teacher_dsc', 'val_teacher_sdsc',
  'val_teacher_hd95' of teacher(G(x)) (of teacher(x) for self_distill, of teacher(t) on each
  volume's co-registered target volume, 'paired', for paired_teacher); with CycleGAN
  'val_cycle_l1'.
  """
  val = segmentation_metrics(config, state, programs.probabilities, volumes, mesh)
  teacher = programs.teacher_probabilities
  if teacher is programs.probabilities:  # pmri_teacher: the test-time network is teacher(G(x)).
    val.update({k.replace('val_', 'val_teacher_'): v for k, v in val.items()})
  elif teacher is not None:
    teacher_volumes = [v.get('paired', v) for v in volumes]
    val.update(segmentation_metrics(config, state, teacher, teacher_volumes, mesh, 'val_teacher_'))
  if programs.cycle_error is not None:
    val['val_cycle_l1'] = cycle_error(config, state, programs.cycle_error, volumes, mesh)
  return val


def segmentation_metrics(config, state, infer_fn, volumes, mesh, prefix='val_'):
  """DSC, surface DSC and HD95 (mm) of one network on whole prepared volumes.

  infer_fn: (state, [B,H,W,C] slices) -> probabilities [B,H,W,K]. Returns {prefix + 'dsc',
  prefix + 'sdsc', prefix + 'hd95'}, each the mean of its finite values over foreground
  classes and cases (NaN when none is finite).
  """
  per_case = []
  classes = {f'class_{k}': k for k in range(1, config.data.num_classes)}
  for vol in volumes:
    pred, _ = inference.predict_volume(
      functools.partial(infer_fn, state),
      vol['image'],
      config.eval.batch_size,
      config.data.context_slices,
      mesh,
    )
    per_case.append(
      seg_metrics.evaluate_case(
        pred, vol['label'], vol['spacing_mm'], classes, tolerance_mm=config.eval.tolerance_mm
      )
    )
  out = {}
  for key, metric in (('dsc', 'dice'), ('sdsc', 'surface_dice'), ('hd95', 'hd95')):
    values = [case[name][metric] for case in per_case for name in classes]
    finite = [v for v in values if np.isfinite(v)]
    out[prefix + key] = float(np.mean(finite)) if finite else float('nan')
  return out


def cycle_error(config, state, cycle_fn, volumes, mesh):
  """Mean |F(G(x)) - x| over every slice (all pixels and context channels) of the volumes.

  cycle_fn: (state, [B,H,W,C] slices in [-1, 1]) -> per-slice mean absolute error [B,1].
  """
  errors = [
    inference.predict_volume(
      functools.partial(cycle_fn, state),
      vol['image'],
      config.eval.batch_size,
      config.data.context_slices,
      mesh,
    )[1][:, 0]
    for vol in volumes
  ]
  return float(np.mean(np.concatenate(errors)))


def validation_volumes(config):
  """Whole prepared validation volumes of the source (none without a test-time network); for
  a paired method each also holds 'paired', the target's volume of the same case."""
  if method.get(config).test_time is None:
    return []
  volumes = input_pipeline.load_eval_volumes(config.data.source.prepared_dir, 'validation')
  volumes = volumes[: config.eval.max_volumes] if config.eval.max_volumes else volumes
  if method.get(config).paired:
    target_dir = config.data.target.prepared_dir
    targets = {v['case_id']: v for v in input_pipeline.load_eval_volumes(target_dir, 'validation')}
    for v in volumes:
      if v['case_id'] not in targets:
        raise ValueError(
          f'{target_dir}: no validation volume of case {v["case_id"]!r}, which data.paired needs'
        )
      v['paired'] = targets[v['case_id']]
  return volumes


def validate_and_record(
  config, workdir, state, step, programs, volumes, history, writer, ckpts, mesh, on_log
):
  """Validates, logs, appends to WORKDIR/validation.json and keeps the best checkpoint."""
  val = validate(config, state, programs, volumes, mesh)
  writer.write_scalars(step, val)
  if on_log is not None:
    on_log(step, val)
  logging.info('step %d validation: %s', step, '  '.join(f'{k}={v:.4f}' for k, v in val.items()))
  history.append({'step': step, **val})
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'validation.json'), history, indent=2, sort_keys=True)
  if np.isfinite(val['val_dsc']):
    ckpts.save_if_best(step, state, val)
  return val


def read_validation_history(workdir, start_step):
  """Validation records of earlier steps of this run (WORKDIR/validation.json), for resuming."""
  path = os.path.join(workdir, 'validation.json')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    history = json.load(f)
  return [r for r in history if r['step'] <= start_step]


def choose_postprocessing(config, workdir, state, programs, mesh):
  """Chooses the post-processing on the labelled validation volumes (postprocess.choose) with
  the final network; process 0 writes WORKDIR/postprocessing.json."""
  volumes = [v for v in validation_volumes(config) if v['has_label']]
  if not volumes:
    return
  predictions = [
    inference.predict_volume(
      functools.partial(programs.probabilities, state),
      v['image'],
      config.eval.batch_size,
      config.data.context_slices,
      mesh,
    )[0]
    for v in volumes
  ]
  record = postprocess.choose(
    predictions,
    [v['label'] for v in volumes],
    [v['spacing_mm'] for v in volumes],
    config.data.num_classes,
  )
  if jax.process_index() == 0:
    postprocess.save(workdir, record)
  logging.info(
    'Post-processing chosen on %d validation volumes (minimum component mm^3 per class): %s',
    len(volumes),
    record['min_volume_mm3'],
  )
