"""The pools of the stem and of ResNet-D's shortcut, with PyTorch's semantics."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import cpu, windows


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(3, stride=2, padding=1): padding never wins the max.

  XLA's reduce_window in programs lowered for TPU and GPU; for CPU, the formulation of
  `resnet_jax.models.cpu`, which XLA:CPU runs faster.
  """
  return cpu.on_cpu(cpu.max_pool_3x3_s2, reduce_window_max_3x3_s2, x)


def reduce_window_max_3x3_s2(x: jax.Array) -> jax.Array:
  """The portable form of `max_pool_3x3_s2`: XLA's reduce_window."""
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
