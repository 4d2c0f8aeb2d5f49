"""Anti-aliased downsampling, timm's `aa_layer`: a stride-1 layer followed by a low-pass
pool that does the striding (Zhang 2019, "Making Convolutional Networks Shift-Invariant
Again").

Where a ResNet would stride, timm's `aa_layer` nets (`resnetaa*`, `seresnextaa*`,
`resnetblur*`) run the bottleneck's 3x3 conv (the basic block's first conv) at stride 1
and downsample after its BN and ReLU with `downsample(x, anti_alias)`:

* 'avg': torch's `nn.AvgPool2d(2)`, 2x2 windows at stride 2, no padding (an odd last row
  or column is dropped). In the stem it replaces the 3x3/2 max-pool.
* 'blur': timm's `BlurPool2d` (filter size 3): reflect-pad by 1, then the binomial filter
  [1, 2, 1] x [1, 2, 1] / 16 on each channel at stride 2. In the stem it follows a 3x3
  max-pool at stride 1.

Neither has parameters (timm's blur filter is a non-persistent buffer), so the state-dict
names and parameter counts are those of the ResNet without anti-aliasing.
"""

import functools
from typing import Callable, List

import jax
import jax.numpy as jnp

from resnet_jax.models import windows

ANTI_ALIASES = (None, 'avg', 'blur')
BLUR_TAPS = (0.25, 0.5, 0.25)  # the binomial filter of size 3, normalized


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """torch.nn.AvgPool2d(2) on NHWC `x`: the mean of each 2x2 window at stride 2."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _blur_axis(x: jax.Array, axis: int) -> jax.Array:
  """The reflect-padded [1, 2, 1] / 4 filter at stride 2 along `axis` (1 or 2)."""
  x = jnp.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)], mode='reflect')
  out = (x.shape[axis] - 3) // 2 + 1
  taps = [jax.lax.slice_in_dim(x, i, i + 2 * (out - 1) + 1, 2, axis) for i in range(3)]
  return sum(weight * tap for weight, tap in zip(BLUR_TAPS, taps))


def blur_pool(x: jax.Array) -> jax.Array:
  """timm's BlurPool2d(filt_size=3, stride=2) on NHWC `x`: the separable binomial filter
  (rows, then columns) over reflect padding."""
  return _blur_axis(_blur_axis(x, 1), 2)


def max_pool_3x3_s1(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(3, stride=1, padding=1), the blur-pool stem's max-pool."""
  views = windows.window_views(x, 3, 1, windows.torch_padding(3), pad_value=-jnp.inf)
  return functools.reduce(jnp.maximum, views)


POOLS = {'avg': avg_pool_2x2, 'blur': blur_pool}


def downsample(x: jax.Array, anti_alias: str) -> jax.Array:
  """The anti-aliasing pool `anti_alias` ('avg' or 'blur') at stride 2."""
  return POOLS[anti_alias](x)


def stem_pools(anti_alias: str) -> List[Callable[[jax.Array], jax.Array]]:
  """What replaces the stem's 3x3/2 max-pool in timm's anti-aliased nets, in order."""
  return [avg_pool_2x2] if anti_alias == 'avg' else [max_pool_3x3_s1, blur_pool]


def stem_pool(x: jax.Array, anti_alias: str) -> jax.Array:
  """`stem_pools(anti_alias)` applied to `x`."""
  for pool in stem_pools(anti_alias):
    x = pool(x)
  return x
