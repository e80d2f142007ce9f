"""The training loop: `train_and_evaluate(config, workdir)`.

Prepares the data if needed, builds the mesh, state and jitted step, then loops: unpaired
batches -> train_step -> scalars/images to TensorBoard -> whole-volume validation ->
orbax checkpoints. Resumes from WORKDIR/checkpoints automatically; SIGTERM/SIGINT save and exit;
a NaN/Inf loss stops the run naming the loss and the step.

Several processes (`main --jax_distributed`) run this same function: every process computes
everything (jitted programs span all devices) and saves the orbax checkpoints together; process
0 alone prepares the data and writes the JSON records, TensorBoard and the export's metadata.
"""

import functools
import logging as pylogging
import os
import signal
import time

from absl import logging
from clu import parameter_overview
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cmedl_jax import checkpoint
from cmedl_jax import environment
from cmedl_jax import input_pipeline
from cmedl_jax import method
from cmedl_jax import portable
from cmedl_jax import prepared_data
from cmedl_jax import sharding
from cmedl_jax import summary_writer
from cmedl_jax import train_state
from cmedl_jax import train_step as ts
from cmedl_jax import validation
from cmedl_jax import workdir_lock
from data_prep import files


class _DropLibraryInfo(pylogging.Filter):
  """Drops INFO records of orbax (dozens of lines per checkpoint); warnings pass."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs():
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


class NonFiniteLossError(RuntimeError):
  """A loss became NaN or Inf."""


ConfigError = checkpoint.ConfigError


def check_workdir(workdir):
  """Creates workdir and proves it writable; a clear error otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe_{jax.process_index()}_{os.getpid()}')
    with open(probe, 'wb') as f:
      f.write(b'0' * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise OSError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from e


def check_config(config):
  """Raises a one-line ConfigError naming the first invalid field; before any expensive work.

  Image size: the segmenters and generators pad their input to the multiple they need; the
  PatchGAN discriminator's output is empty (a NaN loss) below 3 * 2**n_layers pixels.
  """

  def fail(field, why):
    raise ConfigError(f'{field} {why}, got {config[field.split(".")[0]][field.split(".")[1]]!r}')

  for field in ('optim.lr',):
    section, name = field.split('.')
    if not config[section][name] > 0:
      fail(field, 'must be > 0')
  for field in (
    'train.num_steps',
    'train.global_batch_size',
    'train.log_every',
    'train.image_every',
    'train.eval_every',
    'train.checkpoint_every',
    'train.keep_checkpoints',
    'eval.batch_size',
  ):
    section, name = field.split('.')
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      fail(field, 'must be an int >= 1')
  size = config.data.image_size
  sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,)
  if len(sizes) not in (1, 2) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes
  ):
    fail('data.image_size', 'must be an int >= 1 or a pair of them')
  try:
    parts = method.parts(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  smallest = 3 * 2**config.model.discriminator.n_layers
  if (parts['disc_target'] or parts['disc_source']) and min(sizes) < smallest:
    fail(
      'data.image_size',
      f'must be >= {smallest} for the discriminator (3 * 2**model.discriminator.n_layers)',
    )
  _check_teacher_input(config)
  _check_input(config, fail)
  devices = jax.device_count()
  if config.train.global_batch_size % devices:
    fail('train.global_batch_size', f'must be a multiple of the device count ({devices})')


def _check_teacher_input(config):
  """ConfigError where the method's teacher would read the wrong images."""
  m = method.get(config)
  if (
    m.teacher
    and not m.translator
    and (config.data.target_labels or method.switch(config, 'teacher_bn') != 'separate')
  ):
    # Without a translator the teacher's one input is x or the paired t: a second pass over
    # the target images would hand self_distill the target modality, paired_teacher t twice.
    sees = 'reads the real target images already' if m.paired else 'sees no target images'
    raise ConfigError(
      f'method.name {config.method.name}: its teacher {sees}; set '
      'data.target_labels=False and method.teacher_bn=separate'
    )
  if m.paired and not config.data.paired:
    raise ConfigError(
      f'method.name {config.method.name}: its teacher reads the co-registered target slice; '
      'set data.paired=True (paired datasets: python -m data_prep.phantoms --paired-out)'
    )


def _check_input(config, fail):
  """check_config's part for data.context_slices and data.target.tfds_dir."""
  c = config.data.context_slices
  if isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % 2 == 0:
    fail('data.context_slices', 'must be an odd int >= 1')
  tfds_dir = config.data.target.tfds_dir
  if tfds_dir and not os.path.isfile(os.path.join(tfds_dir, 'dataset_info.json')):
    raise ConfigError(
      f'data.target.tfds_dir must be a TFDS dataset folder (with dataset_info.json), got '
      f'{tfds_dir!r}'
    )


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. some notebook kernels): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def any_process(self):
    """The signal's name if this or (with several processes) any process got one, else None.

    Every process must call this at every step: all of them then stop at the same step.
    """
    local = self.signal  # Once: a signal arriving during the gather counts at the next step.
    if jax.process_count() == 1:
      return local
    got = multihost_utils.process_allgather(np.int32(local is not None))
    return local or ('SIGTERM/SIGINT (another process)' if got.any() else None)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_finite(metrics, step):
  for name, value in metrics.items():
    if name.startswith('loss/') and not np.isfinite(value):
      raise NonFiniteLossError(
        f'{name} is {value} at step {step}; stopping. The last good checkpoint is kept.'
      )


