r"""Trains CMEDL (or a baseline) from a config file.

  python -m cmedl_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m cmedl_jax.main --config=configs/cmedl.py:densefcn,cut --workdir=runs/x \
      --config.train.num_steps=5000

Several GPUs of one host: nothing to add (all local devices form the 'data' mesh axis).
Multi-host (TPU pod slice, SLURM GPU cluster): run the same command on every host with
--jax_distributed, which calls jax.distributed.initialize() (it reads the coordinator from the
environment on Cloud TPU and SLURM).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmedl_jax import train
from data_prep import nifti_io

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() (multi-host).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.jax_distributed:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.WorkdirLockedError, train.NonFiniteLossError,
          nifti_io.DataError) as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from None  # One line, no traceback; exit status 1.
  logging.info('Final: %s', result)


if __name__ == '__main__':
  app.run(main)
