"""The zoo's ResNets as Flax NNX modules, and their variables to and from linen's layout."""

from resnet_jax.models.zoo import list_models
from resnet_jax.nnx.convert import from_linen, to_linen
from resnet_jax.nnx.models import (BasicBlock, BatchNorm, BottleneckBlock, Conv, ResNet,
                                   Sequential, create_model)
