"""GroupNorm in place of BatchNorm (timm's `norm_layer='groupnorm'`, `resnet50_gn`).

32 groups of consecutive channels, each normalized over its channels and the image by its
own mean and biased variance (computed in float32), then scaled and shifted per channel:
`torch.nn.functional.group_norm`. No running statistics, so train and eval mode compute the
same thing. Parameters `scale`/`bias`, torch's `weight`/`bias`, under BatchNorm's names
(`bn1`, `downsample.1`, ...), as timm keeps them.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

NUM_GROUPS = 32  # timm's GroupNorm default


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int = NUM_GROUPS,
               epsilon: float = 1e-5, dtype: Dtype = jnp.float32) -> jax.Array:
  """GroupNorm of NHWC `x` (see the module doc), in `dtype`."""
  n, h, w, c = x.shape
  if c % num_groups:
    raise ValueError(f'GroupNorm with {num_groups} groups needs a multiple of {num_groups} '
                     f'channels; got {c}.')
  groups = x.astype(jnp.float32).reshape(n, h, w, num_groups, c // num_groups)
  mean = groups.mean((1, 2, 4), keepdims=True)
  var = jnp.square(groups - mean).mean((1, 2, 4), keepdims=True)
  y = ((groups - mean) * jax.lax.rsqrt(var + epsilon)).reshape(n, h, w, c)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class GroupNorm(nn.Module):
  """`group_norm` with `scale`/`bias` parameters; a block builds it as it builds BatchNorm."""
  num_groups: int = NUM_GROUPS
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


def group_norm_partial(epsilon: float, dtype: Dtype, param_dtype: Dtype) -> Callable:
  """The GroupNorm constructor a ResNet hands its blocks for `norm='group'`."""
  return functools.partial(GroupNorm, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
