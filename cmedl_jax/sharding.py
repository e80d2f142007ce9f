"""The device mesh: one 'data' axis over all devices; state replicated, batches sharded.

With several processes a global jax.Array spans devices of other processes: `to_host` reads it
on every process, `from_host` makes one from a value every process holds.
"""

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


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
