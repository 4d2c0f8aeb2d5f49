"""resnet_jax: ResNets in JAX/Flax with torchvision's names and numerics.

Importing this package pulls in jax and flax only; training, conversion and data
modules import their heavier dependencies themselves.
"""

from resnet_jax.models import (BasicBlock, BatchNorm, BottleneckBlock, Downsample, ResNet,
                               Stage, create_model, list_models, scan_variables,
                               unscan_variables)

__version__ = '0.1.0'
