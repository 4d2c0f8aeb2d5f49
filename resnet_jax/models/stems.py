"""The stems: what a ResNet does to the image before its first stage.

'imagenet' is torchvision's 7x7/2 conv (then BN, ReLU, 3x3/2 max-pool); 'cifar' the
paper's single 3x3 conv (then BN, ReLU, no pool). The deep stems are the Bag-of-Tricks
paper's (He et al. 2019) three 3x3 convs in place of the 7x7 one, with timm's widths for
a `stem_width` w:

  'deep'         w, w, 2w     (timm's stem_type='deep': w=32 for its -c/-d nets, 64 for -s)
  'deep_tiered'  3*(w//4), w, 2w   (timm's 'deep_tiered': its -t nets, w=32: 24, 32, 64)

and are named as timm names them (`conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`, `conv1.6`,
the missing indices being its ReLUs), followed by `bn1`, ReLU and the max-pool.

The pool after them (`stem_pool`) is the 3x3/2 max-pool, or with 'conv' ResNet-RS's 3x3/2
conv + BN + ReLU (timm's `replace_stem_pool`, named `maxpool.0`, `maxpool.1`); in
anti-aliased nets the anti-aliasing pool replaces or follows it (`anti_alias.stem_pool`).
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax

from resnet_jax.models import anti_alias as aa
from resnet_jax.models.blocks import ModuleDef
from resnet_jax.models.pooling import max_pool_3x3_s2

STEMS = ('imagenet', 'deep', 'deep_tiered', 'cifar')
DEEP_STEMS = ('deep', 'deep_tiered')
STEM_POOLS = ('max', 'conv')


def deep_stem_widths(stem: str, stem_width: int) -> Tuple[int, int, int]:
  """Output channels of a deep stem's three convs (timm's rule, see the module doc)."""
  first = 3 * (stem_width // 4) if stem == 'deep_tiered' else stem_width
  return first, stem_width, 2 * stem_width


class DeepStem(nn.Module):
  """Three 3x3 convs, the first strided, BN + ReLU after the first two (timm's `conv1`
  Sequential; the BN + ReLU after the third is the ResNet's `bn1`)."""
  widths: Tuple[int, int, int]
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    first, second, out = self.widths
    x = nn.relu(self.norm(name='1')(self.conv(first, 3, 2, name='0')(x)))
    x = nn.relu(self.norm(name='4')(self.conv(second, 3, name='3')(x)))
    return self.conv(out, 3, name='6')(x)


class ConvStemPool(nn.Module):
  """ResNet-RS's stem pool (timm's `maxpool` Sequential): a 3x3 conv at stride 2 (at
  stride 1 then the anti-aliasing pool, index 1, with `anti_alias`), BN and ReLU."""
  conv: ModuleDef
  norm: ModuleDef
  anti_alias: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    x = self.conv(x.shape[-1], 3, 1 if self.anti_alias else 2, name='0')(x)
    if self.anti_alias:
      x = aa.downsample(x, self.anti_alias)
    return nn.relu(self.norm(name='2' if self.anti_alias else '1')(x))


def pool_stem(x: jax.Array, stem_pool: str, anti_alias: Optional[str], conv: ModuleDef,
              norm: ModuleDef) -> jax.Array:
  """The stem's pool (see the module doc), inside a linen ResNet's stem."""
  if stem_pool == 'conv':
    return ConvStemPool(conv, norm, anti_alias, name='maxpool')(x)
  return aa.stem_pool(x, anti_alias) if anti_alias else max_pool_3x3_s2(x)
