"""ResNets as Flax NNX modules, with torchvision's attribute names and the linen numerics.

The architecture comes from the linen `resnet_jax.models.ResNet` dataclass, the zoo's
spec, kept as `model.spec`; the computation calls the same pure functions as the linen
modules (`conv2d`, `batch_norm`, the pools, `subsample_and_pad`), so an NNX model and
`model.spec` give the same outputs on the same variables (see `resnet_jax.nnx.convert`).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from resnet_jax import models
from resnet_jax.errors import UserError
from resnet_jax.models import anti_alias, windows, zoo
from resnet_jax.models.batch_norm import batch_norm, batch_norm_settings
from resnet_jax.models.blocks import bottleneck_widths, subsample_and_pad
from resnet_jax.models.convolution import conv2d, conv_kernel_init
from resnet_jax.models.drop_path import RNG_STREAM, block_rates, drop_path
from resnet_jax.models.pooling import avg_pool_2x2_ceil, max_pool_3x3_s2
from resnet_jax.models.remat import SAVE_CONV_OUTPUTS
from resnet_jax.models.resnet import check_choices, torch_linear_init
from resnet_jax.models.stems import DEEP_STEMS, deep_stem_widths
from resnet_jax.nnx.attention import make_attention
from resnet_jax.nnx.group_norm import GroupNorm


class Conv(nnx.Module):
  """`models.Conv` in NNX: bias-free, padded as PyTorch pads, an HWIO `kernel`."""

  def __init__(self, in_features: int, features: int, kernel_size: int, strides: int = 1,
               groups: int = 1, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features // groups, features)
    self.kernel = nnx.Param(conv_kernel_init(rngs.params(), shape, param_dtype))
    self.kernel_size, self.strides, self.groups, self.dtype = kernel_size, strides, groups, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    return conv2d(x.astype(self.dtype), kernel, self.strides,
                  windows.torch_padding(self.kernel_size), self.groups)


class BatchNorm(nnx.Module):
  """`models.BatchNorm` in NNX: `scale`/`bias` Params, `mean`/`var` BatchStats.

  `use_running_average` is switched by `model.train()` / `model.eval()` (or `nnx.view`),
  as for `nnx.BatchNorm`; in train mode a call updates the running statistics with
  PyTorch's rule. Other arguments as the linen module's attributes.
  """

  def __init__(self, num_features: int, *, use_running_average: bool = True,
               momentum: float = 0.9, epsilon: float = 1e-5, unbiased_running_var: bool = True,
               group_size: Optional[int] = None, axis_name: Optional[str] = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               scale_init=nn.initializers.ones, fused_gradient: bool = True, rngs: nnx.Rngs):
    shape = (num_features,)
    self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros(shape, param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.use_running_average = use_running_average
    self.momentum, self.epsilon, self.unbiased_running_var = momentum, epsilon, unbiased_running_var
    self.group_size, self.axis_name, self.dtype = group_size, axis_name, dtype
    self.fused_gradient = fused_gradient

  def __call__(self, x: jax.Array) -> jax.Array:
    train = not self.use_running_average
    y, (mean, var) = batch_norm(
        x, self.scale[...], self.bias[...], self.mean[...], self.var[...], train=train,
        momentum=self.momentum, epsilon=self.epsilon,
        unbiased_running_var=self.unbiased_running_var, group_size=self.group_size,
        axis_name=self.axis_name, dtype=self.dtype, fused_gradient=self.fused_gradient)
    if train:
      self.mean[...], self.var[...] = mean, var
    return y

  def set_view(self, use_running_average: Optional[bool] = None):
    """What `nnx.view(model, use_running_average=...)` sets."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class Sequential(nnx.List):
  """Layers applied in order, indexed as torch's nn.Sequential (`conv1[0]`, `downsample[1]`).

  Parameter-free steps (relu, pools) are plain functions that keep their torch index.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self:
      x = layer(x)
    return x


def _identity(x):
  return x


def downsample(in_features, features, strides, conv, norm, avg_down,
               kernel_size=1) -> Sequential:
  """The projection shortcut [conv, bn], or ResNet-D's [avg pool, conv, bn]
  (`models.Downsample`)."""
  if not avg_down:
    kernel_size = kernel_size if strides > 1 else 1
    return Sequential([conv(in_features, features, kernel_size, strides), norm(features)])
  pool = avg_pool_2x2_ceil if strides > 1 else _identity
  return Sequential([pool, conv(in_features, features, 1), norm(features)])


class _Block(nnx.Module):
  """The shortcut and the attention (`se`) shared by both blocks; subclasses build the
  residual branch first.

  With a `drop_path_rate` the residual branch is dropped per example in train mode
  (`deterministic=False`, set by `model.train()`), with masks from the key the call gets.
  """
  expansion = 1

  def __init__(self, in_features, out_features, *, strides, shortcut, avg_down, conv, norm,
               attention=None, drop_path_rate=0.0, down_kernel_size=1):
    self.se = attention(out_features) if attention is not None else None
    reshapes = strides != 1 or in_features != out_features
    projects = shortcut == 'C' or (reshapes and shortcut == 'B')
    self.downsample = (downsample(in_features, out_features, strides, conv, norm, avg_down,
                                  down_kernel_size) if projects else None)
    self.shortcut, self.strides, self.out_features = shortcut, strides, out_features
    self.pads = reshapes and shortcut == 'A'
    self.drop_path_rate, self.deterministic = drop_path_rate, True

  def residual(self, x):
    raise NotImplementedError

  def _conv_bn_act(self, conv, bn, x):
    """conv -> bn -> ReLU, then the anti-aliasing pool where this block's strided conv
    runs at stride 1 (`models.blocks._Block._conv_bn_act`)."""
    x = nn.relu(bn(conv(x)))
    pools = self.anti_alias is not None and self.strides > 1
    return anti_alias.downsample(x, self.anti_alias) if pools else x

  def __call__(self, x: jax.Array, drop_path_key: Optional[jax.Array] = None) -> jax.Array:
    out = self.residual(x)
    if self.se is not None:
      out = self.se(out)
    if self.drop_path_rate > 0 and not self.deterministic:
      if drop_path_key is None:
        raise UserError('This model has a drop_path_rate and is in train mode: call it as '
                         'model(x, rngs=nnx.Rngs(drop_path=key)) (or a jax key), a new key '
                         'each step.')
      out = drop_path(out, self.drop_path_rate, drop_path_key)
    if self.shortcut == 'none':
      return nn.relu(out)
    if self.downsample is not None:
      x = self.downsample(x)
    elif self.pads:  # option A
      x = subsample_and_pad(x, self.out_features, self.strides)
    return nn.relu(out + x)


def _last_norm(norm, features, zero_init_last):
  return norm(features, scale_init=nn.initializers.zeros if zero_init_last else
              nn.initializers.ones)


class BasicBlock(_Block):
  """`models.BasicBlock` in NNX: conv1/bn1, conv2/bn2, optional `downsample`."""
  expansion = 1

  def __init__(self, in_features, features, *, conv, norm, strides=1, groups=1,
               base_width=64, zero_init_last=False, reduce_first=1, anti_alias=None,
               **shortcut_kwargs):
    if groups != 1 or base_width != 64:
      raise ValueError('BasicBlock supports only groups=1 and base_width=64 '
                       '(as in torchvision); use BottleneckBlock for wide or ResNeXt models.')
    first = features // reduce_first
    self.conv1 = conv(in_features, first, 3, 1 if anti_alias else strides)
    self.bn1 = norm(first)
    self.conv2 = conv(first, features, 3)
    self.anti_alias = anti_alias
    self.bn2 = _last_norm(norm, features, zero_init_last)
    super().__init__(in_features, features, strides=strides, conv=conv, norm=norm,
                     **shortcut_kwargs)

  def residual(self, x):
    x = self._conv_bn_act(self.conv1, self.bn1, x)
    return self.bn2(self.conv2(x))


class BottleneckBlock(_Block):
  """`models.BottleneckBlock` in NNX: conv1..3/bn1..3 (grouped conv2), optional `downsample`."""
  expansion = 4

  def __init__(self, in_features, features, *, conv, norm, strides=1, groups=1,
               base_width=64, zero_init_last=False, reduce_first=1, anti_alias=None,
               widths=None, **shortcut_kwargs):
    first, width, out_features = bottleneck_widths(features, groups, base_width, reduce_first,
                                                   widths)
    self.conv1 = conv(in_features, first, 1)
    self.bn1 = norm(first)
    self.conv2 = conv(first, width, 3, 1 if anti_alias else strides, groups)
    self.bn2 = norm(width)
    self.anti_alias = anti_alias
    self.conv3 = conv(width, out_features, 1)
    self.bn3 = _last_norm(norm, out_features, zero_init_last)
    super().__init__(in_features, out_features, strides=strides, conv=conv, norm=norm,
                     **shortcut_kwargs)

  def residual(self, x):
    x = nn.relu(self.bn1(self.conv1(x)))
    x = self._conv_bn_act(self.conv2, self.bn2, x)
    return self.bn3(self.conv3(x))


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


def _call_block(block, x, key):
  return block(x, key)


def _block_keys(key, count):
  return [None] * count if key is None else list(jax.random.split(key, count))


def _call_stage(blocks, x, key=None):
  for block, block_key in zip(blocks, _block_keys(key, len(blocks))):
    x = block(x, block_key)
  return x


def _call_stage_remat_blocks(blocks, x, key=None):
  for block, block_key in zip(blocks, _block_keys(key, len(blocks))):
    x = nnx.remat(_call_block)(block, x, block_key)
  return x


def _call_stem(conv1, bn1, maxpool, x):
  x = nn.relu(bn1(conv1(x)))
  return x if maxpool is None else maxpool(x)


class ResNet(nnx.Module):
  """The NNX ResNet of `spec`, a linen `models.ResNet` (e.g. from `zoo.create_model`).

  Attributes follow torchvision: `conv1`, `bn1`, `layer1`..`layerK` (lists of blocks),
  `fc` (None when `num_classes=0`), and timm where torchvision has no counterpart (a deep
  stem's `conv1[0]`..`conv1[6]`, a block's attention `se`). Built in eval mode, like linen's default
  `train=False`: call `model.train()` before training, `model.eval()` after. Call as
  `model(x)` on NHWC images for logits, or `model(x, return_features=True)` for the
  linen model's dict of named features. With `spec.remat` each block runs under
  `nnx.remat`; with `spec.elementwise_remat` the stem (and each stage, unless
  `spec.remat`) runs under `nnx.remat` with `remat.SAVE_CONV_OUTPUTS`, as in linen.
  `spec.scan_blocks` is not supported (load scanned checkpoints with `from_linen`, which
  unrolls them).
  """

  def __init__(self, spec: models.ResNet, *, rngs: nnx.Rngs):
    _check_spec(spec)
    self.spec = spec
    conv = functools.partial(Conv, dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    norm = _norm_partial(spec, rngs)
    width = self._build_stem(conv, norm)
    block_cls = BLOCKS[spec.block]
    block_kwargs = dict(conv=conv, norm=norm, shortcut=spec.shortcut, avg_down=spec.avg_down,
                        groups=spec.groups, base_width=spec.width_per_group,
                        zero_init_last=spec.zero_init_residual, reduce_first=spec.reduce_first,
                        anti_alias=spec.anti_alias, down_kernel_size=spec.down_kernel_size)
    rates = block_rates(spec.drop_path_rate, spec.stage_sizes)
    for i, (size, features) in enumerate(zip(spec.stage_sizes, spec.stage_widths)):
      blocks = []
      attention = _attention_partial(spec, features * block_cls.expansion, rngs)
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        widths = {} if spec.block_widths is None else dict(widths=spec.block_widths[i][j])
        blocks.append(block_cls(width, features, strides=strides, attention=attention,
                                drop_path_rate=rates[i][j], **widths, **block_kwargs))
        width = blocks[-1].out_features
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    self.fc = (nnx.Linear(width, spec.num_classes, dtype=spec.dtype,
                          param_dtype=spec.param_dtype, kernel_init=torch_linear_init,
                          bias_init=nn.initializers.zeros, rngs=rngs)
               if spec.num_classes else None)

  def _build_stem(self, conv, norm) -> int:
    spec = self.spec
    if spec.stem == 'cifar':
      width = spec.stage_widths[0]
      self.conv1 = conv(spec.in_channels, width, 3)
    elif spec.stem in DEEP_STEMS:
      first, second, width = deep_stem_widths(spec.stem, spec.stem_width)
      self.conv1 = Sequential([conv(spec.in_channels, first, 3, 2), norm(first), nn.relu,
                               conv(first, second, 3), norm(second), nn.relu,
                               conv(second, width, 3)])
    else:
      width = 64
      self.conv1 = conv(spec.in_channels, width, 7, 2)
    self.bn1 = norm(width)
    self.maxpool = self._stem_pool(conv, norm, width)
    return width

  def _stem_pool(self, conv, norm, width) -> Optional[Sequential]:
    """The stem's pool as timm's `maxpool` (`models.stems.pool_stem`); None for cifar."""
    spec = self.spec
    if spec.stem == 'cifar':
      return None
    if spec.stem_pool == 'conv':
      if not spec.anti_alias:
        return Sequential([conv(width, width, 3, 2), norm(width), nn.relu])
      return Sequential([conv(width, width, 3, 1), anti_alias.POOLS[spec.anti_alias],
                         norm(width), nn.relu])
    if spec.anti_alias:
      return Sequential(anti_alias.stem_pools(spec.anti_alias))
    return Sequential([max_pool_3x3_s2])

  def __call__(self, x: jax.Array, return_features: bool = False, rngs=None):
    """`rngs` (an `nnx.Rngs` with a 'drop_path' or default stream, or a jax key) gives
    the drop-path masks of a model with `drop_path_rate` in train mode."""
    self.spec.check_input(x)
    features = {}
    stem, stage = self._stem_and_stage_functions()
    keys = _stage_keys(rngs, len(self.spec.stage_sizes))
    x = features['stem'] = stem(self.conv1, self.bn1, self.maxpool, x.astype(self.spec.dtype))
    for i in range(len(self.spec.stage_sizes)):
      name = f'layer{i + 1}'
      x = features[name] = stage(getattr(self, name), x, keys[i])
    x = features['pre_logits'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.fc is not None:
      x = features['logits'] = self.fc(x).astype(jnp.float32)
    return features if return_features else x

  def _stem_and_stage_functions(self):
    """The stem and a stage as functions, under `nnx.remat` as the spec asks."""
    stem = _call_stem
    stage = _call_stage_remat_blocks if self.spec.remat else _call_stage
    if self.spec.elementwise_remat:
      stem = nnx.remat(stem, policy=SAVE_CONV_OUTPUTS)
      stage = stage if self.spec.remat else nnx.remat(stage, policy=SAVE_CONV_OUTPUTS)
    return stem, stage


def _norm_partial(spec, rngs):
  """The norm constructor of `spec.norm_layer` with the spec's settings."""
  if spec.norm_layer == 'group':
    return functools.partial(GroupNorm, epsilon=spec.bn_epsilon, dtype=spec.dtype,
                             param_dtype=spec.param_dtype, rngs=rngs)
  return functools.partial(BatchNorm, **batch_norm_settings(spec), dtype=spec.dtype,
                           param_dtype=spec.param_dtype,
                           fused_gradient=spec.fuses_bn_gradient, rngs=rngs)


