"""The convolution against PyTorch: padding, init, and its own gradient formulations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, nhwc
from resnet_jax.models import convolution


def _pad(kernel_size):
  return ((kernel_size // 2,) * 2,) * 2


def _grads(conv, x, kernel, strides, cotangent):
  pad = _pad(kernel.shape[0])
  y, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, strides, pad), x, kernel)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize('conv, kernel_size, strides, size, in_features', [
    # Per-tap matmuls (16 or more input channels).
    (convolution.conv_with_matmul_kernel_grad, 3, 1, (9, 9), 16),
    (convolution.conv_with_matmul_kernel_grad, 3, 2, (10, 7), 16),
    (convolution.conv_with_matmul_kernel_grad, 1, 2, (6, 7), 24),
    # One matmul over gathered patches (few input channels: the stem).
    (convolution.conv_with_matmul_kernel_grad, 7, 2, (16, 15), 3),
    (convolution.conv_with_matmul_kernel_grad, 3, 1, (5, 6), 4),
    # Maps smaller than the kernel: the im2col forward; and XLA's own.
    (convolution.conv2d, 3, 1, (2, 2), 16),
    (convolution.conv2d, 3, 2, (9, 9), 16),
])
def test_conv_gradients_match_torch(conv, kernel_size, strides, size, in_features):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, in_features)).astype(np.float32)
  kernel = rng.normal(size=(kernel_size, kernel_size, in_features, 8)).astype(np.float32)
  y_shape = jax.eval_shape(lambda: conv(x, kernel, strides, _pad(kernel_size))).shape
  cotangent = rng.normal(size=y_shape).astype(np.float32)
  y, dx, dkernel = _grads(conv, x, kernel, strides, cotangent)

  x_t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  k_t = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
  y_t = torch.nn.functional.conv2d(x_t, k_t, stride=strides, padding=kernel_size // 2)
  y_t.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, x_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dkernel, k_t.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_kernel_gradient_keeps_dtype_and_sums_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 12, 12, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.bfloat16)
  cotangent = jnp.ones((8, 12, 12, 16), jnp.bfloat16)
  _, _, dkernel = _grads(convolution.conv_with_matmul_kernel_grad, x, kernel, 1, cotangent)
  _, _, reference = _grads(convolution.conv_with_matmul_kernel_grad, x.astype(jnp.float32),
                           kernel.astype(jnp.float32), 1, cotangent.astype(jnp.float32))
  assert dkernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(dkernel.astype(jnp.float32), reference, rtol=2e-2, atol=0.5)


def _kernel_grad_ops(batch, platform='cpu'):
  x, kernel = jnp.zeros((batch, 16, 16, 16)), jnp.zeros((3, 3, 16, 16))
  grad = jax.jit(jax.grad(lambda kernel: convolution.conv2d(x, kernel, 1, _pad(3)).sum()))
  return grad.trace(kernel).lower(lowering_platforms=(platform,)).as_text()


def test_matmul_kernel_gradient_is_for_large_convolutions_on_cpu_only():
  large = -(-convolution.MIN_MATMUL_GRAD_FLOPS // (2 * 16 * 16 * 3 * 3 * 16 * 16))
  cpu, cuda = _kernel_grad_ops(large), _kernel_grad_ops(large, 'cuda')
  assert 'dot_general' in cpu and 'convolution' not in cpu
  # Elsewhere XLA's convolution (cuDNN's on GPU), as for small convolutions on CPU.
  assert 'dot_general' not in cuda and cuda.count('stablehlo.convolution') == 1
  small = _kernel_grad_ops(large - 1)
  assert 'dot_general' not in small and small.count('stablehlo.convolution') == 1


@pytest.mark.parametrize('kernel, stride, size', [
    (7, 2, (32, 32)), (3, 2, (8, 10)), (3, 1, (5, 5)), (1, 2, (6, 7)),
    # Maps smaller than the kernel take the matmul path.
    (3, 1, (1, 1)), (3, 1, (2, 2)), (3, 2, (2, 3)), (7, 2, (5, 6))])
def test_conv_pads_like_torch(kernel, stride, size):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, *size, 4)).astype(np.float32)
  module = convolution.Conv(6, kernel, stride, name='conv')
  variables = module.init(jax.random.PRNGKey(0), x)
  kernel_hwio = np.asarray(variables['params']['kernel'])
  torch_conv = torch.nn.Conv2d(4, 6, kernel, stride, kernel // 2, bias=False)
  with torch.no_grad():
    torch_conv.weight.copy_(torch.tensor(kernel_hwio.transpose(3, 2, 0, 1)))
  np.testing.assert_allclose(module.apply(variables, x), nhwc(torch_conv(nchw(x))),
                             atol=1e-5)


def test_conv_init_is_kaiming_fan_out():
  variables = convolution.Conv(256, 3, name='c').init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 4, 4, 64)))
  std = float(jnp.std(variables['params']['kernel']))
  assert abs(std - (2.0 / (256 * 9)) ** 0.5) < 0.002
