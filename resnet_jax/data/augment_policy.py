"""What config.auto_augment names, parsed without TensorFlow (config_schema checks it).

'' is off, 'ta_wide' is torchvision's TrivialAugmentWide, and 'rand-...' is a timm
RandAugment string ('rand-m9-mstd0.5-inc1': magnitude 9, magnitude noise std 0.5, the
'increasing' op set), read section by section as timm's `rand_augment_transform` reads it.
"""

import dataclasses
import re
from typing import Optional, Union

from resnet_jax.errors import UserError

TA_WIDE = 'ta_wide'
LEVEL_DENOM = 10  # timm's _LEVEL_DENOM: magnitude 10 is an op's strongest setting


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment settings, at timm's defaults (`rand_augment_transform`)."""
  magnitude: float = LEVEL_DENOM  # 'm'
  num_layers: int = 2  # 'n': distinct ops drawn per image
  prob: float = 0.5  # 'p': each drawn op is applied with this probability
  magnitude_std: float = 0.0  # 'mstd': Gaussian noise on the magnitude; inf: uniform [0, m]
  magnitude_max: float = LEVEL_DENOM  # 'mmax': the noisy magnitude is clipped to [0, this]
  increasing: bool = False  # 'inc1': ops whose strength increases with the magnitude


_SECTIONS = {'m': ('magnitude', float), 'n': ('num_layers', int), 'p': ('prob', float),
             'mstd': ('magnitude_std', float), 'mmax': ('magnitude_max', float),
             'inc': ('increasing', lambda v: bool(int(v)))}
_HOW = ("set config.auto_augment to '' (off), 'ta_wide' (torchvision's TrivialAugmentWide) "
        "or a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (sections m, n, p, "
        "mstd, mmax, inc).")


def _rand_augment(name: str) -> RandAugment:
  settings = {}
  for section in name.split('-')[1:]:
    match = re.fullmatch(r'([a-z]+)(\d.*)', section)  # as timm splits a section
    key, value = match.groups() if match else (section, '')
    if key not in _SECTIONS:
      raise UserError(f'config.auto_augment={name!r}: unknown section {section!r}; {_HOW}')
    field, convert = _SECTIONS[key]
    try:
      settings[field] = convert(value)
    except ValueError:
      raise UserError(f'config.auto_augment={name!r}: {section!r} is not a number; '
                      f'{_HOW}') from None
  if settings.get('magnitude_std', 0) > 100:  # timm: uniform sampling in [0, m]
    settings['magnitude_std'] = float('inf')
  policy = RandAugment(**settings)
  if policy.num_layers < 1 or not 0 <= policy.prob <= 1 or policy.magnitude < 0:
    raise UserError(f'config.auto_augment={name!r}: needs n >= 1, 0 <= p <= 1 and m >= 0.')
  return policy


def parse(name: str) -> Optional[Union[str, RandAugment]]:
  """None (off), TA_WIDE, or the RandAugment settings that `name` gives; a UserError for
  anything else."""
  if not name:
    return None
  if name == TA_WIDE:
    return TA_WIDE
  if isinstance(name, str) and (name == 'rand' or name.startswith('rand-')):
    return _rand_augment(name)
  raise UserError(f'config.auto_augment={name!r} is not known; {_HOW}')