def train_and_evaluate(config, workdir, on_log=None):
  """Trains the configured method in `workdir` and returns the final validation metrics.

  Resumes from the latest checkpoint in WORKDIR/checkpoints when there is one. `on_log`, if
  given, is called as on_log(step, scalars) at every log and validation step (e.g. a live plot
  in a notebook). Returns {'step', 'val_dsc', 'val_sdsc', 'val_hd95'} and the other keys of
  `validate` (validation keys absent without validation).
  """
  quiet_library_logs()
  check_config(config)
  checkpoint.check_resume_config(workdir, config)  # Before writing anything.
  check_workdir(workdir)
  if jax.process_index() != 0:  # Multi-host: process 0 holds the workdir for all.
    return _train_and_evaluate(config, workdir, on_log)
  with workdir_lock.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, on_log)


def _train_and_evaluate(config, workdir, on_log):
  """train_and_evaluate once the config is checked and the workdir held."""
  primary = jax.process_index() == 0
  if primary:
    _start_workdir(config, workdir)
  environment.record(workdir, write=primary)
  prepared_data.prepare_data(config)
  mesh = sharding.make_mesh()
  in_channels = config.data.context_slices
  image_shape = (
    *input_pipeline.dataset_info(config.data.source.prepared_dir)['image_size'],
    in_channels,
  )
  nets = method.build_networks(config, in_channels)
  if primary:
    files.write_json(
      os.path.join(workdir, 'preparation.json'),
      input_pipeline.preparation_record(config.data.source.prepared_dir),
      indent=2,
      sort_keys=True,
    )
  ckpts = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
  state, state_sharding = _initial_state(config, nets, image_shape, mesh, ckpts)
  start_step = int(jax.device_get(state.step))
  logging.info('Starting at step %d of %d.', start_step, config.train.num_steps)
  programs = _Programs(config, nets, mesh, state_sharding)
  train_iter = _train_iterator(config, start_step, mesh)
  # TensorBoard event files on process 0 (the console line is ours, with steps/s and ETA).
  writer = summary_writer.SummaryWriter(workdir if primary else None)
  t_start = time.time()
  try:
    step, state, val = _train_loop(
      config, workdir, state, start_step, programs, train_iter, writer, ckpts, mesh, on_log
    )
    test_time = method.get(config).test_time
    if step >= config.train.num_steps and test_time is not None:
      params, stats = method.test_time_variables(test_time, state.params, state.batch_stats)
      params, stats = sharding.to_host(params), sharding.to_host(stats)
      checkpoint.export_inference(workdir, params, stats, tag=step)
      if jax.process_index() == 0:  # The network without this package (jax.export).
        record = input_pipeline.preparation_record(config.data.source.prepared_dir)
        portable.write_portable(
          os.path.join(workdir, 'portable'), config, params, stats, test_time, record
        )
      validation.choose_postprocessing(config, workdir, state, programs, mesh)
  finally:
    # Also on an error (e.g. a NaN loss): finish the checkpoints already being written.
    train_iter.close()
    ckpts.wait()
    ckpts.close()
    writer.close()
  logging.info('Done in %s.', _hms(time.time() - t_start))
  return {'step': step, **val}


