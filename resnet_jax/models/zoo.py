"""The model zoo: one table from name to the `ResNet` fields that define it, and the
PyTorch library each one mirrors."""

import dataclasses
import difflib
from typing import Any, Dict, List

from resnet_jax.models.resnet import ResNet


def _imagenet(block, stage_sizes, **kwargs):
  return dict(block=block, stage_sizes=stage_sizes, **kwargs)


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
    'resnet50d': _imagenet('bottleneck', (3, 4, 6, 3), stem='deep', stem_width=32,
                           avg_down=True),
    **{f'cifar_resnet{d}': _cifar(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f'cifar_plain{d}': _cifar(d, shortcut='none') for d in (20, 32, 44, 56, 110)},
}

# The library whose model of the same name each entry mirrors, key for key and to float
# tolerance (`resnet_jax.convert` converts their weights both ways).
PYTORCH_REFERENCE: Dict[str, str] = {
    **{name: 'torchvision' for name in (
        'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
        'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d')},
    'resnet50d': 'timm',
    'resnet200': 'timm',
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
