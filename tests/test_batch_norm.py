"""BatchNorm against PyTorch and Flax: statistics, gradients, ghost groups, bfloat16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, nhwc
from resnet_jax.models import batch_norm


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
  expected = nhwc(torch_bn(nchw(x)))
  y, updated = batch_norm.BatchNorm(use_running_average=not train).apply(
      variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(updated['batch_stats']['mean'], torch_bn.running_mean, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'], torch_bn.running_var, atol=1e-6)


@pytest.mark.parametrize('group_size, fused', [(None, True), (3, True), (None, False)])
def test_batch_norm_gradient_matches_torch(bn_case, group_size, fused):
  x, stats, variables = bn_case
  weights = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)

  def loss(params, x):
    y, _ = batch_norm.BatchNorm(group_size=group_size, fused_gradient=fused).apply(
        {**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y * weights)

  grads = jax.grad(loss, argnums=(0, 1))(variables['params'], jnp.asarray(x))
  x_torch = nchw(x).requires_grad_()
  bn = _torch_bn(x, *stats).train()
  groups = x_torch.split(group_size or len(x))
  (torch.cat([bn(g) for g in groups]) * nchw(weights)).sum().backward()
  np.testing.assert_allclose(grads[1], nhwc(x_torch.grad), atol=1e-5)
  np.testing.assert_allclose(grads[0]['scale'], bn.weight.grad, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[0]['bias'], bn.bias.grad, rtol=1e-5, atol=1e-4)


def test_biased_running_var_matches_flax(bn_case):
  x, _, variables = bn_case
  ours = batch_norm.BatchNorm(unbiased_running_var=False)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  y, stats = ours.apply(variables, x, mutable=['batch_stats'])
  y_flax, stats_flax = flax_bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_flax, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats, stats_flax)


def test_ghost_batch_norm_normalizes_groups_like_separate_torch_batches(bn_case):
  x, stats, variables = bn_case
  y, updated = batch_norm.BatchNorm(group_size=3).apply(variables, x, mutable=['batch_stats'])
  halves = [_torch_bn(x, *stats).train()(nchw(half)) for half in (x[:3], x[3:])]
  np.testing.assert_allclose(y, np.concatenate([nhwc(h) for h in halves]), atol=1e-5)
  with pytest.raises(ValueError, match='group_size=4 does not divide the batch of 6'):
    batch_norm.BatchNorm(group_size=4).apply(variables, x, mutable=['batch_stats'])


def test_bfloat16_batch_norm_keeps_float32_statistics(bn_case):
  x, _, variables = bn_case
  y, updated = batch_norm.BatchNorm(dtype=jnp.bfloat16).apply(
      variables, jnp.asarray(x, jnp.bfloat16), mutable=['batch_stats'])
  y32, updated32 = batch_norm.BatchNorm().apply(variables, x, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16 and updated['batch_stats']['var'].dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), y32, atol=0.05, rtol=0.02)


@pytest.mark.parametrize('fused', [True, False])
def test_one_pass_statistics_keep_precision_far_from_zero(fused):
  """Activations of mean 1000 and spread 1: the one-pass sums, shifted by the running
  mean, give float64's variance (unshifted float32 sums of x and x**2 would not: x**2 ~ 1e6
  leaves ~0.1 of precision for a variance of ~1)."""
  rng = np.random.default_rng(1)
  x = rng.normal(1000.0, 1.0, (8, 6, 6, 4)).astype(np.float32)
  variables = {'params': {'scale': np.ones(4, np.float32), 'bias': np.zeros(4, np.float32)},
               'batch_stats': {'mean': np.full(4, 999.0, np.float32),
                               'var': np.ones(4, np.float32)}}
  y, updated = batch_norm.BatchNorm(momentum=0.0, fused_gradient=fused).apply(
      variables, x, mutable=['batch_stats'])
  x64 = x.astype(np.float64)
  count = x64.size // 4
  var = x64.var((0, 1, 2))
  np.testing.assert_allclose(updated['batch_stats']['var'], var * count / (count - 1),
                             rtol=1e-5)
  expected = (x64 - x64.mean((0, 1, 2))) / np.sqrt(var + 1e-5)
  # The normalization is one float32 multiply-add, x * m + (-mean * m): rounding ~1000.
  np.testing.assert_allclose(y, expected, atol=3e-4)
