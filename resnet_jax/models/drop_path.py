"""Stochastic depth on the residual branch (Huang et al. 2016), as timm's `drop_path`.

In training, each example's residual branch is dropped with probability `rate` and kept
branches are scaled by 1 / (1 - rate), so the expected output is the eval-mode output;
the rate rises linearly with the block's index over all blocks of the network, from 0 at
the first block to `drop_path_rate` at the last (timm's ResNet rule).
"""

from typing import List

import jax
import jax.numpy as jnp

RNG_STREAM = 'drop_path'  # the rng collection the models draw the masks from


def block_rates(drop_path_rate: float, stage_sizes) -> List[List[float]]:
  """Per stage, the drop rate of each block: `drop_path_rate * i / (n - 1)` for the i-th
  of all n blocks (timm's `drop_path_rate * net_block_idx / (net_num_blocks - 1)`)."""
  total = sum(stage_sizes)
  rates, index = [], 0
  for size in stage_sizes:
    rates.append([drop_path_rate * (index + i) / max(1, total - 1) for i in range(size)])
    index += size
  return rates


def drop_path_mask(rng: jax.Array, rate, batch_size: int, dtype=jnp.float32) -> jax.Array:
  """The (batch, 1, 1, 1) multiplier: 0 for a dropped example, 1 / (1 - rate) for a kept
  one (timm draws bernoulli(1 - rate) and divides it by 1 - rate)."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  kept = jax.random.bernoulli(rng, keep, (batch_size, 1, 1, 1))
  return (kept.astype(jnp.float32) / keep).astype(dtype)


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
  """`x` (NHWC) with each example dropped with probability `rate` (a scalar, may be
  traced) and the kept ones scaled by 1 / (1 - rate)."""
  return x * drop_path_mask(rng, rate, x.shape[0], x.dtype)
