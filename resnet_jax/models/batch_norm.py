"""BatchNorm with PyTorch's running statistics, and its fused train-mode gradient."""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype
from jax.ad_checkpoint import checkpoint_name

from resnet_jax.models.remat import BN_STATISTICS


class BatchNorm(nn.Module):
  """Batch normalization over all axes but the last, with PyTorch's running statistics.

  Statistics are computed in float32 whatever the compute dtype, in one pass over the
  activations (`group_statistics`). Under `jax.jit` on a
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
      and a shorter compile) instead of autodiff, which needs less memory under remat
      (benchmarks/RESULTS.md). Ignored with `axis_name`, which always uses autodiff.
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
    y, (mean, var) = batch_norm(
        x, scale, bias, running_mean.value, running_var.value,
        train=not self.use_running_average, momentum=self.momentum, epsilon=self.epsilon,
        unbiased_running_var=self.unbiased_running_var, group_size=self.group_size,
        axis_name=self.axis_name, dtype=self.dtype, fused_gradient=self.fused_gradient)
    if not self.use_running_average and not self.is_initializing():
      running_mean.value, running_var.value = mean, var
    return y


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, running_mean: jax.Array,
               running_var: jax.Array, *, train: bool, momentum: float = 0.9,
               epsilon: float = 1e-5, unbiased_running_var: bool = True,
               group_size: Optional[int] = None, axis_name: Optional[str] = None,
               dtype: Dtype = jnp.float32, fused_gradient: bool = True):
  """`BatchNorm` as a pure function: (y, (new running mean, new running var)).

  The one implementation behind the linen `BatchNorm` and the NNX one
  (`resnet_jax.nnx`); arguments as that module's attributes. In eval mode
  (`train=False`) the running statistics come back unchanged.
  """
  if not train:
    y = scale_and_shift(x, running_mean, jax.lax.rsqrt(running_var + epsilon), scale, bias,
                        dtype)
    return y, (running_mean, running_var)
  channels = x.shape[-1]
  groups = _split_groups(x, group_size)
  cross_device_mean = ((lambda value: value) if axis_name is None else
                       functools.partial(jax.lax.pmean, axis_name=axis_name))
  shift = jax.lax.stop_gradient(running_mean)
  mean, var = group_statistics(groups, shift, cross_device_mean)
  if fused_gradient and axis_name is None:  # XLA computes the statistics once
    y = normalize_with_batch_statistics(groups, scale, bias, shift, epsilon, dtype)
  else:
    y = scale_and_shift(groups, mean, jax.lax.rsqrt(var + epsilon), scale, bias, dtype)
  # Running statistics take no gradient; one (mean, var) per group.
  mean, var = jax.lax.stop_gradient((mean.reshape(-1, channels), var.reshape(-1, channels)))
  count = groups[0].size // channels
  if axis_name is not None:
    count *= jax.lax.psum(1, axis_name)
  batch_var = var * (count / max(count - 1, 1)) if unbiased_running_var else var
  m = momentum
  new_mean = m * running_mean + (1 - m) * mean.mean(0)
  new_var = m * running_var + (1 - m) * batch_var.mean(0)
  return y.reshape(x.shape), (new_mean, new_var)


def _split_groups(x, group_size):
  """(N, H, W, C) -> (N // group_size, group_size, H, W, C)."""
  size = group_size or x.shape[0]
  if x.shape[0] % size:
    raise ValueError(f'BatchNorm group_size={size} does not divide the batch of '
                     f'{x.shape[0]}; pick a group size that divides the per-step batch.')
  return x.reshape((x.shape[0] // size, size) + x.shape[1:])


def scale_and_shift(x, mean, inv_std, scale, bias, dtype):
  """(x - mean) * inv_std * scale + bias as one multiply-add per element, in `dtype`."""
  multiplier = scale.astype(jnp.float32) * inv_std
  offset = bias.astype(jnp.float32) - mean * multiplier
  return x.astype(dtype) * multiplier.astype(dtype) + offset.astype(dtype)


def group_statistics(x, shift, cross_device_mean=lambda value: value):
  """Float32 mean and biased variance of (G, S, H, W, C) groups, shaped (G, 1, 1, 1, C),
  tagged `remat.BN_STATISTICS` so that recomputing the normalization never recomputes them.

  One pass over `x`: the means of d = x - shift and of d**2, where `shift` is a
  per-channel estimate of the mean (the running mean); var = E[d**2] - E[d]**2. XLA fuses
  both sums into the producer of `x` (the convolution), where the two-pass form, the mean
  of squared deviations from the batch mean, needs its own pass over the activations
  (benchmarks/RESULTS.md). The shift keeps the float32 sums from cancelling when the
  mean is large next to the spread; the clamp at 0 catches rounding below it.
  """
  d = x.astype(jnp.float32) - shift
  axes = tuple(range(1, x.ndim - 1))
  shifted_mean = cross_device_mean(d.mean(axes, keepdims=True))
  mean_square = cross_device_mean(jnp.square(d).mean(axes, keepdims=True))
  mean = shift + shifted_mean
  var = jnp.maximum(mean_square - jnp.square(shifted_mean), 0.0)
  return checkpoint_name(mean, BN_STATISTICS), checkpoint_name(var, BN_STATISTICS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def normalize_with_batch_statistics(x: jax.Array, scale: jax.Array, bias: jax.Array,
                                    shift: jax.Array, epsilon: float, dtype: Dtype
                                    ) -> jax.Array:
  """Train-mode batch normalization of (G, S, H, W, C) groups, each with its own statistics
  (`group_statistics` with `shift`, which takes no gradient).

  Its gradient is the textbook fused one (two per-channel sums of the incoming gradient,
  then one elementwise pass) rather than autodiff through the mean and variance, which
  makes XLA emit several more reductions and passes over the activations.
  """
  return _normalize_forward(x, scale, bias, shift, epsilon, dtype)[0]


def _normalize_forward(x, scale, bias, shift, epsilon, dtype):
  mean, var = group_statistics(x, shift)
  inv_std = checkpoint_name(jax.lax.rsqrt(var + epsilon), BN_STATISTICS)
  y = scale_and_shift(x, mean, inv_std, scale, bias, dtype)
  return y, (x, mean, inv_std, scale, bias, shift)


def _normalize_backward(epsilon, dtype, residuals, dy):
  del epsilon, dtype
  x, mean, inv_std, scale, bias, shift = residuals
  dy = dy.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  count = np.prod([x.shape[axis] for axis in axes])
  x_hat = (x.astype(jnp.float32) - mean) * inv_std
  sum_dy = dy.sum(axes, keepdims=True)
  sum_dy_x_hat = (dy * x_hat).sum(axes, keepdims=True)
  dx = scale.astype(jnp.float32) * inv_std * (dy - (sum_dy + x_hat * sum_dy_x_hat) / count)
  per_channel = lambda value, like: value.reshape(-1, like.shape[-1]).sum(0).astype(like.dtype)
  return (dx.astype(x.dtype), per_channel(sum_dy_x_hat, scale), per_channel(sum_dy, bias),
          jnp.zeros_like(shift))


normalize_with_batch_statistics.defvjp(_normalize_forward, _normalize_backward)


# The model's BatchNorm fields and the BatchNorm arguments they set: one list for the linen
# and NNX models.
MODEL_FIELDS = {'bn_momentum': 'momentum', 'bn_epsilon': 'epsilon',
                'bn_unbiased_running_var': 'unbiased_running_var',
                'bn_group_size': 'group_size', 'bn_axis_name': 'axis_name'}


def batch_norm_settings(spec) -> dict:
  """The BatchNorm arguments of a ResNet spec's `bn_*` fields (`MODEL_FIELDS`)."""
  return {argument: getattr(spec, field) for field, argument in MODEL_FIELDS.items()}


def batch_norm_partial(train: bool, **kwargs) -> Callable[..., BatchNorm]:
  """A BatchNorm constructor in train or eval mode, to hand to blocks."""
  return functools.partial(BatchNorm, use_running_average=not train, **kwargs)