def _train_iterator(config, start_step, mesh):
  """The unpaired (source, target) batches of the run from `start_step` on."""
  return input_pipeline.create_train_iterator(
    config.data.source.prepared_dir,
    config.data.target.tfds_dir or config.data.target.prepared_dir,
    global_batch_size=config.train.global_batch_size,
    seed=config.seed,
    start_step=start_step,
    foreground_ratio=config.data.foreground_ratio,
    augment=config.data.augment,
    context_slices=config.data.context_slices,
    target_labels=config.data.target_labels,
    mesh=mesh,
    prefetch=config.data.prefetch,
    source_cases=config.data.source.train_cases,
    paired=config.data.paired,
  )


def _start_workdir(config, workdir):
  """Process 0, before training: the config record; leftovers of a killed run removed."""
  checkpoint.save_config(workdir, config)
  checkpoint.clean_export_leftovers(workdir)
  # Temporaries of atomic writes and check_workdir left by a killed run. Probe names:
  # .write_probe_<process index>_<pid> (.write_probe_<pid> before multi-process).
  for pattern in (files.TEMPORARY_PATTERN, r'\.write_probe_(?:\d+_)?(?P<pid>\d+)'):
    files.remove_stale_temporaries(workdir, pattern)


def _initial_state(config, nets, image_shape, mesh, ckpts):
  """(state, its sharding): the newest checkpoint that restores, else a new one (initialised
  under jit, replicated on the mesh), with the translator of `method.translator_init` if set."""
  init = functools.partial(train_state.create_train_state, config, nets, image_shape=image_shape)
  key = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda r: init(r)[0], key)
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_sharded = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
  )
  state = ckpts.restore_latest(abstract_sharded)
  if state is None:
    state = jax.jit(lambda r: init(r)[0], out_shardings=state_sharding)(key)
    state = _load_translator_init(config, state, replicated)
    logging.info('Initialised a new state.')
    _write_parameter_overview(ckpts.workdir, state.params)
  return state, state_sharding


def _write_parameter_overview(workdir, params):
  """The parameter table (clu) to WORKDIR/parameters.txt (process 0); one line to the log."""
  if jax.process_index() == 0:
    table = parameter_overview.get_parameter_overview(sharding.to_host(params))
    files.atomic_write(os.path.join(workdir, 'parameters.txt'), table + '\n')
  total = parameter_overview.count_parameters(params)
  logging.info('%s parameters (per network: %s/parameters.txt).', f'{total:,}', workdir)


class _Programs:
  """The run's jitted programs: the train step (state donated), test-time probabilities, the
  teacher's on G(x) and the cycle error for validation (None where the method has no such
  network), and the image summaries' outputs."""

  def __init__(self, config, nets, mesh, state_sharding):
    replicated, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    tx = train_state.make_optimizer(config)
    step = jax.jit(
      functools.partial(ts.train_step, config=config, nets=nets, tx=tx),
      in_shardings=(state_sharding, data, data),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    )
    self.step = sharding.Together(step, 'train_step')
    test_time = method.get(config).test_time
    self.probabilities = _probabilities_program(nets, test_time)
    u = method.parts(config)
    self.teacher_probabilities = None
    teacher = method.teacher_view(config)
    if teacher is not None:  # One program when teacher(G(x)) runs at test time.
      same = test_time == teacher
      self.teacher_probabilities = (
        self.probabilities if same else _probabilities_program(nets, teacher)
      )
    self.cycle_error = _cycle_error_program(nets) if u['translator_inv'] else None
    self.eval_images = sharding.Together(
      jax.jit(functools.partial(ts.eval_step, config=config, nets=nets, with_translations=True)),
      'eval_images',
    )


def _probabilities_program(nets, test_time):
  """jit (state, slices [B,H,W,C]) -> softmax probabilities [B,H,W,K] of network `test_time`."""
  return sharding.Together(
    jax.jit(
      lambda st, x: jax.nn.softmax(
        method.infer_logits(st.params, st.batch_stats, x, nets=nets, test_time=test_time), -1
      )
    ),
    'probabilities',
  )


def _cycle_error_program(nets):
  """jit (state, slices [B,H,W,C] in [-1, 1]) -> mean |F(G(x)) - x| per slice [B,1]."""

  def error(st, x):
    fake = method.translate(nets, st.params, x)
    cycle = nets.translator_inv.apply({'params': st.params['translator_inv']}, fake)
    return jnp.abs(cycle.astype(jnp.float32) - x).mean((1, 2, 3))[:, None]

  return sharding.Together(jax.jit(error), 'cycle_error')


