"""The convolution: the `Conv` module that blocks use and the functional `conv2d` it runs.

`conv2d` (NHWC input, HWIO kernel) is XLA's convolution with XLA's own gradients in
programs lowered for TPU and GPU; in programs lowered for CPU it is the formulation of
`resnet_jax.models.cpu`, which XLA:CPU runs faster, with the same results. On TPU the
7x7/2 stem on RGB images runs as a 4x4 convolution on the 2x2 space-to-depth of the image
(`space_to_depth_conv`, as MLPerf's TPU ResNet-50 submissions did), built at run time
from the same 7x7x3 kernel: the same variables, the same results, less time by libtpu's
estimate (benchmarks/RESULTS.md). Which formulation runs is chosen when the program is
lowered (`jax.lax.platform_dependent`), so it changes no variable and no trace.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax.ad_checkpoint import checkpoint_name

from resnet_jax.models import cpu, windows
from resnet_jax.models.remat import CONV_OUTPUT
from resnet_jax.models.windows import Padding

# torchvision initializes convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Conv(nn.Module):
  """A bias-free square convolution padded by kernel_size // 2 on every side, as PyTorch pads.

  Not 'SAME' (see `windows.torch_padding`). The kernel is HWIO, named 'kernel' as in
  `nn.Conv`. Blocks get it as
  `functools.partial(Conv, dtype=..., param_dtype=...)` and call it as
  `conv(features, kernel_size, strides, name=...)`.
  """
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', conv_kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return conv2d(x, kernel, self.strides, windows.torch_padding(k), self.groups)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """`jax.lax.conv_general_dilated` on NHWC/HWIO with square strides, same results.

  The output is tagged `remat.CONV_OUTPUT`, the values `remat.SAVE_CONV_OUTPUTS` keeps.
  """
  def formulation(conv):
    return lambda x, kernel: conv(x, kernel, strides, padding, groups)
  if uses_space_to_depth(x, kernel, strides, groups):
    y = jax.lax.platform_dependent(
        x, kernel, cpu=formulation(cpu.conv2d),
        tpu=lambda x, kernel: space_to_depth_conv(x, kernel, padding),
        default=formulation(cpu.xla_conv))
  else:
    y = cpu.on_cpu(formulation(cpu.conv2d), formulation(cpu.xla_conv), x, kernel)
  return checkpoint_name(y, CONV_OUTPUT)


def uses_space_to_depth(x: jax.Array, kernel: jax.Array, strides: int, groups: int) -> bool:
  """Whether TPU programs run this convolution as `space_to_depth_conv`: a stride-2
  convolution by an odd kernel of 5 or more on few input channels (the 7x7/2 stem on RGB
  images), which a TPU's matrix units run lane-sparse. The deep stems' 3x3/2 is left
  as it is (not measured)."""
  k = kernel.shape[0]
  return strides == 2 and groups == 1 and x.shape[-1] <= 4 and k % 2 == 1 and k >= 5


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """The stride-2 convolution of `x` by `kernel` (HWIO, k x k) as a stride-1 one on the
  2x2 space-to-depth of `x`, by the kernel zero-padded to an even size and rearranged the
  same way: y[o] = sum_t xp[2o + t] w[t] with t = 2j + r is sum_j z[o + j] W[j], where
  z[m, r] = xp[2m + r] and W[j, r] = w[2j + r]. The same products and sums as
  `xla_conv`; only the order of the additions may differ.

  The padding moves to the stride-1 convolution, in pairs of pixels: an odd padding gets
  one more zero pixel before the image and a zero tap before the kernel's first, so that
  no pad of the 3-channel image (lane-sparse on a TPU, and costly) is needed for even
  image sizes.
  """
  k, _, c, features = kernel.shape
  half = (k + 1) // 2  # taps per axis of the rearranged kernel
  pairs, extra = [], []
  for axis, (before, after) in zip((1, 2), padding):
    front = before % 2  # zero taps before the kernel's first
    out = (x.shape[axis] + before + after - k) // 2 + 1
    size = x.shape[axis] + x.shape[axis] % 2  # the image made even
    lead = (before + front) // 2
    pairs.append((lead, out + half - 1 - lead - size // 2))
    extra.append((front, 2 * half - k - front, x.shape[axis] % 2))
  (f0, b0, odd0), (f1, b1, odd1) = extra
  if odd0 or odd1:
    x = jnp.pad(x, ((0, 0), (0, odd0), (0, odd1), (0, 0)))
  n, h, w, _ = x.shape
  z = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, h // 2, w // 2, 4 * c)
  kernel = jnp.pad(kernel, ((f0, b0), (f1, b1), (0, 0), (0, 0)))
  kernel = kernel.reshape(half, 2, half, 2, c, features).transpose(0, 2, 1, 3, 4, 5).reshape(
      half, half, 4 * c, features)
  return cpu.xla_conv(z, kernel, 1, tuple(pairs))
