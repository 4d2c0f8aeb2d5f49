"""The convolution: the `Conv` module that blocks use and the functional `conv2d` it runs.

`conv2d` (NHWC input, HWIO kernel) is XLA's convolution with XLA's own gradients in
programs lowered for TPU and GPU; in programs lowered for CPU it is the formulation of
`resnet_jax.models.cpu`, which XLA:CPU runs faster, with the same results.
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
  y = cpu.on_cpu(formulation(cpu.conv2d), formulation(cpu.xla_conv), x, kernel)
  return checkpoint_name(y, CONV_OUTPUT)
