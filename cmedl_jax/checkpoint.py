"""Orbax checkpoints of a run: latest K, best by validation DSC, and the inference export.

  WORKDIR/checkpoints/<step>/   full TrainState, the latest `keep` steps (resume from here).
  WORKDIR/best/<step>/          full TrainState of the best validation DSC so far.
  WORKDIR/export/               inference network(s) only (params + batch stats) for predict;
                                replaced whole (written aside, then renamed into place).
  WORKDIR/config.json           the run's config; WORKDIR/preparation.json the data preparation.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
during a save never corrupts the previous checkpoint; unfinished temporaries are cleaned up.
A step damaged afterwards (a file truncated or deleted) is skipped when resuming: the newest
step that restores is used and the newer ones are moved to WORKDIR/checkpoints/damaged/<step>.
"""

import json
import os
import shutil

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from data_prep import files

BEST_METRIC = 'val_dsc'

# The train state is replicated (every device holds all of it) and small. Orbax's
# replica-parallel saving, its default except where JAX_PLATFORMS names a GPU, splits each array
# across its replicas, one device-to-host slice per part: thousands of dispatches per save.
# Measured 2026-12-04 on this 2-core machine, the tests' tiny run on 8 CPU devices (compilation
# cached): 38.6 s with it, 28.7 s without; under cProfile its 5 saves took 14.3 and 4.0 s.
# Replica 0 writes each array whole instead (process-wide: set when this module is imported).
ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


class ConfigError(ValueError):
  """A config the run cannot use (invalid field, resume with other fields, other data)."""


class CheckpointError(ConfigError):
  """A checkpoint that does not restore (damaged, or not a checkpoint); one line naming it.

  A ConfigError, so that the trainer's command line reports it in one line as it does other
  workdirs it cannot use (cmedl_jax/main.py).
  """


# Where restore_latest moves the steps that do not restore (WORKDIR/checkpoints/damaged/<step>).
DAMAGED_SUBDIR = 'damaged'


def _why(error):
  """One line on why a restore failed: the exception's type and its message, shortened (without
  the TensorStore spec some of them append)."""
  text = ' '.join(str(error).split()).split(' [tensorstore_spec=')[0]
  text = text if len(text) <= 240 else text[:237] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _manager(path, keep, best=False, item_handlers=None):
  # With several processes orbax synchronises each save at barriers named by the step: the
  # latest and best managers, which may save the same step at once, need their own names.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    cleanup_tmp_directories=True,
    best_fn=(lambda m: m[BEST_METRIC]) if best else None,
    best_mode='max',
    keep_checkpoints_without_metrics=not best,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix='best' if best else 'latest'
    ),
  )
  return ocp.CheckpointManager(os.path.abspath(path), options=options, item_handlers=item_handlers)


