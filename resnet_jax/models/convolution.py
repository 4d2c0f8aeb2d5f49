"""2-D convolution (NHWC input, HWIO kernel) with formulations XLA:CPU runs fast.

XLA's own convolution is used everywhere except where XLA:CPU is known to be slow:

* Feature maps smaller than the kernel (a 3x3 conv on the 2x2 or 1x1 maps of the last
  stage at small image sizes) run as one matrix multiply over extracted patches; XLA:CPU's
  convolution is tens of times slower on them.
* The kernel gradient on CPU is one matrix multiply per kernel tap, dy^T @ x[tap]
  (or one over gathered patches when there are few input channels), instead of
  XLA:CPU's convolution with the batch as its feature axis, which runs 1.5-4x slower
  and makes XLA transpose the activations and the incoming gradient. Small
  convolutions (under MIN_MATMUL_GRAD_FLOPS) keep XLA's, which costs little there and
  compiles faster. Other backends keep XLA's kernel
  gradient (cuDNN's on GPU), chosen at lowering time by `jax.lax.platform_dependent`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
MIN_MATMUL_GRAD_FLOPS = 10**8  # of the kernel gradient; about a millisecond on a CPU core


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """`jax.lax.conv_general_dilated` on NHWC/HWIO with square strides, same results."""
  k = kernel.shape[0]
  if groups == 1 and k > 1 and min(x.shape[1:3]) < k:
    return _conv_as_matmul(x, kernel, strides, padding)
  out_h, out_w = _output_shape(x, k, strides, padding)
  kernel_grad_flops = 2 * x.shape[0] * out_h * out_w * kernel.size
  if groups == 1 and kernel_grad_flops >= MIN_MATMUL_GRAD_FLOPS:
    return conv_with_matmul_kernel_grad(x, kernel, strides, padding)
  return _xla_conv(x, kernel, strides, padding, groups)


def _xla_conv(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=groups)


def _output_shape(x, kernel_size, strides, padding):
  return tuple((x.shape[1 + d] + sum(padding[d]) - kernel_size) // strides + 1 for d in (0, 1))


def _patches(x, kernel_size, strides, padding, out_shape):
  """The k*k strided views of padded x that the kernel taps see, row by row."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = out_shape
  return [x[:, i:i + strides * (out_h - 1) + 1:strides, j:j + strides * (out_w - 1) + 1:strides]
          for i in range(kernel_size) for j in range(kernel_size)]


def _gathered_patches(x, kernel_size, strides, padding, out_shape):
  """(n, out_h, out_w, k, k, c) patches of padded x, gathered in one pass (im2col)."""
  n, _, _, c = x.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  width = x.shape[2]
  taps = np.arange(kernel_size)
  rows = np.arange(out_shape[0])[:, None, None, None] * strides + taps[None, None, :, None]
  cols = np.arange(out_shape[1])[None, :, None, None] * strides + taps[None, None, None, :]
  return x.reshape(n, -1, c)[:, (rows * width + cols).astype(np.int32)]


def _matmul(a, b):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _conv_as_matmul(x, kernel, strides, padding):
  """The same convolution as patches @ kernel (im2col)."""
  k = kernel.shape[0]
  views = _patches(x, k, strides, padding, _output_shape(x, k, strides, padding))
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
    patches = _gathered_patches(x, k, strides, padding, dy.shape[1:3])
    grad = _matmul(dy_t, patches.reshape(-1, k * k * in_features))
    return grad.reshape(out_features, k, k, in_features).transpose(1, 2, 3, 0)
  views = _patches(x, k, strides, padding, dy.shape[1:3])
  grad = jnp.stack([_matmul(dy_t, view.reshape(-1, in_features)) for view in views])
  return grad.reshape(k, k, out_features, in_features).transpose(0, 1, 3, 2)


conv_with_matmul_kernel_grad.defvjp(_forward, _backward)
