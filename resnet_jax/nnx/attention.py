"""The channel attentions of `resnet_jax.models.attention` as NNX modules.

Same parameters under the same names (`fc1`/`fc2` for 'se', `conv` for 'eca'), same
computation (the pure functions there), so linen variables load by name.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from resnet_jax.models import attention
from resnet_jax.models.convolution import conv_kernel_init


class PointwiseConv(nnx.Module):
  """`attention.PointwiseConv` in NNX: SE's 1x1 convolution of (N, C) vectors."""

  def __init__(self, in_features: int, features: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(conv_kernel_init(rngs.params(), (1, 1, in_features, features),
                                             param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.dtype = dtype

  def __call__(self, v: jax.Array) -> jax.Array:
    return attention.pointwise_conv(v.astype(self.dtype), self.kernel[...], self.bias[...])


class SqueezeExcite(nnx.Module):
  """`attention.SqueezeExcite` in NNX."""

  def __init__(self, channels: int, *, hidden: int, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = PointwiseConv(channels, hidden, **kwargs)
    self.fc2 = PointwiseConv(hidden, channels, **kwargs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return attention.squeeze_excite(x.astype(self.dtype), self.fc1, self.fc2)


class ChannelConv(nnx.Module):
  """`attention.ChannelConv` in NNX: ECA's 1-D convolution across channels."""

  def __init__(self, kernel_size: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(attention.torch_conv1d_init(rngs.params(), (kernel_size, 1, 1),
                                                        param_dtype))
    self.dtype = dtype

  def __call__(self, v: jax.Array) -> jax.Array:
    return attention.channel_conv(v.astype(self.dtype), self.kernel[...])


class EfficientChannelAttention(nnx.Module):
  """`attention.EfficientChannelAttention` in NNX."""

  def __init__(self, channels: int, *, kernel_size: int, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    del channels  # the kernel does not depend on them
    self.conv = ChannelConv(kernel_size, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return attention.efficient_channel_attention(x.astype(self.dtype), self.conv)


MODULES = {'se': SqueezeExcite, 'eca': EfficientChannelAttention}


def make_attention(name: Optional[str], channels: int, *, sized_for: int, se_ratio: float,
                   se_divisor: int, dtype: Dtype, param_dtype: Dtype,
                   rngs: nnx.Rngs) -> Optional[nnx.Module]:
  """The attention `name` ('se', 'eca') over `channels`, sized for a stage of `sized_for`
  channels before pruning (`attention.attention_sizes`), or None when `name` is None."""
  if name is None:
    return None
  sizes = attention.attention_sizes(name, sized_for, se_ratio, se_divisor)
  return MODULES[name](channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **sizes)