class Checkpoints:
  """The run's latest and best checkpoint managers."""

  def __init__(self, workdir, keep):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep)
    self.best = _manager(os.path.join(workdir, 'best'), 1, best=True)

  def save(self, step, state):
    self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

  def save_if_best(self, step, state, metrics):
    """Keeps `state` when metrics[BEST_METRIC] beats the best so far.

    A step already kept (saved before an interruption, then recomputed after resuming, which
    gives the same state) is left as it is.
    """
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def latest_step(self):
    """The latest saved step, or None."""
    return self.latest.latest_step()

  def restore_latest(self, abstract_state):
    """The newest saved state that restores (shaped/sharded like abstract_state), or None.

    A step that does not restore (a file in it truncated or deleted) is skipped with a warning
    naming it and why; once an older step restores, the skipped ones are moved aside to
    checkpoints/damaged/<step> (kept for inspection; the training saves those steps again).
    When none restores: CheckpointError, one line, nothing moved. Every process reads the same
    files and so makes the same choice; the move is orbax's delete (process 0 renames, then all
    processes pass its barrier).
    """
    skipped = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state = self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning(
          'Checkpoint %s does not restore, skipped (%s).',
          self.latest.directory / str(step),
          _why(e),
        )
        skipped.append((step, _why(e)))
        continue
      if skipped:
        self._move_aside([s for s, _ in skipped])
        logging.warning(
          'Resuming from step %d; moved the checkpoints that do not restore to %s.',
          step,
          self.latest.directory / DAMAGED_SUBDIR,
        )
      return state
    if skipped:
      raise CheckpointError(
        f'{self.latest.directory}: no checkpoint restores ('
        + '; '.join(f'step {s}: {why}' for s, why in skipped)
        + '); move them aside to start anew, or use another workdir'
      )
    return None

  def _move_aside(self, steps):
    """Moves `steps` of the latest checkpoints to checkpoints/damaged/<step>."""
    mover = ocp.CheckpointManager(
      self.latest.directory,
      options=ocp.CheckpointManagerOptions(
        todelete_subdir=DAMAGED_SUBDIR,
        cleanup_tmp_directories=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='damaged'
        ),
      ),
    )
    for step in steps:
      mover.delete(step)
    mover.close()
    self.latest.reload()

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def _on_first_device(metadata):
  """Restore target for a checkpoint's metadata tree: every array whole on this process's first
  device, whichever devices and processes saved it (their sharding may not exist here)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def restore_state(directory, abstract_state, step=None):
  """A TrainState from a checkpoint directory (.../checkpoints or .../best), latest step.

  abstract_state None: a raw tree (nested dicts) on this process's first device.
  """
  mngr = _manager(directory, None, item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{directory}: no checkpoint found')
  if abstract_state is None:
    abstract_state = _on_first_device(mngr.item_metadata(step))
  state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  mngr.close()
  return state


# Config fields a resumed run may change: how often it logs, writes images, validates and
# saves, how many checkpoints it keeps, how it validates, how far it prefetches. Anything else
# (networks, method, losses, optimiser and its schedule incl. train.num_steps, batch, data, seed)
# would resume a different training from the stored state, so it is an error.
RESUMABLE_CHANGES = (
  'train.log_every',
  'train.image_every',
  'train.eval_every',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'eval.',
  'data.prefetch',
)


def _flatten(tree, prefix=''):
  """Nested JSON dict -> {'a.b.c': leaf}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def config_changes(stored, new):
  """Sorted dotted names of the fields that differ between two JSON config dicts."""
  a, b = _flatten(stored), _flatten(new)
  missing = object()
  return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def check_resume_config(workdir, config):
  """Raises ConfigError when WORKDIR/config.json holds a config this one may not resume.

  Reads only; fields in RESUMABLE_CHANGES may differ. Fields the stored config does not have
  (added to configs/default.py after the run was started, whose defaults keep the behaviour
  of before) take this config's values, with a warning naming them.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return
  with open(path) as f:
    stored = json.load(f)
  known = _flatten(stored)
  changed, added = [], []
  for k in config_changes(stored, json.loads(config.to_json_best_effort())):
    if any(k == r or (r.endswith('.') and k.startswith(r)) for r in RESUMABLE_CHANGES):
      continue
    (changed if k in known else added).append(k)
  if changed:
    raise ConfigError(
      f'{workdir} holds a run with another config ({path}); changed: {", ".join(changed)}; '
      'use the stored values or another workdir'
    )
  if added:
    logging.warning(
      '%s: resuming a run saved before the config fields %s existed; they take '
      "this config's values",
      workdir,
      ', '.join(added),
    )


def save_config(workdir, config):
  """Writes WORKDIR/config.json, after checking a stored one may be resumed with `config`."""
  check_resume_config(workdir, config)
  files.write_json(
    os.path.join(workdir, 'config.json'),
    json.loads(config.to_json_best_effort()),
    indent=2,
    sort_keys=True,
  )


# Fields added to configs/default.py after runs had been saved without them, each with the
# behaviour of a run saved before the field existed (dotted name -> value). load_config fills
# them in, so the code reads every field directly; a field added later whose default changes
# what an old run did gets its entry here.
LEGACY_DEFAULTS = {
  'model.remat': False,  # Activations kept for the backward pass.
  'method.distill': 'hint',  # Hint distillation (before 'kl' and 'none').
  'method.hint_adapters': 'auto',  # 1x1 adapters only where the widths differ.
  'method.hint_warmup': 0.0,  # The full hint weight from step 0.
  'method.hint_trains_teacher': False,  # The hint trained the student (and adapters) only.
  'method.hint_trains_translator': False,
  'method.teacher_bn': 'joint',  # One teacher pass over [G(x), t] (this code before 2026-12).
  'method.contextual_features': 'patches',  # Raw intensity patches.
  'loss.seg_to_translator': 1.0,  # The teacher's full segmentation gradient into G.
  'data.source.train_cases': 0,  # Every training case.
  'data.target.tfds_dir': '',  # The target prepared from raw_dir.
  'data.source.label_map': None,  # Both sides: the shared data.label_map.
  'data.target.label_map': None,
  'data.paired': False,  # Unpaired source and target streams.
}


def upgrade_config(config):
  """`config` (a run's saved config) with each LEGACY_DEFAULTS field it lacks filled in; the
  fields it has are kept. Changes and returns `config`."""
  for dotted, value in LEGACY_DEFAULTS.items():
    *sections, field = dotted.split('.')
    node = config
    for section in sections:
      node = node[section]
    if field not in node:
      node[field] = value
  return config


def load_config(workdir):
  """WORKDIR/config.json as a ConfigDict, brought up to date (upgrade_config)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    return upgrade_config(ml_collections.ConfigDict(json.load(f)))


def export_inference(workdir, params, batch_stats, tag=0):
  """Writes the inference variables {'params', 'batch_stats'} to WORKDIR/export, atomically.

  Written whole into WORKDIR/export.tmp-<tag> (every process calls this, as orbax expects; the
  name is the same on all of them), then swapped in by process 0: the old export is renamed to
  export.old-<tag>, the new one to export, the old one deleted. A kill at any point leaves the
  previous export or the new one whole (`export_dir` finds it; `clean_export_leftovers` puts it
  back in place at the next training start). tag: a number, e.g. the step.
  """
  path = os.path.abspath(os.path.join(workdir, 'export'))
  tmp, old = f'{path}.tmp-{int(tag)}', f'{path}.old-{int(tag)}'
  primary = jax.process_index() == 0
  if primary:
    for leftover in (tmp, old):
      shutil.rmtree(leftover, ignore_errors=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp, {'params': params, 'batch_stats': batch_stats})
  ckptr.wait_until_finished()
  if primary:
    if os.path.isdir(path):
      os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _export_leftovers(workdir):
  """Sibling folders of WORKDIR/export left by an interrupted export: (old ones, others)."""
  names = [
    n
    for n in os.listdir(workdir)
    if n.startswith(('export.tmp-', 'export.old-', 'export.orbax-checkpoint-tmp'))
  ]
  olds = sorted(
    (n for n in names if n.startswith('export.old-') and n[11:].isdigit()),
    key=lambda n: os.path.getmtime(os.path.join(workdir, n)),
  )
  return [os.path.join(workdir, n) for n in olds], [
    os.path.join(workdir, n) for n in names if n not in olds
  ]


def export_dir(workdir):
  """WORKDIR/export, or the previous export a kill left aside (export.old-<pid>); for readers."""
  path = os.path.join(workdir, 'export')
  if not os.path.isdir(path) and os.path.isdir(workdir):
    olds, _ = _export_leftovers(workdir)
    if olds:
      return olds[-1]
  return path


def clean_export_leftovers(workdir):
  """Puts a previous export a kill left aside back in place; deletes unfinished exports.

  Call only while no other process exports into WORKDIR (the training holds its lock).
  """
  if not os.path.isdir(workdir):
    return
  olds, others = _export_leftovers(workdir)
  path = os.path.join(workdir, 'export')
  if olds and not os.path.isdir(path):
    logging.warning(
      'Restoring the previous export %s -> %s (an export was interrupted).', olds[-1], path
    )
    os.rename(olds.pop(), path)
  for leftover in olds + others:
    logging.warning('Deleting %s (left by an interrupted export).', leftover)
    shutil.rmtree(leftover, ignore_errors=True)


def restore_tree(path):
  """Raw tree (nested dicts) on this process's first device of a checkpoint step directory
  (RUN/checkpoints/800, RUN/best/400) or an export (RUN/export), whatever topology saved it."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'default')):  # A CheckpointManager step directory.
    return restore_state(os.path.dirname(path), None, step=int(os.path.basename(path)))
  ckptr = ocp.StandardCheckpointer()
  return ckptr.restore(path, _on_first_device(ckptr.metadata(path).item_metadata))


def load_variables(path):
  """{'params', 'batch_stats'} of an export (RUN/export) or a saved state (RUN/best/400), on
  this process's first device, whatever topology saved it.

  Only these two are read, not the optimiser state (two thirds of a saved state with Adam). A
  path that is no checkpoint or does not restore: a one-line CheckpointError naming it.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint')
  item = os.path.join(path, 'default')  # A CheckpointManager step directory holds the tree there.
  item = epath.Path(item if os.path.isdir(item) else path)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(item)
    if 'params' not in metadata:
      raise KeyError('no params in it')
    wanted = _on_first_device({k: metadata[k] for k in ('params', 'batch_stats') if k in metadata})
    tree = handler.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item=wanted,
        restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True,
      ),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f'{path}: does not restore ({_why(e)})') from e
  finally:
    handler.close()
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {})}


def load_export(workdir):
  """{'params', 'batch_stats'} of the run's inference export; a clear error without one."""
  path = export_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{path}: no inference export (did training finish?); use '
      '--checkpoint with a saved state instead'
    )
  return load_variables(path)


def latest_checkpoint(workdir):
  """WORKDIR/checkpoints/<latest step>; FileNotFoundError without one."""
  directory = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f'{directory}: no checkpoint')
  return os.path.join(directory, str(max(steps)))


def run_dir_of(path):
  """The run directory (holding config.json) at or above a checkpoint path."""
  path = os.path.abspath(path)
  while not os.path.isfile(os.path.join(path, 'config.json')):
    parent = os.path.dirname(path)
    if parent == path:
      raise FileNotFoundError('no config.json found at or above the checkpoint path')
    path = parent
  return path


def load_run(run_dir):
  """(config, data preparation record) of a run directory; a clear error if it is none."""
  for name in ('config.json', 'preparation.json'):
    if not os.path.isfile(os.path.join(run_dir, name)):
      raise FileNotFoundError(f'{run_dir}: no {name} (not a cmedl-jax run directory?)')
  with open(os.path.join(run_dir, 'preparation.json')) as f:
    return load_config(run_dir), json.load(f)