def _attention_partial(spec, stage_channels, rngs):
  """The attention constructor (called with the block's channels) of a stage of
  `stage_channels` unpruned output channels, or None."""
  if spec.attention is None:
    return None
  return functools.partial(make_attention, spec.attention, sized_for=stage_channels,
                           se_ratio=spec.se_ratio, se_divisor=spec.se_divisor,
                           dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)


def _stage_keys(rngs, count):
  """One key per stage from `rngs` (None: no drop path masks)."""
  if rngs is None:
    return [None] * count
  key = rngs[RNG_STREAM]() if isinstance(rngs, nnx.Rngs) else rngs
  return list(jax.random.split(key, count))


def _check_spec(spec):
  check_choices(spec)
  if spec.scan_blocks:
    raise UserError('The NNX models do not support scan_blocks=True; build them unrolled '
                    '(from_linen unrolls a scanned checkpoint) and use remat=True to save '
                    'activation memory.')


def create_model(name: str, rngs: Optional[nnx.Rngs] = None, **overrides) -> ResNet:
  """Builds a zoo model as an NNX module, e.g. `create_model('resnet50', num_classes=10)`.

  Names and overrides as in `resnet_jax.models.create_model` (same table, same errors);
  parameters are initialized from `rngs` (default `nnx.Rngs(0)`). The model starts in
  eval mode.
  """
  spec = zoo.create_model(name, **overrides)
  return ResNet(spec, rngs=nnx.Rngs(0) if rngs is None else rngs)
