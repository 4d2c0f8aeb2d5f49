"""Strided windows of NHWC feature maps: what each tap of a k x k kernel or pool sees.

The one owner of the padding and output-size arithmetic that the convolution's matmul
paths (`convolution.py`) and the max pool (`pooling.py`) share.
"""

import jax
import jax.numpy as jnp
import numpy as np

Padding = tuple[tuple[int, int], tuple[int, int]]


def torch_padding(kernel_size: int) -> Padding:
  """kernel_size // 2 on every side, as PyTorch pads.

  'SAME' would put the extra row of a stride-2 window at the end, which shifts every
  output on even input sizes and breaks parity with PyTorch weights.
  """
  return ((kernel_size // 2, kernel_size // 2),) * 2


def output_shape(x: jax.Array, kernel_size: int, strides: int,
                 padding: Padding) -> tuple[int, int]:
  """(out_h, out_w) of a kernel_size window sliding by `strides` over padded x."""
  return tuple((x.shape[1 + d] + sum(padding[d]) - kernel_size) // strides + 1 for d in (0, 1))


def _pad(x, padding, value):
  return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=value)


def window_views(x: jax.Array, kernel_size: int, strides: int, padding: Padding,
                 pad_value: float = 0) -> list[jax.Array]:
  """The kernel_size**2 strided views of padded x, one per window tap, row by row.

  View (i, j) has shape (n, out_h, out_w, c): at every output position, the pixel that
  tap (i, j) of the window sees. They are plain strided slices, so their gradients are
  pads that XLA fuses.
  """
  out_h, out_w = output_shape(x, kernel_size, strides, padding)
  x = _pad(x, padding, pad_value)
  return [x[:, i:i + strides * (out_h - 1) + 1:strides, j:j + strides * (out_w - 1) + 1:strides]
          for i in range(kernel_size) for j in range(kernel_size)]


def gathered_windows(x: jax.Array, kernel_size: int, strides: int,
                     padding: Padding) -> jax.Array:
  """(n, out_h, out_w, k, k, c): every window of zero-padded x, gathered in one pass (im2col).

  The same values as `window_views` stacked on axis 3, written as one gather because
  stacking the views is a concatenate, which XLA:CPU runs slowly (benchmarks/RESULTS.md,
  "im2col by concatenation").
  """
  n, _, _, c = x.shape
  out_h, out_w = output_shape(x, kernel_size, strides, padding)
  x = _pad(x, padding, 0)
  width = x.shape[2]
  taps = np.arange(kernel_size)
  rows = np.arange(out_h)[:, None, None, None] * strides + taps[None, None, :, None]
  cols = np.arange(out_w)[None, :, None, None] * strides + taps[None, None, None, :]
  return x.reshape(n, -1, c)[:, (rows * width + cols).astype(np.int32)]
