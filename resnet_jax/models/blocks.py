"""Residual blocks and their shortcuts, named as torchvision names them.

A block gets its `conv` and `norm` constructors from the parent (already carrying dtype,
BatchNorm mode and momentum), so it never decides precision or train/eval itself.
"""

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import anti_alias
from resnet_jax.models.drop_path import RNG_STREAM, drop_path
from resnet_jax.models.pooling import avg_pool_2x2_ceil

# A module constructor handed down by the parent: a partial of `Conv` or `BatchNorm`.
ModuleDef = Callable[..., nn.Module]

SHORTCUTS = ('A', 'B', 'C', 'none')


class Downsample(nn.Module):
  """Projection shortcut: 1x1 conv + BN (torchvision's `downsample.0`/`downsample.1`).

  With `avg_down` (ResNet-D) a 2x2 average pool does the striding and the conv has
  stride 1 (timm's `downsample.1`/`downsample.2`, index 0 being the pool). Otherwise a
  strided projection's conv is `kernel_size` wide (timm's `down_kernel_size`: 3 in
  senet154; a stride-1 projection stays 1x1, as there).
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  avg_down: bool = False
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x):
    if not self.avg_down:
      kernel_size = self.kernel_size if self.strides > 1 else 1
      x = self.conv(self.features, kernel_size, self.strides, name='0')(x)
      return self.norm(name='1')(x)
    if self.strides > 1:
      x = avg_pool_2x2_ceil(x)
    x = self.conv(self.features, 1, 1, name='1')(x)
    return self.norm(name='2')(x)


def subsample_and_pad(x: jax.Array, features: int, strides: int) -> jax.Array:
  """The paper's option A: identity with stride subsampling and zero-padded channels.

  Channels are padded equally on both sides, as the widely used PyTorch CIFAR ResNets do.
  """
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _Block(nn.Module):
  """Fields and the shortcut shared by both block types."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  shortcut: str = 'B'
  avg_down: bool = False
  groups: int = 1
  base_width: int = 64
  zero_init_last: bool = False
  act: Callable = nn.relu
  attention: Optional[ModuleDef] = None
  reduce_first: int = 1
  anti_alias: Optional[str] = None
  down_kernel_size: int = 1
  widths: Optional[Tuple[int, int, int]] = None

  expansion = 1

  @property
  def out_features(self) -> int:
    return self.widths[2] if self.widths else self.features * self.expansion

  def _conv_bn_act(self, x, features, kernel_size, strides, names, groups=1):
    """conv -> BN -> act. With anti-aliasing a strided conv runs at stride 1 and the
    anti-aliasing pool does the striding after the activation, as timm orders them."""
    pools = self.anti_alias is not None and strides > 1
    x = self.conv(features, kernel_size, 1 if pools else strides, groups=groups,
                  name=names[0])(x)
    x = self.act(self.norm(name=names[1])(x))
    return anti_alias.downsample(x, self.anti_alias) if pools else x

  def residual(self, x):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, drop_path_rate=None):
    """`drop_path_rate` (training only; may be traced) drops the residual branch of
    each example with that probability, with masks from the 'drop_path' rng stream."""
    out = self.residual(x)
    if self.attention is not None:  # timm's place for it: after the last BN, named 'se'
      out = self.attention(name='se')(out)
    if drop_path_rate is not None:
      out = drop_path(out, drop_path_rate, self.make_rng(RNG_STREAM))
    if self.shortcut == 'none':
      return self.act(out)
    return self.act(out + self._shortcut(x))

  def _shortcut(self, x):
    out_features = self.out_features
    reshapes = self.strides != 1 or x.shape[-1] != out_features
    if self.shortcut == 'C' or (reshapes and self.shortcut == 'B'):
      return Downsample(out_features, self.strides, self.conv, self.norm, self.avg_down,
                        self.down_kernel_size, name='downsample')(x)
    if reshapes:  # option A
      return subsample_and_pad(x, out_features, self.strides)
    return x

  def _last_norm(self, name):
    init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    return self.norm(name=name, scale_init=init)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34 and the paper's CIFAR nets).

  Attributes:
    features: output channels.
    conv, norm: constructors from the parent (partials of `Conv` and `BatchNorm`).
    strides: stride of the first 3x3 conv.
    shortcut: 'A' (parameter-free, pads channels), 'B' (projection where the shape
      changes), 'C' (projection in every block) or 'none' (a plain network).
    avg_down: average-pool the projection shortcut (ResNet-D).
    zero_init_last: start the last BN scale at zero, so the block starts as identity.
    attention: constructor of the channel attention applied to the residual branch
      (`resnet_jax.models.attention`), or None.
    reduce_first: the first conv outputs features // reduce_first channels.
    anti_alias: None, 'avg' or 'blur': the strided conv runs at stride 1 and that pool
      strides after its BN and ReLU (`resnet_jax.models.anti_alias`).
    down_kernel_size: kernel of a strided projection shortcut's conv.
    widths: a bottleneck's three conv widths (pruned nets), or None.
  """
  expansion = 1

  def residual(self, x):
    if self.groups != 1 or self.base_width != 64:
      raise ValueError('BasicBlock supports only groups=1 and base_width=64 '
                       '(as in torchvision); use BottleneckBlock for wide or ResNeXt models.')
    x = self._conv_bn_act(x, self.features // self.reduce_first, 3, self.strides,
                          ('conv1', 'bn1'))
    x = self.conv(self.features, 3, name='conv2')(x)
    return self._last_norm('bn2')(x)


class BottleneckBlock(_Block):
  """1x1 -> 3x3 (strided, grouped) -> 1x1 x4 (ResNet v1.5, the torchvision layout).

  The inner width is `int(features * base_width / 64) * groups`, which gives the wide
  ResNets (base_width=128) and ResNeXt (groups=32, base_width=4) from the same block;
  conv1 outputs that divided by `reduce_first` (2 in senet154). `widths` sets the three
  convolutions' outputs instead (timm's pruned nets). Other attributes as in `BasicBlock`.
  """
  expansion = 4

  def residual(self, x):
    first, width, out = bottleneck_widths(self.features, self.groups, self.base_width,
                                          self.reduce_first, self.widths)
    x = self._conv_bn_act(x, first, 1, 1, ('conv1', 'bn1'))
    x = self._conv_bn_act(x, width, 3, self.strides, ('conv2', 'bn2'), self.groups)
    x = self.conv(out, 1, name='conv3')(x)
    return self._last_norm('bn3')(x)


def bottleneck_widths(features: int, groups: int = 1, base_width: int = 64,
                      reduce_first: int = 1,
                      widths: Optional[Tuple[int, int, int]] = None) -> Tuple[int, int, int]:
  """The output channels of a bottleneck's conv1, conv2 and conv3 (timm's rule)."""
  if widths:
    return tuple(widths)
  width = int(features * (base_width / 64.0)) * groups
  return width // reduce_first, width, features * BottleneckBlock.expansion


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}
