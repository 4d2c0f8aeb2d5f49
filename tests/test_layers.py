"""Layers against PyTorch: BatchNorm statistics, pooling and padding on odd and even sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resnet_jax.models import layers
from resnet_jax.models.blocks import subsample_and_pad


def _nchw(x):
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _torch_bn(x, scale, bias, mean, var):
  bn = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1, eps=1e-5)
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(scale))
    bn.bias.copy_(torch.tensor(bias))
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
  return bn


@pytest.fixture
def bn_case():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (6, 5, 7, 4)).astype(np.float32)
  stats = [rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32),
           rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)]
  variables = {'params': {'scale': stats[0], 'bias': stats[1]},
               'batch_stats': {'mean': stats[2], 'var': stats[3]}}
  return x, stats, variables


@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_matches_torch(bn_case, train):
  x, stats, variables = bn_case
  torch_bn = _torch_bn(x, *stats).train(train)
  expected = _nhwc(torch_bn(_nchw(x)))
  y, updated = layers.BatchNorm(use_running_average=not train).apply(
      variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(updated['batch_stats']['mean'], torch_bn.running_mean, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'], torch_bn.running_var, atol=1e-6)


@pytest.mark.parametrize('group_size, fused', [(None, True), (3, True), (None, False)])
def test_batch_norm_gradient_matches_torch(bn_case, group_size, fused):
  x, stats, variables = bn_case
  weights = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

  def loss(params, x):
    y, _ = layers.BatchNorm(group_size=group_size, fused_gradient=fused).apply(
        {**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y * weights)

  grads = jax.grad(loss, argnums=(0, 1))(variables['params'], jnp.asarray(x))
  x_torch = _nchw(x).requires_grad_()
  bn = _torch_bn(x, *stats).train()
  groups = x_torch.split(group_size or len(x))
  (torch.cat([bn(g) for g in groups]) * _nchw(weights)).sum().backward()
  np.testing.assert_allclose(grads[1], _nhwc(x_torch.grad), atol=1e-5)
  np.testing.assert_allclose(grads[0]['scale'], bn.weight.grad, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[0]['bias'], bn.bias.grad, rtol=1e-5, atol=1e-4)


def test_biased_running_var_matches_flax(bn_case):
  x, _, variables = bn_case
  ours = layers.BatchNorm(unbiased_running_var=False)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  y, stats = ours.apply(variables, x, mutable=['batch_stats'])
  y_flax, stats_flax = flax_bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_flax, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats, stats_flax)


def test_ghost_batch_norm_normalizes_groups_like_separate_torch_batches(bn_case):
  x, stats, variables = bn_case
  y, updated = layers.BatchNorm(group_size=3).apply(variables, x, mutable=['batch_stats'])
  halves = [_torch_bn(x, *stats).train()(_nchw(half)) for half in (x[:3], x[3:])]
  np.testing.assert_allclose(y, np.concatenate([_nhwc(h) for h in halves]), atol=1e-5)
  with pytest.raises(ValueError, match='group_size=4 does not divide the batch of 6'):
    layers.BatchNorm(group_size=4).apply(variables, x, mutable=['batch_stats'])


def test_bfloat16_batch_norm_keeps_float32_statistics(bn_case):
  x, _, variables = bn_case
  y, updated = layers.BatchNorm(dtype=jnp.bfloat16).apply(
      variables, jnp.asarray(x, jnp.bfloat16), mutable=['batch_stats'])
  y32, updated32 = layers.BatchNorm().apply(variables, x, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16 and updated['batch_stats']['var'].dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), y32, atol=0.05, rtol=0.02)


@pytest.mark.parametrize('size', [(8, 8), (7, 9), (97, 131)])
def test_max_pool_matches_torch(size):
  x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32) - 5
  expected = _nhwc(torch.nn.MaxPool2d(3, 2, 1)(_nchw(x)))
  np.testing.assert_array_equal(layers.max_pool_3x3_s2(jnp.asarray(x)), expected)


def test_max_pool_gradient_matches_torch():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)  # continuous: no ties
  weights = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool_3x3_s2(x) * weights))(jnp.asarray(x))
  x_torch = _nchw(x).requires_grad_()
  (torch.nn.MaxPool2d(3, 2, 1)(x_torch) * _nchw(weights)).sum().backward()
  np.testing.assert_allclose(grad, _nhwc(x_torch.grad), atol=1e-6)


@pytest.mark.parametrize('size', [(8, 8), (7, 9), (1, 3)])
def test_avg_pool_matches_torch_ceil_mode(size):
  x = np.random.default_rng(2).normal(size=(2, *size, 3)).astype(np.float32)
  pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
  np.testing.assert_allclose(layers.avg_pool_2x2_ceil(jnp.asarray(x)), _nhwc(pool(_nchw(x))),
                             atol=1e-6)


@pytest.mark.parametrize('kernel, stride, size', [
    (7, 2, (32, 32)), (3, 2, (8, 10)), (3, 1, (5, 5)), (1, 2, (6, 7)),
    # Maps smaller than the kernel take the matmul path.
    (3, 1, (1, 1)), (3, 1, (2, 2)), (3, 2, (2, 3)), (7, 2, (5, 6))])
def test_conv_pads_like_torch(kernel, stride, size):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, *size, 4)).astype(np.float32)
  module = layers.conv(6, kernel, stride, name='conv')
  variables = module.init(jax.random.PRNGKey(0), x)
  kernel_hwio = np.asarray(variables['params']['kernel'])
  torch_conv = torch.nn.Conv2d(4, 6, kernel, stride, kernel // 2, bias=False)
  with torch.no_grad():
    torch_conv.weight.copy_(torch.tensor(kernel_hwio.transpose(3, 2, 0, 1)))
  np.testing.assert_allclose(module.apply(variables, x), _nhwc(torch_conv(_nchw(x))),
                             atol=1e-5)


def test_conv_init_is_kaiming_fan_out():
  variables = layers.conv(256, 3, name='c').init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 64)))
  std = float(jnp.std(variables['params']['kernel']))
  assert abs(std - (2.0 / (256 * 9)) ** 0.5) < 0.002


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
  y = subsample_and_pad(x, 32, 2)
  assert y.shape == (2, 2, 2, 32)
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :8], 0)
  np.testing.assert_array_equal(y[..., 24:], 0)
