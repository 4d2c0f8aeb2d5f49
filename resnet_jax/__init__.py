"""resnet_jax: ResNets in JAX/Flax with torchvision's names and numerics.

Importing this package pulls in jax and flax only; training, conversion and data
modules import their heavier dependencies themselves.
"""

from resnet_jax.models import (BasicBlock, BatchNorm, BottleneckBlock, Downsample, ResNet,
                               Stage, create_model, list_models, scan_variables,
                               unscan_variables)

__version__ = '0.1.0'

# Loading needs orbax; import it only when asked for, so `import resnet_jax` stays light.
_LAZY = {'load_variables': 'resnet_jax.train.checkpoint_format',
         'load_model': 'resnet_jax.train.checkpoint_format',
         'load_pretrained': 'resnet_jax.pretrained', 'list_pretrained': 'resnet_jax.pretrained'}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
