"""Channel attention on a block's residual branch: squeeze-and-excitation and ECA.

Both gate each channel of the branch (after its last BatchNorm, before the residual
addition) by a sigmoid of a function of the channel means, as timm's `attn_layer='se'`
and `'eca'` ResNets do, under timm's name for the module (`se`, in every block):

* 'se' (Hu et al. 2018, timm's `SEModule`): mean -> 1x1 conv to r channels (+ bias) ->
  ReLU -> 1x1 conv back (+ bias) -> sigmoid; r = `se_channels(channels, ratio, divisor)`,
  timm's `make_divisible(channels * rd_ratio, rd_divisor)`: ratio 1/16 and divisor 8 by
  default, ratio 1/4 in ResNet-RS (the ResNet fields `se_ratio`, `se_divisor`). torch
  names `se.fc1`, `se.fc2`.
* 'eca' (Wang et al. 2020, timm's `EcaModule`): mean -> a bias-free 1-D convolution
  across channels, zero-padded, of odd size k = `eca_kernel_size(channels)` -> sigmoid.
  torch name `se.conv` (a Conv1d, weight (1, 1, k); here kernel (k, 1, 1), the W-I-O
  layout of a 1-D convolution).

Both are sized for the width of their stage before any pruning (`attention_partial`):
timm prunes its `_pruned` nets' convolutions but keeps the ECA kernels of the unpruned net.

The pure functions here (`squeeze_excite`, `efficient_channel_attention`,
`pointwise_conv`, `channel_conv`) are the computation; the linen modules here and the NNX
ones (`resnet_jax.nnx.attention`) hold the parameters and call them.
"""

import functools
import math
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from resnet_jax.models.convolution import conv_kernel_init

ATTENTIONS = (None, 'se', 'eca')

SE_RATIO, SE_DIVISOR = 1 / 16, 8  # timm's SEModule defaults (ResNet-RS: ratio 1/4)
ECA_GAMMA, ECA_BETA = 2, 1  # timm's EcaModule defaults (the paper's)


def se_channels(channels: int, ratio: float = SE_RATIO, divisor: int = SE_DIVISOR) -> int:
  """The squeeze width: channels * ratio rounded to the nearest multiple of `divisor`
  (halves up), at least `divisor` (timm's make_divisible with round_limit=0)."""
  return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


def eca_kernel_size(channels: int, gamma: int = ECA_GAMMA, beta: int = ECA_BETA) -> int:
  """ECA's adaptive kernel size: |log2(channels) + beta| / gamma, truncated, made odd
  (rounded up), at least 3."""
  t = int(abs(math.log(channels, 2) + beta) / gamma)
  return max(t if t % 2 else t + 1, 3)


def channel_means(x: jax.Array) -> jax.Array:
  """(N, C) means of NHWC `x` over height and width, accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def gate(x: jax.Array, logits: jax.Array) -> jax.Array:
  """`x` with each channel scaled by the sigmoid of its (N, C) logit."""
  return x * jax.nn.sigmoid(logits)[:, None, None, :]


def pointwise_conv(v: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """A 1x1 convolution (kernel (1, 1, C, F), bias (F,)) of (N, C) vectors."""
  return v @ kernel[0, 0].astype(v.dtype) + bias.astype(v.dtype)


def channel_conv(v: jax.Array, kernel: jax.Array) -> jax.Array:
  """ECA's convolution of (N, C) vectors across C with a (k, 1, 1) kernel, as torch's
  Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False) computes it (cross-correlation over
  zero padding)."""
  k, channels = kernel.shape[0], v.shape[-1]
  padded = jnp.pad(v, ((0, 0), ((k - 1) // 2, (k - 1) // 2)))
  weights = kernel[:, 0, 0].astype(v.dtype)
  return sum(weights[j] * padded[:, j:j + channels] for j in range(k))


def squeeze_excite(x: jax.Array, fc1: Callable, fc2: Callable) -> jax.Array:
  """SE on NHWC `x`, with `fc1`, `fc2` the two 1x1 convolutions of (N, C) vectors."""
  return gate(x, fc2(nn.relu(fc1(channel_means(x)))))


def efficient_channel_attention(x: jax.Array, conv: Callable) -> jax.Array:
  """ECA on NHWC `x`, with `conv` its 1-D convolution of (N, C) vectors."""
  return gate(x, conv(channel_means(x)))


def torch_conv1d_init(key, shape, dtype=jnp.float32):
  """torch's default Conv1d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); timm keeps it."""
  bound = 1.0 / math.sqrt(shape[0] * shape[1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class PointwiseConv(nn.Module):
  """SE's 1x1 convolution with bias (torch's Conv2d(C, F, 1): kernel (1, 1, C, F),
  bias (F,)), applied to (N, C) vectors."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, v):
    kernel = self.param('kernel', conv_kernel_init, (1, 1, v.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    return pointwise_conv(v.astype(self.dtype), kernel, bias)


class ChannelConv(nn.Module):
  """ECA's bias-free 1-D convolution across channels (a (k, 1, 1) kernel)."""
  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, v):
    kernel = self.param('kernel', torch_conv1d_init, (self.kernel_size, 1, 1),
                        self.param_dtype)
    return channel_conv(v.astype(self.dtype), kernel)


class SqueezeExcite(nn.Module):
  """timm's SEModule: `fc1` to `hidden` channels, `fc2` back (see the module doc)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    fc = functools.partial(PointwiseConv, dtype=self.dtype, param_dtype=self.param_dtype)
    return squeeze_excite(x.astype(self.dtype), fc(self.hidden, name='fc1'),
                          fc(channels, name='fc2'))


class EfficientChannelAttention(nn.Module):
  """timm's EcaModule: `conv`, a (kernel_size, 1, 1) kernel (see the module doc)."""
  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = ChannelConv(self.kernel_size, self.dtype, self.param_dtype, name='conv')
    return efficient_channel_attention(x.astype(self.dtype), conv)


MODULES = {'se': SqueezeExcite, 'eca': EfficientChannelAttention}


def attention_sizes(attention: Optional[str], channels: int, se_ratio: float = SE_RATIO,
                    se_divisor: int = SE_DIVISOR) -> Dict[str, int]:
  """The size field of attention `attention` sized for `channels`: SE's `hidden`, ECA's
  `kernel_size`."""
  if attention == 'se':
    return dict(hidden=se_channels(channels, se_ratio, se_divisor))
  return dict(kernel_size=eca_kernel_size(channels))


def attention_partial(attention: Optional[str], channels: int, se_ratio: float,
                      se_divisor: int, dtype: Any, param_dtype: Any) -> Optional[functools.partial]:
  """The constructor a block calls as `attention(name='se')`, sized for a stage of
  `channels` output channels before pruning, or None for no attention."""
  if attention is None:
    return None
  return functools.partial(MODULES[attention], dtype=dtype, param_dtype=param_dtype,
                           **attention_sizes(attention, channels, se_ratio, se_divisor))
