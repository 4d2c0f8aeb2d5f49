"""The CPU formulations of the convolution and the max pool, and the seam that picks them.

XLA:CPU runs a few of the model's ops slowly (figures in benchmarks/RESULTS.md), so on
CPU, and only there, they are written differently, with the same results:

* A convolution whose feature map is smaller than its kernel (a 3x3 convolution on the
  2x2 or 1x1 maps of the last stage at small image sizes) is one matrix multiply over
  extracted patches (im2col).
* The kernel gradient of a large convolution (MIN_MATMUL_GRAD_FLOPS or more) is one
  matrix multiply per kernel tap, dy^T @ x[tap] (or one over gathered patches when there
  are few input channels), instead of XLA:CPU's convolution with the batch as its feature
  axis, which is slower and makes XLA transpose the activations and the incoming
  gradient. Smaller ones keep XLA's, which costs little there.
* The 3x3/2 max pool is the maximum of nine strided views: its gradient is elementwise
  selects that fuse, where reduce_window's select-and-scatter runs slower on XLA:CPU.

`on_cpu` chooses when the program is lowered (`jax.lax.platform_dependent`), not when it
is traced: the planner traces TPU programs on a CPU host, and `jax.export` may lower one
trace for several platforms. Programs lowered for TPU or GPU hold only the portable
formulation (XLA's convolution and its own gradients, reduce_window): these
formulations would make them larger there (the views are padded copies of the
activations; benchmarks/RESULTS.md).

The convolution's choice sits inside one custom VJP (`conv`): one choice in the forward
pass, one in the backward, never under autodiff. Differentiating through the choice
would trace, linearize and transpose both formulations, and its residuals (every
kernel, restacked per block under scan) would pass through the switch: a longer
compile (benchmarks/RESULTS.md, 2026-12-07).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from resnet_jax.models import windows
from resnet_jax.models.windows import Padding

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
MIN_MATMUL_GRAD_FLOPS = 10**8  # of the kernel gradient; below it XLA's is cheap enough


def on_cpu(cpu_formulation: Callable, portable: Callable, *args):
  """`cpu_formulation(*args)` in programs lowered for CPU, `portable(*args)` elsewhere."""
  return jax.lax.platform_dependent(*args, cpu=cpu_formulation, default=portable)


def xla_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
             groups: int = 1) -> jax.Array:
  """`jax.lax.conv_general_dilated` on NHWC/HWIO with square strides: the portable form."""
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
         groups: int = 1) -> jax.Array:
  """`xla_conv` with XLA's own gradients in programs lowered for TPU and GPU, `conv2d`
  and its gradients in programs lowered for CPU (`on_cpu`, in the forward and in the
  backward pass)."""
  return on_cpu(_formulation(conv2d, strides, padding, groups),
                _formulation(xla_conv, strides, padding, groups), x, kernel)


def _formulation(convolution, strides, padding, groups):
  return lambda x, kernel: convolution(x, kernel, strides, padding, groups)


def _conv_forward(x, kernel, strides, padding, groups):
  """With symbolic zeros: an input that takes no gradient (the stem's image) gets no
  input gradient, as autodiff would skip it; the residuals' structure says which."""
  y = conv(x.value, kernel.value, strides, padding, groups)
  return y, (x.value, kernel.value) + ((None,) if x.perturbed else ())


def _conv_backward(strides, padding, groups, residuals, dy):
  x, kernel, *input_gradient = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None

  def gradients(convolution):
    formulation = _formulation(convolution, strides, padding, groups)
    if input_gradient:
      return lambda x, kernel, dy: jax.vjp(formulation, x, kernel)[1](dy)
    return lambda x, kernel, dy: (
        jax.vjp(lambda kernel: formulation(x, kernel), kernel)[1](dy)[0],)
  grads = on_cpu(gradients(conv2d), gradients(xla_conv), x, kernel, dy)
  return tuple(grads) if input_gradient else (None, grads[0])


conv.defvjp(_conv_forward, _conv_backward, symbolic_zeros=True)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """The convolution as XLA:CPU runs it fastest; the same results as `xla_conv`.

  A symbolic batch (`jax.export`) traces; it counts as large, which changes only the
  backward pass, which serving never runs.
  """
  if groups == 1 and kernel.shape[0] > 1 and min(x.shape[1:3]) < kernel.shape[0]:
    return _conv_as_matmul(x, kernel, strides, padding)
  if groups == 1 and not _small(x, kernel, strides, padding):
    return conv_with_matmul_kernel_grad(x, kernel, strides, padding)
  return xla_conv(x, kernel, strides, padding, groups)  # less to trace and compile


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(3, stride=2, padding=1) as the maximum of nine strided views."""
  views = windows.window_views(x, 3, 2, windows.torch_padding(3), pad_value=-jnp.inf)
  return functools.reduce(jnp.maximum, views)


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
  """XLA's convolution, whose kernel gradient, if large, is computed by matrix multiplies."""
  return xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return xla_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, strides, padding), x)
  if not _small(x, kernel, strides, padding):
    dkernel = _matmul_kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  else:
    _, kernel_vjp = jax.vjp(lambda kernel: xla_conv(x, kernel, strides, padding), kernel)
    dkernel = kernel_vjp(dy)[0]
  return input_vjp(dy)[0], dkernel


def _kernel_grad_flops(x, kernel, strides, padding) -> int:
  out_h, out_w = windows.output_shape(x, kernel.shape[0], strides, padding)
  return 2 * x.shape[0] * out_h * out_w * kernel.size


def _small(x, kernel, strides, padding) -> bool:
  """Whether the kernel gradient is known to be below MIN_MATMUL_GRAD_FLOPS."""
  if not isinstance(x.shape[0], int):  # a symbolic batch: counted as large
    return False
  return _kernel_grad_flops(x, kernel, strides, padding) < MIN_MATMUL_GRAD_FLOPS


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
