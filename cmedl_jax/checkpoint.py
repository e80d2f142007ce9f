"""Orbax checkpoints of a run: latest K, best by validation DSC, and the inference export.

  WORKDIR/checkpoints/<step>/   full TrainState, the latest `keep` steps (resume from here).
  WORKDIR/best/<step>/          full TrainState of the best validation DSC so far.
  WORKDIR/export/               inference network(s) only (params + batch stats) for predict.
  WORKDIR/config.json           the run's config; WORKDIR/preparation.json the data preparation.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
during a save never corrupts the previous checkpoint; unfinished temporaries are cleaned up.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

BEST_METRIC = 'val_dsc'


def _manager(path, keep, best=False, item_handlers=None):
  # With several processes orbax synchronises each save at barriers named by the step: the
  # latest and best managers, which may save the same step at once, need their own names.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True,
      best_fn=(lambda m: m[BEST_METRIC]) if best else None, best_mode='max',
      keep_checkpoints_without_metrics=not best,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='best' if best else 'latest'))
  return ocp.CheckpointManager(os.path.abspath(path), options=options,
                               item_handlers=item_handlers)


class Checkpoints:
  """The run's latest and best checkpoint managers."""

  def __init__(self, workdir, keep):
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
    return self.latest.latest_step()

  def restore_latest(self, abstract_state):
    """The latest saved state (shaped/sharded like abstract_state), or None."""
    step = self.latest.latest_step()
    if step is None:
      return None
    return self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))

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


def write_json_atomic(path, obj):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save_config(workdir, config):
  write_json_atomic(os.path.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))


def load_config(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def export_inference(workdir, params, batch_stats):
  """Writes the inference variables {'params', 'batch_stats'} to WORKDIR/export (atomic)."""
  path = os.path.abspath(os.path.join(workdir, 'export'))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {'params': params, 'batch_stats': batch_stats}, force=True)
  ckptr.wait_until_finished()


def restore_tree(path):
  """Raw tree (nested dicts) on this process's first device of a checkpoint step directory
  (RUN/checkpoints/800, RUN/best/400) or an export (RUN/export), whatever topology saved it."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'default')):  # A CheckpointManager step directory.
    return restore_state(os.path.dirname(path), None, step=int(os.path.basename(path)))
  ckptr = ocp.StandardCheckpointer()
  return ckptr.restore(path, _on_first_device(ckptr.metadata(path).item_metadata))


def load_inference(path):
  """{'params', 'batch_stats'} from an export directory."""
  return restore_tree(path)
