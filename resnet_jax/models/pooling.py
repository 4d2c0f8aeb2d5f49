"""The pools of the stem and of ResNet-D's shortcut, with PyTorch's semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import windows


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(3, stride=2, padding=1): padding never wins the max.

  On CPU, the maximum of nine strided views: its gradient is then elementwise selects
  that fuse, where reduce_window's select-and-scatter gradient runs slower on XLA:CPU.
  Elsewhere (TPU, GPU), XLA's reduce_window: the views and their gradients hold padded
  copies of the stem's activations, ~1 GiB per chip more for ResNet-50 at 256 images on
  a TPU (benchmarks/RESULTS.md). Chosen at lowering time by `jax.lax.platform_dependent`.
  """
  return jax.lax.platform_dependent(x, cpu=_max_of_views, default=_reduce_window_max)


def _max_of_views(x: jax.Array) -> jax.Array:
  views = windows.window_views(x, 3, 2, windows.torch_padding(3), pad_value=-jnp.inf)
  return functools.reduce(jnp.maximum, views)


def _reduce_window_max(x: jax.Array) -> jax.Array:
  padding = ((0, 0), *windows.torch_padding(3), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), padding)


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
  """torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), ResNet-D's shortcut.

  On odd sizes the last window is partial and averages only the pixels it covers.
  """
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  summed = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).sum((2, 4))
  counts = np.pad(np.ones((h, w)), ((0, h % 2), (0, w % 2)))
  counts = counts.reshape((h + 1) // 2, 2, (w + 1) // 2, 2).sum((1, 3))
  return summed / counts[None, :, :, None].astype(x.dtype)
