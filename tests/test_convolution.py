"""The convolution against PyTorch: padding, init, its CPU formulations, and the portable
program lowered for TPU and GPU."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, nhwc
from resnet_jax.models import convolution, cpu
from resnet_jax.models.resnet import ResNet


def _pad(kernel_size):
  return ((kernel_size // 2,) * 2,) * 2


def _grads(conv, x, kernel, strides, cotangent):
  pad = _pad(kernel.shape[0])
  y, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, strides, pad), x, kernel)
  return (y, *vjp(cotangent))


@pytest.fixture
def matmul_kernel_grad(monkeypatch):
  """The matmul kernel gradient for every convolution, however small."""
  monkeypatch.setattr(cpu, 'MIN_MATMUL_GRAD_FLOPS', 0)


@pytest.mark.parametrize('conv, kernel_size, strides, size, in_features', [
    # Per-tap matmuls (16 or more input channels).
    (cpu.conv_with_matmul_kernel_grad, 3, 1, (9, 9), 16),
    (cpu.conv_with_matmul_kernel_grad, 3, 2, (10, 7), 16),
    (cpu.conv_with_matmul_kernel_grad, 1, 2, (6, 7), 24),
    # One matmul over gathered patches (few input channels: the stem).
    (cpu.conv_with_matmul_kernel_grad, 7, 2, (16, 15), 3),
    (cpu.conv_with_matmul_kernel_grad, 3, 1, (5, 6), 4),
    # Maps smaller than the kernel: the im2col forward; the CPU form; the portable one.
    (cpu.conv2d, 3, 1, (2, 2), 16),
    (convolution.conv2d, 3, 2, (9, 9), 16),
    (cpu.xla_conv, 3, 2, (9, 9), 16),
])
def test_conv_gradients_match_torch(conv, kernel_size, strides, size, in_features,
                                    matmul_kernel_grad):
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


def test_bfloat16_kernel_gradient_keeps_dtype_and_sums_in_float32(matmul_kernel_grad):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 12, 12, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.bfloat16)
  cotangent = jnp.ones((8, 12, 12, 16), jnp.bfloat16)
  _, _, dkernel = _grads(cpu.conv_with_matmul_kernel_grad, x, kernel, 1, cotangent)
  _, _, reference = _grads(cpu.conv_with_matmul_kernel_grad, x.astype(jnp.float32),
                           kernel.astype(jnp.float32), 1, cotangent.astype(jnp.float32))
  assert dkernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(dkernel.astype(jnp.float32), reference, rtol=2e-2, atol=0.5)


def _kernel_grad_ops(batch, platform='cpu'):
  x, kernel = jnp.zeros((batch, 16, 16, 16)), jnp.zeros((3, 3, 16, 16))
  grad = jax.jit(jax.grad(lambda kernel: convolution.conv2d(x, kernel, 1, _pad(3)).sum()))
  return grad.trace(kernel).lower(lowering_platforms=(platform,)).as_text()


def test_matmul_kernel_gradient_is_for_large_convolutions_on_cpu_only():
  large = -(-cpu.MIN_MATMUL_GRAD_FLOPS // (2 * 16 * 16 * 3 * 3 * 16 * 16))
  cpu_ops = _kernel_grad_ops(large)
  assert 'dot_general' in cpu_ops and 'convolution' not in cpu_ops
  # Elsewhere XLA's convolution (cuDNN's on GPU), as for small convolutions on CPU.
  for ops in _kernel_grad_ops(large, 'cuda'), _kernel_grad_ops(large - 1):
    assert 'dot_general' not in ops and ops.count('stablehlo.convolution') == 1


def _loss_gradient_ops(platform):
  """The StableHLO ops of a small ResNet's loss gradient lowered for `platform`, counted."""
  model = ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), num_classes=3)
  x = jnp.zeros((64, 32, 32, 3))  # large enough for the matmul kernel gradient on CPU
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1]))

  def loss(params, batch_stats):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                            mutable=['batch_stats'])
    return logits.sum()
  program = jax.jit(jax.grad(loss)).trace(variables['params'], variables['batch_stats']).lower(
      lowering_platforms=(platform,)).as_text()
  return collections.Counter(re.findall(r'stablehlo\.[a-z_]+', program))


# What `jax.lax.platform_dependent` leaves in the StableHLO for one platform: a one-branch
# `case` per choice (with its index constants, and zeros for the other branch's residuals),
# which XLA inlines and folds before it optimizes the program.
PLATFORM_SWITCH_OPS = {'stablehlo.case', 'stablehlo.return', 'stablehlo.constant',
                       'stablehlo.broadcast_in_dim'}


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_tpu_and_gpu_programs_are_xla_convolutions_only(platform, monkeypatch):
  """No CPU formulation or custom VJP shapes the TPU and GPU programs."""
  ops = _loss_gradient_ops(platform)
  monkeypatch.setattr(cpu, 'on_cpu', lambda cpu_formulation, portable, *args: portable(*args))
  portable = _loss_gradient_ops(platform)  # XLA's convolution and reduce_window alone
  assert +(ops - portable) == {op: ops[op] - portable[op] for op in PLATFORM_SWITCH_OPS}
  assert not portable - ops
  # 7 convolutions' forward and kernel gradient, and all but the stem's input gradient.
  assert ops['stablehlo.convolution'] == 3 * 7 - 1
  assert ops['stablehlo.reduce_window'] == 1 and ops['stablehlo.dot_general'] == 2  # pool, fc
  monkeypatch.undo()
  on_cpu = _loss_gradient_ops('cpu')  # the test can fail: the CPU program differs
  assert on_cpu['stablehlo.dot_general'] > 2 and on_cpu['stablehlo.reduce_window'] == 0


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
