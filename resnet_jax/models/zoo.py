"""The model zoo: one table from name to the `ResNet` fields that define it, and the
PyTorch library each one mirrors."""

import dataclasses
import difflib
from typing import Any, Dict, List

from resnet_jax.models import pruned_widths
from resnet_jax.models.resnet import ResNet


def _imagenet(block, stage_sizes, **kwargs):
  return dict(block=block, stage_sizes=stage_sizes, **kwargs)


# timm's stems and shortcuts, by the letter its names carry (resnet50c, resnet50d, ...):
# see resnet_jax.models.stems.
_C = dict(stem='deep', stem_width=32)  # deep stem 32, 32, 64
_S = dict(stem='deep', stem_width=64)  # deep stem 64, 64, 128
_D = dict(_C, avg_down=True)  # deep stem + average-pooled projection shortcuts
_T = dict(stem='deep_tiered', stem_width=32, avg_down=True)  # tiered stem 24, 32, 64
_SE = dict(attention='se')
_ECA = dict(attention='eca')
_X32x4 = dict(groups=32, width_per_group=4)
_X32x8 = dict(groups=32, width_per_group=8)
_X64x4 = dict(groups=64, width_per_group=4)
_AA, _BLUR = dict(anti_alias='avg'), dict(anti_alias='blur')  # anti-aliased downsampling
# ResNet-RS: -d, a conv in place of the stem's max-pool, SE squeezing to a quarter.
_RS = dict(_D, stem_pool='conv', attention='se', se_ratio=0.25)

_R26, _R50, _R101, _R152 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)

# timm's resnet.py architectures that have pretrained weights there (stems, avg-down, SE,
# ECA, pruned widths, anti-aliasing, GroupNorm, ResNet-RS, SENet-154); the ones named as
# torchvision's are in MODELS below.
TIMM_MODELS: Dict[str, Dict[str, Any]] = {
    'resnet10t': _imagenet('basic', (1, 1, 1, 1), **_T),
    'resnet14t': _imagenet('bottleneck', (1, 1, 1, 1), **_T),
    'resnet18d': _imagenet('basic', (2, 2, 2, 2), **_D),
    'resnet34d': _imagenet('basic', (3, 4, 6, 3), **_D),
    'resnet26': _imagenet('bottleneck', _R26),
    'resnet26d': _imagenet('bottleneck', _R26, **_D),
    'resnet26t': _imagenet('bottleneck', _R26, **_T),
    'resnet50c': _imagenet('bottleneck', _R50, **_C),
    'resnet50d': _imagenet('bottleneck', _R50, **_D),
    'resnet50s': _imagenet('bottleneck', _R50, **_S),
    'resnet101c': _imagenet('bottleneck', _R101, **_C),
    'resnet101d': _imagenet('bottleneck', _R101, **_D),
    'resnet101s': _imagenet('bottleneck', _R101, **_S),
    'resnet152c': _imagenet('bottleneck', _R152, **_C),
    'resnet152d': _imagenet('bottleneck', _R152, **_D),
    'resnet152s': _imagenet('bottleneck', _R152, **_S),
    'resnet200d': _imagenet('bottleneck', (3, 24, 36, 3), **_D),
    'resnext50d_32x4d': _imagenet('bottleneck', _R50, **_X32x4, **_D),
    'resnext101_32x4d': _imagenet('bottleneck', _R101, **_X32x4),
    'resnext101_32x16d': _imagenet('bottleneck', _R101, groups=32, width_per_group=16),
    'resnext101_32x32d': _imagenet('bottleneck', _R101, groups=32, width_per_group=32),
    'seresnet50': _imagenet('bottleneck', _R50, **_SE),
    'seresnet152d': _imagenet('bottleneck', _R152, **_D, **_SE),
    'seresnext26d_32x4d': _imagenet('bottleneck', _R26, **_X32x4, **_D, **_SE),
    'seresnext26t_32x4d': _imagenet('bottleneck', _R26, **_X32x4, **_T, **_SE),
    'seresnext50_32x4d': _imagenet('bottleneck', _R50, **_X32x4, **_SE),
    'seresnext101_32x4d': _imagenet('bottleneck', _R101, **_X32x4, **_SE),
    'seresnext101_32x8d': _imagenet('bottleneck', _R101, **_X32x8, **_SE),
    'seresnext101d_32x8d': _imagenet('bottleneck', _R101, **_X32x8, **_D, **_SE),
    'seresnext101_64x4d': _imagenet('bottleneck', _R101, **_X64x4, **_SE),
    'ecaresnetlight': _imagenet('bottleneck', (1, 1, 11, 3), avg_down=True, **_ECA),
    'ecaresnet26t': _imagenet('bottleneck', _R26, **_T, **_ECA),
    'ecaresnet50d': _imagenet('bottleneck', _R50, **_D, **_ECA),
    'ecaresnet50t': _imagenet('bottleneck', _R50, **_T, **_ECA),
    'ecaresnet101d': _imagenet('bottleneck', _R101, **_D, **_ECA),
    'ecaresnet269d': _imagenet('bottleneck', (3, 30, 48, 8), **_D, **_ECA),
    'ecaresnet50d_pruned': _imagenet('bottleneck', _R50, **_D, **_ECA,
                                     block_widths=pruned_widths.ECARESNET50D_PRUNED),
    'ecaresnet101d_pruned': _imagenet('bottleneck', _R101, **_D, **_ECA,
                                      block_widths=pruned_widths.ECARESNET101D_PRUNED),
    'resnetaa50': _imagenet('bottleneck', _R50, **_AA),
    'resnetaa50d': _imagenet('bottleneck', _R50, **_D, **_AA),
    'resnetaa101d': _imagenet('bottleneck', _R101, **_D, **_AA),
    'seresnextaa101d_32x8d': _imagenet('bottleneck', _R101, **_X32x8, **_D, **_SE, **_AA),
    'seresnextaa201d_32x8d': _imagenet('bottleneck', (3, 24, 36, 4), **_X32x8, **_S,
                                       avg_down=True, **_SE, **_AA),
    'resnetblur50': _imagenet('bottleneck', _R50, **_BLUR),
    'resnet50_gn': _imagenet('bottleneck', _R50, norm_layer='group'),
    'resnetrs50': _imagenet('bottleneck', _R50, **_RS),
    'resnetrs101': _imagenet('bottleneck', _R101, **_RS),
    'resnetrs152': _imagenet('bottleneck', _R152, **_RS),
    'resnetrs200': _imagenet('bottleneck', (3, 24, 36, 3), **_RS),
    'resnetrs270': _imagenet('bottleneck', (4, 29, 53, 4), **_RS),
    'resnetrs350': _imagenet('bottleneck', (4, 36, 72, 4), **_RS),
    'resnetrs420': _imagenet('bottleneck', (4, 44, 87, 4), **_RS),
    # SENet-154: ResNeXt 64x4d, deep stem 64, conv1 at half width, 3x3 strided projections.
    'senet154': _imagenet('bottleneck', _R152, **_X64x4, **_S, **_SE, reduce_first=2,
                          down_kernel_size=3),
}


