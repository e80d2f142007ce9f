"""Tests of cmedl_jax.image_pool against CycleGAN's ImagePool semantics, replayed in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from cmedl_jax import image_pool

SHAPE = (2, 3, 1)  # every image is constant: value = its id


def images(values):
  values = np.asarray(values, np.float32)[:, None, None, None]
  return jnp.asarray(values * np.ones(SHAPE, np.float32))


def ids(batch):
  """Image ids of [N, H, W, C] constant images (asserting they are still constant)."""
  batch = np.asarray(batch)
  np.testing.assert_array_equal(batch, batch[:, :1, :1, :1] * np.ones_like(batch))
  return batch[:, 0, 0, 0]


def replay(slots, count, inputs, outputs):
  """Checks one query against the reference semantics.

  slots: the pool's ids before the query (numpy, updated in place); count: its fill.
  Returns (new count, swapped [N] bool, slot index used by each swap or -1).
  """
  size = slots.size
  swapped = np.zeros(inputs.size, bool)
  used = np.full(inputs.size, -1)
  for i, (new, out) in enumerate(zip(inputs, outputs)):
    if count < size:  # not full: stored in the next slot and returned as is
      assert out == new, (i, out, new)
      slots[count] = new
      count += 1
    elif out != new:  # swapped: a stored image comes back, the new one takes its slot
      (where,) = np.nonzero(slots == out)
      assert where.size == 1, f'output {i} ({out}) was not in the pool'
      slots[where[0]] = new
      swapped[i], used[i] = True, where[0]
  return count, swapped, used


def test_history_pool_semantics():
  pool = image_pool.init_pool(3, (1, 1, 1))
  first = jnp.arange(2, dtype=jnp.float32).reshape(2, 1, 1, 1)
  out, pool = image_pool.query_pool(pool, first, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, first)  # Not full yet: returned as given, and stored.
  assert int(pool['count']) == 2
  new = jnp.full((64, 1, 1, 1), 9.0)
  out, pool = image_pool.query_pool(pool, new, jax.random.PRNGKey(1))
  assert int(pool['count']) == 3
  returned_old = np.sum(np.asarray(out) != 9.0)
  assert 0 < returned_old < 64  # Some swapped for stored ones, most not all.


def test_size_zero_is_the_identity():
  pool = image_pool.init_pool(0, SHAPE)
  x = images(np.arange(5))
  out, after = image_pool.query_pool(pool, x, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, x)
  assert after['images'].shape == (0, *SHAPE) and int(after['count']) == 0


def test_fill_then_swap_half_with_uniform_random_slots():
  size, n = 50, 2000
  query = jax.jit(image_pool.query_pool)
  pool = image_pool.init_pool(size, SHAPE)
  slots, count = np.full(size, -1.0), 0  # reference pool: ids, -1 = empty

  # Not full: inputs come back unchanged and are stored in order.
  x = np.arange(30)
  out, pool = query(pool, images(x), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(ids(out), x)
  np.testing.assert_array_equal(ids(pool['images'])[:30], x)
  np.testing.assert_array_equal(ids(pool['images'])[30:], 0)  # untouched zeros
  assert int(pool['count']) == 30
  count, _, _ = replay(slots, count, x, x)

  # A query that fills the last 20 slots, then continues with the full pool.
  x = np.arange(30, 60)
  out, pool = query(pool, images(x), jax.random.PRNGKey(1))
  np.testing.assert_array_equal(ids(out)[:20], x[:20])
  count, _, _ = replay(slots, count, x, ids(out))
  assert count == size and int(pool['count']) == size
  np.testing.assert_array_equal(ids(pool['images']), slots)

  # Full: each image is swapped with probability 1/2, for a uniformly random stored one.
  x = np.arange(1000, 1000 + n)
  out, pool = query(pool, images(x), jax.random.PRNGKey(2))
  before = slots.copy()
  count, swapped, used = replay(slots, count, x, ids(out))
  assert int(pool['count']) == size
  np.testing.assert_array_equal(ids(pool['images']), slots)  # exactly the replayed pool
  sd = np.sqrt(0.25 / n)
  assert abs(swapped.mean() - 0.5) <= 4 * sd, swapped.mean()
  # Both images stored by the earlier queries and ones swapped in by this query come back.
  returned = ids(out)[swapped]
  assert np.isin(returned, before).any() and (returned >= 1000).any()
  # The swapped slot is uniform over the pool (chi-square, 49 degrees of freedom).
  hist = np.bincount(used[swapped], minlength=size)
  chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
  assert chi2 < stats.chi2.ppf(1 - 1e-6, size - 1), hist
