"""The stems: what a ResNet does to the image before its first stage.

'imagenet' is torchvision's 7x7/2 conv (then BN, ReLU, 3x3/2 max-pool); 'cifar' the
paper's single 3x3 conv (then BN, ReLU, no pool). The deep stems are the Bag-of-Tricks
paper's (He et al. 2019) three 3x3 convs in place of the 7x7 one, with timm's widths for
a `stem_width` w:

  'deep'         w, w, 2w     (timm's stem_type='deep': w=32 for its -c/-d nets, 64 for -s)
  'deep_tiered'  3*(w//4), w, 2w   (timm's 'deep_tiered': its -t nets, w=32: 24, 32, 64)

and are named as timm names them (`conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`, `conv1.6`,
the missing indices being its ReLUs), followed by `bn1`, ReLU and the max-pool.
"""

from typing import Tuple

import flax.linen as nn

from resnet_jax.models.blocks import ModuleDef

STEMS = ('imagenet', 'deep', 'deep_tiered', 'cifar')
DEEP_STEMS = ('deep', 'deep_tiered')


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