class _Progress:
  """Console lines (steps/s, ETA, data wait, losses) and TensorBoard scalars every log step."""

  def __init__(self, config, writer, on_log, start_step):
    self.config, self.writer, self.on_log = config, writer, on_log
    self.t_last, self.steps_last, self.data_wait = time.time(), start_step, 0.0

  def log(self, step, metrics):
    config, num_steps = self.config, self.config.train.num_steps
    scalars = {k: float(v) for k, v in sharding.to_host(metrics).items()}
    _check_finite(scalars, step)
    now = time.time()
    steps_per_sec = (step - self.steps_last) / max(now - self.t_last, 1e-9)
    scalars.update(
      {f'lr/{g}': float(v) for g, v in train_state.learning_rates(config, step).items()}
    )
    scalars['perf/steps_per_sec'] = steps_per_sec
    scalars['perf/data_wait_fraction'] = self.data_wait / max(now - self.t_last, 1e-9)
    self.writer.write_scalars(step, scalars)
    if self.on_log is not None:
      self.on_log(step, scalars)
    eta = (num_steps - step) / max(steps_per_sec, 1e-9)
    logging.info(
      'step %d/%d  %.2f steps/s  ETA %s  data wait %.0f%%  %s',
      step,
      num_steps,
      steps_per_sec,
      _hms(eta),
      100 * scalars['perf/data_wait_fraction'],
      '  '.join(f'{k.split("/")[-1]}={v:.4f}' for k, v in scalars.items() if k.startswith('loss/')),
    )
    self.t_last, self.steps_last, self.data_wait = now, step, 0.0


def _train_loop(config, workdir, state, step, programs, train_iter, writer, ckpts, mesh, on_log):
  """Steps from `step` to train.num_steps (or a stop signal): logs, image summaries,
  validation, checkpoints. Returns (last step, state, last validation metrics)."""
  train = config.train
  val_volumes = validation.validation_volumes(config)
  val_history = validation.read_validation_history(workdir, step)
  val = {k: v for k, v in (val_history[-1] if val_history else {}).items() if k != 'step'}
  progress = _Progress(config, writer, on_log, step)
  pending = None  # (step, metrics) of the previous step, checked while the next one runs.
  with _StopFlag() as stop:
    while step < train.num_steps:
      t0 = time.time()
      src, tgt = next(train_iter)
      progress.data_wait += time.time() - t0
      state, metrics = programs.step(state, src, tgt)
      step += 1
      if pending is not None:
        _check_finite(sharding.to_host(pending[1]), pending[0])
      pending = (step, metrics)
      last = step == train.num_steps
      stop_signal = stop.any_process()
      if step % train.log_every == 0 or last:
        progress.log(step, metrics)
      if step % train.image_every == 0 or last:
        writer.write_images(
          step, validation.image_summaries(config, state, src, programs.eval_images, mesh)
        )
      if val_volumes and (step % train.eval_every == 0 or last):
        _check_finite(sharding.to_host(metrics), step)
        val = validation.validate_and_record(
          config,
          workdir,
          state,
          step,
          programs,
          val_volumes,
          val_history,
          writer,
          ckpts,
          mesh,
          on_log,
        )
      if step % train.checkpoint_every == 0 or last or stop_signal:
        _check_finite(sharding.to_host(metrics), step)
        ckpts.save(step, state)
      if stop_signal:
        logging.warning('Received %s: saved step %d, exiting.', stop_signal, step)
        break
  return step, state, val


def _load_translator_init(config, state, replicated):
  """Two-stage ablation: copies translator parameters from a 'translator_only' run."""
  src = config.method.translator_init
  if not src:
    return state
  path = os.path.join(src, 'checkpoints')
  other = checkpoint.load_variables(checkpoint.latest_checkpoint(src))  # The networks only.
  params = dict(state.params)
  for name in ('translator', 'translator_inv'):
    if name in params:
      if name not in other['params']:
        raise ValueError(f'{path}: has no {name!r} parameters to initialise from')
      params[name] = sharding.from_host(other['params'][name], replicated)
  logging.info('Translator initialised from %s', path)
  return state.replace(params=params)


def _hms(seconds):
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
