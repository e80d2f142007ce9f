"""CycleGAN's history pool of translated images, as a fixed-size array kept in the train state.

Shrivastava et al. 2017 / CycleGAN `ImagePool`: the discriminators see a mix of the newest
translations and older ones. Until the pool is full every image is stored and returned; after
that each image, with probability 1/2, is swapped with a random stored one (the stored one is
returned), else returned as is. Pure and jit-able.
"""

import jax
import jax.numpy as jnp


def init_pool(size, image_shape):
  """Empty pool. image_shape: (H, W, C). Returns {'images': [size,H,W,C], 'count': int32}."""
  return {'images': jnp.zeros((size, *image_shape), jnp.float32), 'count': jnp.zeros((), jnp.int32)}


def query_pool(pool, images, rng):
  """Returns (images for the discriminator [N,H,W,C], updated pool). images: [N,H,W,C]."""
  size = pool['images'].shape[0]
  if size == 0:
    return images, pool

  def one(carry, inputs):
    stored, count = carry
    image, key = inputs
    k_swap, k_idx = jax.random.split(key)
    not_full = count < size
    swap = jax.random.bernoulli(k_swap, 0.5)
    idx = jnp.where(not_full, count, jax.random.randint(k_idx, (), 0, size))
    old = stored[idx]
    out = jnp.where(~not_full & swap, old, image)
    write = not_full | swap
    stored = stored.at[idx].set(jnp.where(write, image, old))
    return (stored, jnp.minimum(count + 1, size)), out

  keys = jax.random.split(rng, images.shape[0])
  (stored, count), out = jax.lax.scan(
    one, (pool['images'], pool['count']), (images.astype(jnp.float32), keys)
  )
  return out.astype(images.dtype), {'images': stored, 'count': count}
