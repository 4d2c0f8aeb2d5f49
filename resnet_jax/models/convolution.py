"""The convolution: the `Conv` module that blocks use and the functional `conv2d` it runs.

`conv2d` (NHWC input, HWIO kernel) uses XLA's own convolution everywhere except where
XLA:CPU is known to be slow (measurements in benchmarks/RESULTS.md):

* Feature maps smaller than the kernel (a 3x3 conv on the 2x2 or 1x1 maps of the last
  stage at small image sizes) run as one matrix multiply over extracted patches.
* The kernel gradient on CPU is one matrix multiply per kernel tap, dy^T @ x[tap]
  (or one over gathered patches when there are few input channels), instead of
  XLA:CPU's convolution with the batch as its feature axis, which is slower and makes
  XLA transpose the activations and the incoming gradient. Small convolutions (under
  MIN_MATMUL_GRAD_FLOPS) keep XLA's, which costs little there and compiles faster.
  Other backends keep XLA's kernel gradient (cuDNN's on GPU), chosen at lowering time
  by `jax.lax.platform_dependent`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax.ad_checkpoint import checkpoint_name

from resnet_jax.models import windows
from resnet_jax.models.remat import CONV_OUTPUT
from resnet_jax.models.windows import Padding

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
MIN_MATMUL_GRAD_FLOPS = 10**8  # of the kernel gradient; below it XLA's is cheap enough

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
  return checkpoint_name(_conv2d(x, kernel, strides, padding, groups), CONV_OUTPUT)


def _conv2d(x, kernel, strides, padding, groups):
  k = kernel.shape[0]
  if groups == 1 and k > 1 and min(x.shape[1:3]) < k:
    return _conv_as_matmul(x, kernel, strides, padding)
  out_h, out_w = windows.output_shape(x, k, strides, padding)
  kernel_grad_flops = 2 * x.shape[0] * out_h * out_w * kernel.size
  if groups == 1 and kernel_grad_flops >= MIN_MATMUL_GRAD_FLOPS:
    return conv_with_matmul_kernel_grad(x, kernel, strides, padding)
  return _xla_conv(x, kernel, strides, padding, groups)


def _xla_conv(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=groups)


def _matmul(a, b):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _conv_as_matmul(x, kernel, strides, padding):
  """The same convolution as patches @ kernel (im2col)."""
  views = windows.window_views(x, kernel.shape[0], strides, padding)
  patches = jnp.concatenate(views, axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_with_matmul_kernel_grad(x: jax.Array, kernel: jax.Array, strides: int,
                                 padding: Padding) -> jax.Array:
  """XLA's convolution, whose kernel gradient on CPU is computed by matrix multiplies."""
  return _xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)

  def xla_kernel_grad(x, dy):
    _, kernel_vjp = jax.vjp(lambda kernel: _xla_conv(x, kernel, strides, padding), kernel)
    return kernel_vjp(dy)[0]

  def matmul_kernel_grad(x, dy):
    return _matmul_kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)

  dkernel = jax.lax.platform_dependent(x, dy, cpu=matmul_kernel_grad, default=xla_kernel_grad)
  return input_vjp(dy)[0], dkernel


def _matmul_kernel_grad(x, dy, kernel_shape, strides, padding):
  """d(loss)/d(kernel) as dy^T @ patches, in float32."""
  k, _, in_features, out_features = kernel_shape
  dy_t = dy.reshape(-1, out_features).T
  if in_features < 16:  # per-tap matmuls would be too thin: gather the patches, one matmul
    patches = windows.gathered_windows(x, k, strides, padding)
    grad = _matmul(dy_t, patches.reshape(-1, k * k * in_features))
    return grad.reshape(out_features, k, k, in_features).transpose(1, 2, 3, 0)
  views = windows.window_views(x, k, strides, padding)
  grad = jnp.stack([_matmul(dy_t, view.reshape(-1, in_features)) for view in views])
  return grad.reshape(k, k, out_features, in_features).transpose(0, 1, 3, 2)


conv_with_matmul_kernel_grad.defvjp(_forward, _backward)
