"""The generic ResNet: a stem, stages of residual blocks, global pooling and a head."""

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.anti_alias import ANTI_ALIASES
from resnet_jax.models.attention import ATTENTIONS, SE_DIVISOR, SE_RATIO, attention_partial
from resnet_jax.models.batch_norm import batch_norm_partial, batch_norm_settings
from resnet_jax.models.blocks import BLOCKS, SHORTCUTS, _Block
from resnet_jax.models.group_norm import group_norm_partial
from resnet_jax.models.convolution import Conv
from resnet_jax.models.drop_path import RNG_STREAM, block_rates
from resnet_jax.models.remat import SAVE_CONV_OUTPUTS
from resnet_jax.models.stems import (DEEP_STEMS, STEM_POOLS, STEMS, DeepStem, deep_stem_widths,
                                     pool_stem)

NORM_LAYERS = ('batch', 'group')


def execution(default: Any) -> Any:
  """A ResNet field that changes none of the model's variables, only how the model runs
  or trains (precision, rematerialization, the scanned layout, BatchNorm's batch
  statistics, initialization): a checkpoint resumes with it changed."""
  return dataclasses.field(default=default, metadata={'execution': True})


class Stage(nn.Module):
  """A stack of `num_blocks` blocks; the first one strides and changes width.

  With `scan` the blocks after the first, which are identical in shape, run under
  `nn.scan`: their parameters are stacked along a leading axis under the name 'rest'
  (see `resnet_jax.models.scan` to convert to and from the unrolled layout), and the
  compiler sees one block instead of `num_blocks - 1`. With `remat` every block is
  rematerialized in the backward pass, trading compute for activation memory: all of it,
  or what `remat_policy` does not keep. `drop_path_rates` (one per block, training
  only) drop each block's residual branch per example (`drop_path`). `block_widths`
  (one (conv1, conv2, conv3) triple per block, pruned nets) sets each block's widths.
  """
  block_cls: Type[_Block]
  num_blocks: int
  features: int
  strides: int
  block_kwargs: Dict[str, Any]
  scan: bool = False
  remat: bool = False
  remat_policy: Optional[Callable[..., bool]] = None
  drop_path_rates: Optional[Sequence[float]] = None
  block_widths: Optional[Sequence[Tuple[int, int, int]]] = None

  @nn.compact
  def __call__(self, x):
    block_cls = self.block_cls
    if self.remat:
      block_cls = nn.remat(block_cls, policy=self.remat_policy)
    widths = self.block_widths
    make = lambda i, **kw: block_cls(  # noqa: E731
        self.features, **self.block_kwargs,
        **({} if widths is None else dict(widths=tuple(widths[i]))), **kw)
    rates = self.drop_path_rates
    rate = (lambda i: ()) if rates is None else (lambda i: (rates[i],))  # noqa: E731
    x = make(0, strides=self.strides, name='0')(x, *rate(0))
    if self.scan and self.num_blocks > 1:
      # The blocks' drop rates are scanned over with them; each gets its own masks.
      run_rest = nn.scan(lambda block, carry, r: (block(carry, *([] if r is None else [r])),
                                                  None),
                         variable_axes={'params': 0, 'batch_stats': 0},
                         split_rngs={'params': True, RNG_STREAM: True},
                         length=self.num_blocks - 1)
      x, _ = run_rest(make(1, name='rest'), x,
                      None if rates is None else jnp.asarray(rates[1:], jnp.float32))
    else:
      for i in range(1, self.num_blocks):
        x = make(i, name=str(i))(x, *rate(i))
    return x


