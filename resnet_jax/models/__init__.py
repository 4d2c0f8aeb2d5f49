"""Flax ResNet modules and the model zoo."""

from resnet_jax.models.batch_norm import BatchNorm
from resnet_jax.models.blocks import BasicBlock, BottleneckBlock, Downsample
from resnet_jax.models.convolution import Conv
from resnet_jax.models.resnet import ResNet, Stage
from resnet_jax.models.scan import scan_variables, unscan_variables
from resnet_jax.models.zoo import create_model, list_models
