"""Layers with PyTorch's semantics: explicit symmetric padding and its BatchNorm."""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import convolution

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# torchvision initializes convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Conv(nn.Module):
  """A bias-free square convolution padded by kernel_size // 2 on every side, as PyTorch pads.

  'SAME' padding would put the extra row of a stride-2 window at the end, which shifts
  every output on even input sizes and breaks parity with PyTorch weights. The kernel is
  HWIO, named 'kernel' as in `nn.Conv`. `convolution.conv2d` computes it in the
  formulations XLA:CPU runs fast.
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
    return convolution.conv2d(x, kernel, self.strides, ((k // 2, k // 2),) * 2, self.groups)


def conv(features: int, kernel_size: int, strides: int = 1, *, groups: int = 1,
         name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> Conv:
  """`Conv` with positional (features, kernel_size, strides), as blocks call it."""
  return Conv(features, kernel_size, strides, groups, dtype, param_dtype, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(3, stride=2, padding=1): padding never wins the max.

  Written as the maximum of nine strided views rather than a reduce_window: its gradient
  is then elementwise selects that fuse, where reduce_window's select-and-scatter
  gradient runs several times slower on XLA:CPU.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  views = [x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2] for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, views)


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
  """torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), ResNet-D's shortcut.

  On odd sizes the last window is partial and averages only the pixels it covers.
  """
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  summed = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).sum((2, 4))
  counts = np.pad(np.ones((h, w)), ((0, h % 2), (0, w % 2)))
  counts = counts.reshape((h + 1) // 2, 2, (w + 1) // 2, 2).sum((1, 3))
  return summed / counts[None, :, :, None].astype(x.dtype)


class BatchNorm(nn.Module):
  """Batch normalization over all axes but the last, with PyTorch's running statistics.

  Statistics are computed in float32 whatever the compute dtype. Under `jax.jit` on a
  batch sharded over devices the statistics cover the whole global batch (synchronized
  BN); `axis_name` adds a cross-device mean for use inside `shard_map`/`pmap`.

  Attributes:
    use_running_average: normalize with the running statistics (eval) instead of the
      batch's own (train, which also updates them).
    momentum: weight of the old running value; PyTorch's momentum=0.1 is 0.9 here.
    epsilon: added to the variance.
    unbiased_running_var: update `var` with the unbiased batch variance (n / (n - 1)), as
      PyTorch does. Flax's own nn.BatchNorm uses the biased one; set False to match it.
    group_size: normalize groups of this many consecutive examples separately ("ghost"
      BN, per-device BN of multi-GPU recipes); None uses the whole batch.
    axis_name: mapped axis to average statistics over, or None.
    scale_init: initializer of the scale (zeros for zero-init residual branches).
    fused_gradient: train-mode gradient by `normalize_with_batch_statistics` (fewer passes
      and a shorter compile) instead of autodiff, which needs less memory under remat.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_running_var: bool = True
  group_size: Optional[int] = None
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones
  fused_gradient: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)

    if self.use_running_average:
      return self._normalize(x, running_mean.value, running_var.value, scale, bias)

    groups = self._split_groups(x)
    mean, var = _group_statistics(groups, self._cross_device_mean)
    if self.fused_gradient and self.axis_name is None:  # XLA computes the statistics once
      y = normalize_with_batch_statistics(groups, scale, bias, self.epsilon, self.dtype)
    else:
      y = self._normalize(groups, mean, var, scale, bias)
    if not self.is_initializing():
      # Running statistics take no gradient; one (mean, var) per group.
      mean, var = jax.lax.stop_gradient((mean.reshape(-1, channels), var.reshape(-1, channels)))
      count = groups[0].size // channels
      if self.axis_name is not None:
        count *= jax.lax.psum(1, self.axis_name)
      batch_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * mean.mean(0)
      running_var.value = m * running_var.value + (1 - m) * batch_var.mean(0)
    return y.reshape(x.shape)

  def _split_groups(self, x):
    """(N, H, W, C) -> (N // group_size, group_size, H, W, C)."""
    size = self.group_size or x.shape[0]
    if x.shape[0] % size:
      raise ValueError(f'BatchNorm group_size={size} does not divide the batch of '
                       f'{x.shape[0]}; pick a group size that divides the per-step batch.')
    return x.reshape((x.shape[0] // size, size) + x.shape[1:])

  def _cross_device_mean(self, value):
    return value if self.axis_name is None else jax.lax.pmean(value, self.axis_name)

  def _normalize(self, x, mean, var, scale, bias):
    return _scale_and_shift(x, mean, jax.lax.rsqrt(var + self.epsilon), scale, bias,
                            self.dtype)


def _scale_and_shift(x, mean, inv_std, scale, bias, dtype):
  """(x - mean) * inv_std * scale + bias as one multiply-add per element, in `dtype`."""
  multiplier = scale.astype(jnp.float32) * inv_std
  offset = bias.astype(jnp.float32) - mean * multiplier
  return x.astype(dtype) * multiplier.astype(dtype) + offset.astype(dtype)


def _group_statistics(x, cross_device_mean=lambda value: value):
  """Float32 mean and biased variance of (G, S, H, W, C) groups, shaped (G, 1, 1, 1, C)."""
  x = x.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  mean = cross_device_mean(x.mean(axes, keepdims=True))
  return mean, cross_device_mean(jnp.square(x - mean).mean(axes, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_with_batch_statistics(x: jax.Array, scale: jax.Array, bias: jax.Array,
                                    epsilon: float, dtype: Dtype) -> jax.Array:
  """Train-mode batch normalization of (G, S, H, W, C) groups, each with its own statistics.

  Its gradient is the textbook fused one (two per-channel sums of the incoming gradient,
  then one elementwise pass) rather than autodiff through the mean and variance, which
  makes XLA emit several more reductions and passes over the activations.
  """
  return _normalize_forward(x, scale, bias, epsilon, dtype)[0]


def _normalize_forward(x, scale, bias, epsilon, dtype):
  mean, var = _group_statistics(x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = _scale_and_shift(x, mean, inv_std, scale, bias, dtype)
  return y, (x, mean, inv_std, scale, bias)


def _normalize_backward(epsilon, dtype, residuals, dy):
  del epsilon, dtype
  x, mean, inv_std, scale, bias = residuals
  dy = dy.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  count = np.prod([x.shape[axis] for axis in axes])
  x_hat = (x.astype(jnp.float32) - mean) * inv_std
  sum_dy = dy.sum(axes, keepdims=True)
  sum_dy_x_hat = (dy * x_hat).sum(axes, keepdims=True)
  dx = scale.astype(jnp.float32) * inv_std * (dy - (sum_dy + x_hat * sum_dy_x_hat) / count)
  per_channel = lambda value, like: value.reshape(-1, like.shape[-1]).sum(0).astype(like.dtype)
  return dx.astype(x.dtype), per_channel(sum_dy_x_hat, scale), per_channel(sum_dy, bias)


normalize_with_batch_statistics.defvjp(_normalize_forward, _normalize_backward)


def batch_norm_partial(train: bool, **kwargs) -> ModuleDef:
  """A BatchNorm constructor in train or eval mode, to hand to blocks."""
  return functools.partial(BatchNorm, use_running_average=not train, **kwargs)