class ResNet(nn.Module):
  """ResNet (He et al. 2015) with torchvision's parameter names.

  Call as `model.apply(variables, x, train=False)` on NHWC images; returns logits of
  shape (N, num_classes), or pooled features (N, C) when `num_classes=0`. With
  `return_features=True` it returns a dict of named feature maps instead: 'stem',
  'layer1'..'layerK', 'pre_logits' and, when there is a head, 'logits'.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'basic' or 'bottleneck'.
    num_classes: classes of the fc head; 0 builds the model without a head.
    stage_widths: `features` of each stage's blocks (bottlenecks output 4x this); widths
      beyond len(stage_sizes) are unused, so stage_sizes=(2, 2) makes a two-stage net.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool), 'deep' or 'deep_tiered' (three 3x3
      convs + max-pool, timm's -c/-d/-s and -t stems) or 'cifar' (one 3x3 conv, no
      pooling); see `resnet_jax.models.stems`.
    stem_width: the deep stems' width w: they output 2w channels (the cifar stem outputs
      stage_widths[0]; the imagenet stem outputs 64).
    shortcut: 'A', 'B', 'C' (the paper's options) or 'none' (plain nets).
    avg_down: average-pool downsampling in projection shortcuts (ResNet-D).
    attention: None, 'se' (squeeze-and-excitation) or 'eca' (efficient channel
      attention) on each block's residual branch, as timm's seresnet/ecaresnet; see
      `resnet_jax.models.attention`.
    se_ratio, se_divisor: SE's squeeze width, channels * se_ratio rounded to a multiple
      of se_divisor (timm's rd_ratio, rd_divisor).
    anti_alias: None, 'avg' or 'blur': timm's anti-aliased downsampling (`aa_layer`) in
      the blocks and the stem; see `resnet_jax.models.anti_alias`.
    stem_pool: 'max' (the 3x3/2 max-pool) or 'conv' (ResNet-RS's 3x3/2 conv + BN + ReLU).
    norm_layer: 'batch' (BatchNorm) or 'group' (timm's GroupNorm, 32 groups, no running
      statistics; `resnet_jax.models.group_norm`).
    reduce_first: a bottleneck's conv1 outputs its inner width / reduce_first (senet154: 2).
    down_kernel_size: kernel of strided projection shortcuts (senet154: 3).
    block_widths: per stage, each bottleneck's (conv1, conv2, conv3) output channels
      (timm's pruned nets); None derives them from stage_widths and the rest. Attention
      is sized for the unpruned stage_widths, as timm's.
    groups, width_per_group: ResNeXt cardinality and width (64 = plain ResNet).
    zero_init_residual: zero the last BN scale of each block.
    in_channels: image channels expected.
    dtype, param_dtype: compute and parameter precision.
    bn_momentum, bn_epsilon, bn_unbiased_running_var, bn_group_size, bn_axis_name:
      BatchNorm settings (see `batch_norm.BatchNorm`).
    scan_blocks: run the repeated blocks of each stage with `nn.scan`.
    remat: rematerialize blocks in the backward pass.
    elementwise_remat: (memory saving, off by default: the fastest step keeps what it
      computed) keep only convolution outputs and BN statistics for the backward
      pass and recompute the rest (normalization, ReLU, residual additions, the max
      pool's input) from them, for the stem and for each stage as a whole
      (`remat.SAVE_CONV_OUTPUTS`): less activation memory for a few elementwise passes
      (benchmarks/RESULTS.md), gradients equal up to rounding. With `scan_blocks` each
      block is one such unit instead (a scanned stage would recompute all its blocks at
      once); with `remat` stages recompute whole blocks.
    bn_fused_gradient: train-mode BatchNorm gradient by its fused custom VJP (True) or
      by autodiff (False). None: fused unless `remat`, because under remat the fused
      gradient's saved residuals needed more memory (benchmarks/RESULTS.md). Either
      way the gradients are the same up to rounding.
    drop_path_rate: stochastic depth (timm's `drop_path_rate`): in training, block i of
      all n blocks drops its residual branch per example with probability
      rate * i / (n - 1), its masks drawn from the rng stream 'drop_path'
      (`model.apply(..., train=True, rngs={'drop_path': key})`). Changes no variable and
      no eval-mode output.

  Fields made with `execution` (`EXECUTION_FIELDS`) change no variable; the others, the
  architecture, decide what the variables are (`architecture_of`).
  """
  stage_sizes: Sequence[int]
  block: str = 'basic'
  num_classes: int = 1000
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'
  stem_width: int = 32
  shortcut: str = 'B'
  avg_down: bool = False
  attention: Optional[str] = None
  se_ratio: float = SE_RATIO
  se_divisor: int = SE_DIVISOR
  anti_alias: Optional[str] = None
  stem_pool: str = 'max'
  norm_layer: str = 'batch'
  reduce_first: int = 1
  down_kernel_size: int = 1
  block_widths: Optional[Sequence[Sequence[Tuple[int, int, int]]]] = None
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool = execution(False)
  in_channels: int = 3
  dtype: Any = execution(jnp.float32)
  param_dtype: Any = jnp.float32
  bn_momentum: float = execution(0.9)
  bn_epsilon: float = 1e-5
  bn_unbiased_running_var: bool = execution(True)
  bn_group_size: Optional[int] = execution(None)
  bn_axis_name: Optional[str] = execution(None)
  scan_blocks: bool = execution(False)
  remat: bool = execution(False)
  elementwise_remat: bool = execution(False)
  bn_fused_gradient: Optional[bool] = execution(None)
  drop_path_rate: float = execution(0.0)

  @property
  def total_stride(self) -> int:
    """How much the stem and stages downsample the input."""
    stem = 1 if self.stem == 'cifar' else 4
    return stem * 2 ** (len(self.stage_sizes) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    self.check_input(x)
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = self._norm_partial(train)
    features = {}
    stem, stage = ResNet._stem, Stage
    block_policy = None
    if self.elementwise_remat:
      stem = nn.remat(stem, policy=SAVE_CONV_OUTPUTS, static_argnums=(2, 3))
      if self.scan_blocks and not self.remat:  # a scan would recompute a stage at once
        block_policy = SAVE_CONV_OUTPUTS
      elif not self.remat:
        stage = nn.remat(stage, policy=SAVE_CONV_OUTPUTS)
    x = features['stem'] = stem(self, x.astype(self.dtype), conv, norm)
    rates = (block_rates(self.drop_path_rate, self.stage_sizes)
             if train and self.drop_path_rate > 0 else None)
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      name = f'layer{i + 1}'
      x = features[name] = stage(BLOCKS[self.block], size, width, 1 if i == 0 else 2,
                                 self._block_kwargs(conv, norm, width), self.scan_blocks,
                                 self.remat or block_policy is not None, block_policy,
                                 None if rates is None else tuple(rates[i]),
                                 None if self.block_widths is None else self.block_widths[i],
                                 name=name)(x)
    x = features['pre_logits'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes:
      x = features['logits'] = nn.Dense(
          self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=torch_linear_init, bias_init=nn.initializers.zeros,
          name='fc')(x).astype(jnp.float32)
    return features if return_features else x

  def _norm_partial(self, train):
    if self.norm_layer == 'group':
      return group_norm_partial(self.bn_epsilon, self.dtype, self.param_dtype)
    return batch_norm_partial(train, **batch_norm_settings(self), dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              fused_gradient=self.fuses_bn_gradient)

  def _block_kwargs(self, conv, norm, stage_width):
    """What every block of a stage of `stage_width` gets."""
    block = BLOCKS[self.block]
    return dict(conv=conv, norm=norm, shortcut=self.shortcut, avg_down=self.avg_down,
                groups=self.groups, base_width=self.width_per_group,
                zero_init_last=self.zero_init_residual, reduce_first=self.reduce_first,
                anti_alias=self.anti_alias, down_kernel_size=self.down_kernel_size,
                attention=attention_partial(self.attention, stage_width * block.expansion,
                                            self.se_ratio, self.se_divisor, self.dtype,
                                            self.param_dtype))

  def _stem(self, x, conv, norm):
    if self.stem == 'cifar':
      x = conv(self.stage_widths[0], 3, name='conv1')(x)
      return nn.relu(norm(name='bn1')(x))
    if self.stem in DEEP_STEMS:
      x = DeepStem(deep_stem_widths(self.stem, self.stem_width), conv, norm, name='conv1')(x)
    else:
      x = conv(64, 7, 2, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    return pool_stem(x, self.stem_pool, self.anti_alias, conv, norm)

  @property
  def fuses_bn_gradient(self) -> bool:
    return not self.remat if self.bn_fused_gradient is None else self.bn_fused_gradient

  def check_input(self, x):
    """Raises a ValueError unless x is a batch of images this model can take."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'ResNet expects NHWC images with {self.in_channels} channels, '
                       f'shape (batch, height, width, {self.in_channels}); got shape '
                       f'{tuple(x.shape)}. Transpose NCHW input with x.transpose(0, 2, 3, 1).')
    if min(x.shape[1:3]) < self.total_stride:
      raise ValueError(f'Images of {x.shape[1]}x{x.shape[2]} are too small for this model, '
                       f'which downsamples by {self.total_stride}: use images of at least '
                       f'{self.total_stride}x{self.total_stride}.')
    if not 0 <= self.drop_path_rate < 1 or (self.drop_path_rate and self.shortcut == 'none'):
      raise ValueError(f'drop_path_rate={self.drop_path_rate!r} must be in [0, 1), and 0 '
                       f'for plain nets (shortcut=\'none\'), whose residual branch is all.')
    check_choices(self)


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ResNet)
                         if f.metadata.get('execution'))

# What `config.model_overrides.memory_saving` names: the ResNet fields that trade compute
# for activation memory, by one name each, fastest (most memory) first. The fields stay the
# one record of how a model runs (model.json holds them, not the name); the name only sets
# them, and 'auto' (`MEMORY_SAVING_AUTO`) picks at start-up the first of these whose train
# step fits the devices' memory (`resnet_jax.train.memory_saving.choose_memory_saving`).
MEMORY_SAVING = {'none': dict(remat=False, elementwise_remat=False),
                 'elementwise': dict(remat=False, elementwise_remat=True),
                 'full': dict(remat=True, elementwise_remat=False)}
MEMORY_SAVING_AUTO = 'auto'


def architecture_of(model_config: Mapping[str, Any]) -> Dict[str, Any]:
  """A model.json or create_model arguments without the execution settings: what decides
  the variables, and so whether a checkpoint fits."""
  return {k: v for k, v in model_config.items() if k not in EXECUTION_FIELDS}


CHOICES = dict(stem=STEMS, shortcut=SHORTCUTS, attention=ATTENTIONS, anti_alias=ANTI_ALIASES,
               stem_pool=STEM_POOLS, norm_layer=NORM_LAYERS)


def check_choices(spec):
  """Raises a ValueError unless the spec's choices (stem, shortcut, attention, ...) are
  known, its stage sizes and widths positive, a width for each stage, and its per-block
  widths fit its stages."""
  wrong = [f'{field} must be one of {choices}, got {getattr(spec, field)!r}'
           for field, choices in CHOICES.items() if getattr(spec, field) not in choices]
  sizes, widths = tuple(spec.stage_sizes), tuple(spec.stage_widths)
  if not sizes or len(widths) < len(sizes) or min(sizes + widths) < 1:  # more widths: unused
    wrong.append(f'stage_sizes and stage_widths must be positive numbers, a width for each '
                 f'stage; got stage_sizes={sizes}, stage_widths={widths}')
  if spec.stem_width < 1:
    wrong.append(f'stem_width must be at least 1, got {spec.stem_width!r}')
  if wrong:
    raise ValueError('; '.join(wrong) + '.')
  widths = spec.block_widths
  if widths is not None and (spec.block != 'bottleneck' or spec.scan_blocks or [
      len(stage) for stage in widths] != list(spec.stage_sizes)):
    raise ValueError('block_widths needs bottleneck blocks, scan_blocks=False and one '
                     '(conv1, conv2, conv3) triple per block of stage_sizes.')


def torch_linear_init(key, shape, dtype=jnp.float32):
  """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / shape[0] ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)
