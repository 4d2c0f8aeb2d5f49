"""Pools against PyTorch on odd and even sizes, and the max pool's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import nchw, nhwc
from resnet_jax.models import cpu, pooling


# The pool train.py runs here (CPU, `cpu.max_pool_3x3_s2`) and the one it runs on TPU and GPU.
MAX_POOLS = [pooling.max_pool_3x3_s2, cpu.max_pool_3x3_s2, pooling.reduce_window_max_3x3_s2]


@pytest.mark.parametrize('pool', MAX_POOLS)
@pytest.mark.parametrize('size', [(8, 8), (7, 9), (97, 131)])
def test_max_pool_matches_torch(size, pool):
  x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32) - 5
  expected = nhwc(torch.nn.MaxPool2d(3, 2, 1)(nchw(x)))
  np.testing.assert_array_equal(pool(jnp.asarray(x)), expected)


@pytest.mark.parametrize('pool', MAX_POOLS)
def test_max_pool_gradient_matches_torch(pool):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)  # continuous: no ties
  weights = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(pool(x) * weights))(jnp.asarray(x))
  x_torch = nchw(x).requires_grad_()
  (torch.nn.MaxPool2d(3, 2, 1)(x_torch) * nchw(weights)).sum().backward()
  np.testing.assert_allclose(grad, nhwc(x_torch.grad), atol=1e-6)


@pytest.mark.parametrize('size', [(8, 8), (7, 9), (1, 3)])
def test_avg_pool_matches_torch_ceil_mode(size):
  x = np.random.default_rng(2).normal(size=(2, *size, 3)).astype(np.float32)
  pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
  np.testing.assert_allclose(pooling.avg_pool_2x2_ceil(jnp.asarray(x)), nhwc(pool(nchw(x))),
                             atol=1e-6)
