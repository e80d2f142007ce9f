r"""Trains CMEDL (or a baseline) from a config file.

  python -m cmedl_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m cmedl_jax.main --config=configs/cmedl.py:densefcn,cut --workdir=runs/x \
      --config.train.num_steps=5000

Several GPUs of one host: nothing to add (all local devices form the 'data' mesh axis).
Several processes (hosts): run the same command in every process with --jax_distributed, which
calls jax.distributed.initialize(). Under SLURM (srun), Open MPI and on Cloud TPU it finds the
coordinator, the process count and this process's id itself; elsewhere give them:

  python -m cmedl_jax.main --config=... --workdir=SHARED/run --jax_distributed \
      --coordinator_address=HOST0:PORT --num_processes=2 --process_id=0   # 1 on the other

(--coordinator_address may also come from JAX_COORDINATOR_ADDRESS.)
"""

import logging as python_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmedl_jax import curves
from cmedl_jax import method
from cmedl_jax import train
from cmedl_jax import validation
from cmedl_jax import workdir_lock
from data_prep import files
from data_prep import nifti_io

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'With --jax_distributed: HOST:PORT of process 0 (default: auto-detected).',
)
flags.DEFINE_integer(
  'num_processes', None, 'With --jax_distributed: number of processes (default: auto-detected).'
)
flags.DEFINE_integer(
  'process_id',
  None,
  'With --jax_distributed: this process, 0..num_processes-1 (default: auto-detected).',
)
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  # jax's INFO "Unable to initialize backend 'tpu'" on machines without one: not for the console.
  python_logging.getLogger('jax._src.xla_bridge').setLevel(python_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given) and not FLAGS.jax_distributed:
    raise app.UsageError(
      '--coordinator_address/--num_processes/--process_id need --jax_distributed'
    )
  if FLAGS.jax_distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info(
    'JAX process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (
    train.ConfigError,
    workdir_lock.WorkdirLockedError,
    train.NonFiniteLossError,
    nifti_io.DataError,
  ) as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from None  # One line, no traceback; exit status 1.
  except Exception as e:  # pylint: disable=broad-exception-caught
    message = files.disk_full(e)
    if message is None:
      raise
    logging.error('%s', message)
    raise SystemExit(f'error: {message}') from None
  logging.info('Final: %s', result)
  if jax.process_index() == 0 and result['step'] >= FLAGS.config.train.num_steps:
    logging.info('%s', summarize(FLAGS.config, FLAGS.workdir))


def summarize(config, workdir):
  """At the end of a run: draws WORKDIR/curves.png and .md (cmedl_jax.curves) and returns one
  line with the validation DSC of the test-time network and of the teacher on what it reads
  (its pseudo-target; the source for self_distill, the real target for paired_teacher) at the
  first and the last validation, and where the picture is."""
  out = f'{workdir}/curves'
  try:
    curves.write_curves(workdir, out)
    where = f'curves: {out}.png'
  except (OSError, ValueError) as e:  # No events (e.g. written elsewhere); not fatal.
    where = f'no curves ({e})'
  history = validation.read_validation_history(workdir, config.train.num_steps)
  parts = []
  if history:
    first, last = history[0], history[-1]
    name = 'student' if method.get(config).test_time == method.STUDENT else 'test-time network'
    sees = {method.TEACHER_ON_TRANSLATION: 'pseudo-target', method.TEACHER: 'source'}
    sees = 'real target' if method.get(config).paired else sees.get(method.teacher_view(config))
    for label, key in ((name, 'val_dsc'), (f'teacher on {sees}', 'val_teacher_dsc')):
      if key in first and key in last:
        parts.append(f'{label} {first[key]:.2f} -> {last[key]:.2f}')
    if parts:
      parts = [f'Validation DSC (steps {first["step"]} -> {last["step"]}): {", ".join(parts)}']
  return '; '.join(parts + [where]) + '.'


def run():
  """The `cmedl-train` command (pip install .)."""
  app.run(main)


if __name__ == '__main__':
  run()