def _cifar(depth, shortcut='A'):
  n, rest = divmod(depth - 2, 6)
  assert rest == 0, depth
  return dict(block='basic', stage_sizes=(n, n, n), stage_widths=(16, 32, 64), stem='cifar',
              shortcut=shortcut, num_classes=10)


MODELS: Dict[str, Dict[str, Any]] = {
    'resnet18': _imagenet('basic', (2, 2, 2, 2)),
    'resnet34': _imagenet('basic', (3, 4, 6, 3)),
    'resnet50': _imagenet('bottleneck', (3, 4, 6, 3)),
    'resnet101': _imagenet('bottleneck', (3, 4, 23, 3)),
    'resnet152': _imagenet('bottleneck', (3, 8, 36, 3)),
    'resnet200': _imagenet('bottleneck', (3, 24, 36, 3)),
    'wide_resnet50_2': _imagenet('bottleneck', (3, 4, 6, 3), width_per_group=128),
    'wide_resnet101_2': _imagenet('bottleneck', (3, 4, 23, 3), width_per_group=128),
    'resnext50_32x4d': _imagenet('bottleneck', (3, 4, 6, 3), groups=32, width_per_group=4),
    'resnext101_32x8d': _imagenet('bottleneck', (3, 4, 23, 3), groups=32, width_per_group=8),
    'resnext101_64x4d': _imagenet('bottleneck', (3, 4, 23, 3), groups=64, width_per_group=4),
    **TIMM_MODELS,
    **{f'cifar_resnet{d}': _cifar(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f'cifar_plain{d}': _cifar(d, shortcut='none') for d in (20, 32, 44, 56, 110)},
}

# The library whose model of the same name each entry mirrors, key for key and to float
# tolerance (`resnet_jax.convert` converts their weights both ways).
PYTORCH_REFERENCE: Dict[str, str] = {
    **{name: 'torchvision' for name in (
        'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
        'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d')},
    'resnet200': 'timm',
    **{name: 'timm' for name in TIMM_MODELS},
}

MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ResNet)
                      if f.name not in ('parent', 'name'))


def list_models() -> List[str]:
  """Names accepted by `create_model`."""
  return list(MODELS)


def create_model(name: str, **overrides: Any) -> ResNet:
  """Builds a zoo model, e.g. `create_model('resnet50', num_classes=10, dtype=jnp.bfloat16)`.

  Any `ResNet` field can be overridden: num_classes (0 for no head), dtype, param_dtype,
  bn_momentum, bn_epsilon, bn_axis_name, bn_group_size, zero_init_residual, scan_blocks,
  remat, bn_fused_gradient, shortcut (the CIFAR nets' 'A'/'B'/'C'), in_channels, ...
  """
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Valid names: {", ".join(MODELS)}.')
  unknown = sorted(set(overrides) - set(MODEL_OPTIONS))
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for create_model({name!r}); '
                     f'valid options: {", ".join(MODEL_OPTIONS)}.')
  for option, least in (('num_classes', 0), ('in_channels', 1)):
    if option in overrides and not (isinstance(overrides[option], int)
                                    and overrides[option] >= least):
      raise ValueError(f'create_model({name!r}, {option}={overrides[option]!r}): '
                       f'{option} must be an integer >= {least}.')
  return ResNet(**{**MODELS[name], **overrides})
