"""The device mesh: one 'data' axis over all devices; state replicated, batches sharded.

With several processes a global jax.Array spans devices of other processes: `to_host` reads it
on every process, `from_host` makes one from a value every process holds, `barrier` waits for
all processes, and `Together` runs each new compilation of a program on all processes together.
"""

import itertools

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

DATA_AXIS = 'data'
BARRIER_TIMEOUT_S = 3600  # How long a process waits at a barrier for the slowest one.


def make_mesh(devices=None):
  """A 1-D mesh ('data',) over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_sharded(mesh):
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def shard_batch(batch, mesh):
  """A host batch (this process's rows) -> global jax.Array(s) sharded on 'data'."""
  s = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(s, np.asarray(x)), batch)


def from_host(x, sharding):
  """A global jax.Array with `sharding` from host array(s) x that every process holds whole."""

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  return jax.tree.map(put, x)


def to_host(x):
  """Host numpy value(s) of jax.Array(s), also of arrays sharded over other processes' devices
  (gathered: every process must call this)."""

  def get(a):
    if isinstance(a, jax.Array) and not (a.is_fully_addressable or a.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))

  return jax.tree.map(get, x)


def barrier(name, timeout_s=BARRIER_TIMEOUT_S):
  """Waits until every process reaches the barrier `name` (jax's distributed runtime, not a
  collective: it waits `timeout_s`). No-op with one process."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


class Together:
  """A jitted function whose first call for each new argument signature compiles it, waits
  for every process to compile it too (`barrier`), then runs it.

  XLA:CPU's gloo collectives give up when another process has not joined a program's first
  collective within 30 s; a process that compiles more slowly (a loaded machine, a cold
  compilation cache) otherwise kills the run. With one process: the jitted function itself.
  """

  _count = itertools.count()

  def __init__(self, jitted, name):
    self.jitted, self.name, self.compiled = jitted, name, {}

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self.jitted(*args)
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple(_signature(x) for x in leaves))
    if key not in self.compiled:
      self.compiled[key] = self.jitted.lower(*args).compile()
      barrier(f'cmedl_jax_compiled_{self.name}_{next(self._count)}')
    return self.compiled[key](*args)


def _signature(x):
  """Shape, dtype and sharding of an argument leaf (no device-to-host read)."""
  return np.shape(x), str(getattr(x, 'dtype', type(x).__name__)), getattr(x, 'sharding', None)
