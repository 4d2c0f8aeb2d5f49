"""The model zoo: parameter counts, shapes, BatchNorm state, precision, scan, remat, errors."""

import functools
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quick_sample, saved_activations

import resnet_jax
from resnet_jax.models import anti_alias
from resnet_jax.models.blocks import subsample_and_pad
from resnet_jax.models.group_norm import group_norm

# torchvision's counts (num_classes=1000), timm's for resnet200 and its resnet.py variants, the
# paper's CIFAR nets.
PARAM_COUNTS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnet200': 64_673_832,
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
    'resnext101_64x4d': 83_455_272,
    'resnet50d': 25_576_264,
    # timm 1.0.31's counts (`sum(p.numel() for p in model.parameters())`).
    'resnet10t': 5_435_488,
    'resnet14t': 10_081_632,
    'resnet18d': 11_708_744,
    'resnet34d': 21_816_904,
    'resnet26': 15_995_176,
    'resnet26d': 16_014_408,
    'resnet26t': 16_011_872,
    'resnet50c': 25_576_264,
    'resnet50s': 25_680_808,
    'resnet101c': 44_568_392,
    'resnet101d': 44_568_392,
    'resnet101s': 44_672_936,
    'resnet152c': 60_212_040,
    'resnet152d': 60_212_040,
    'resnet152s': 60_316_584,
    'resnet200d': 64_693_064,
    'resnext50d_32x4d': 25_048_136,
    'resnext101_32x4d': 44_177_704,
    'resnext101_32x16d': 194_026_792,
    'resnext101_32x32d': 468_530_472,
    'seresnet50': 28_088_024,
    'seresnet152d': 66_841_080,
    'seresnext26d_32x4d': 16_809_512,
    'seresnext26t_32x4d': 16_806_976,
    'seresnext50_32x4d': 27_559_896,
    'seresnext101_32x4d': 48_955_416,
    'seresnext101_32x8d': 93_569_048,
    'seresnext101d_32x8d': 93_588_280,
    'seresnext101_64x4d': 88_232_984,
    'ecaresnetlight': 30_162_046,
    'ecaresnet26t': 16_011_916,
    'ecaresnet50d': 25_576_350,
    'ecaresnet50t': 25_573_814,
    'ecaresnet101d': 44_568_563,
    'ecaresnet269d': 102_093_077,
    'ecaresnet50d_pruned': 19_939_713,
    'ecaresnet101d_pruned': 24_876_040,
    'resnetaa50': 25_557_032,
    'resnetaa50d': 25_576_264,
    'resnetaa101d': 44_568_392,
    'seresnextaa101d_32x8d': 93_588_280,
    'seresnextaa201d_32x8d': 149_394_904,
    'resnetblur50': 25_557_032,
    'resnet50_gn': 25_557_032,
    'resnetrs50': 35_691_912,
    'resnetrs101': 63_618_696,
    'resnetrs152': 86_621_576,
    'resnetrs200': 93_209_992,
    'resnetrs270': 129_861_448,
    'resnetrs350': 163_956_168,
    'resnetrs420': 191_891_656,
    'senet154': 115_088_984,
    'cifar_resnet20': 269_722,
    'cifar_resnet32': 464_154,
    'cifar_resnet44': 658_586,
    'cifar_resnet56': 853_018,
    'cifar_resnet110': 1_727_962,
    'cifar_resnet1202': 19_421_274,
    'cifar_plain20': 269_722,
    'cifar_plain32': 464_154,
    'cifar_plain44': 658_586,
    'cifar_plain56': 853_018,
    'cifar_plain110': 1_727_962,
}


def _image_size(name):
  return 32 if name.startswith('cifar') else 64


def _init_shapes(model, size, batch=1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _init(name, size, batch=2, seed=0, jit=False, **overrides):
  """(model, variables, x); `jit` for the deep ones: eagerly, every op compiles alone."""
  model = resnet_jax.create_model(name, **overrides)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, size, size, 3))
  init = jax.jit(model.init) if jit else model.init
  return model, init(jax.random.PRNGKey(seed), x), x


def test_every_model_is_listed_with_a_count():
  assert sorted(resnet_jax.list_models()) == sorted(PARAM_COUNTS)


def test_readme_tables_list_every_model_with_its_count():
  readme = (Path(__file__).parent.parent / 'README.md').read_text()
  rows = dict(re.findall(r'^\| `(\w+)` \| ([\d,]+) \|', readme, re.MULTILINE))
  assert {name: int(count.replace(',', '')) for name, count in rows.items()} == PARAM_COUNTS


@pytest.mark.parametrize('name', quick_sample(sorted(PARAM_COUNTS), {
    'resnet18', 'resnet50', 'cifar_resnet20', 'seresnext26t_32x4d', 'ecaresnet50d_pruned',
    'resnet50_gn', 'resnetrs50'}))
def test_parameter_count(name):
  # Scanning stacks blocks without changing the parameters; it keeps the deep nets quick.
  # (Pruned nets, whose blocks differ in width, cannot scan.)
  pruned = resnet_jax.models.zoo.MODELS[name].get('block_widths') is not None
  model = resnet_jax.create_model(name, scan_blocks=not pruned)
  variables = _init_shapes(model, _image_size(name))
  assert _count(variables['params']) == PARAM_COUNTS[name]


def test_unrolled_and_scanned_counts_agree():
  unrolled = _init_shapes(resnet_jax.create_model('resnet50'), 64)
  scanned = _init_shapes(resnet_jax.create_model('resnet50', scan_blocks=True), 64)
  assert _count(unrolled['params']) == _count(scanned['params']) == PARAM_COUNTS['resnet50']
  assert _count(unrolled['batch_stats']) == _count(scanned['batch_stats'])


@pytest.mark.parametrize('name, widths', [
    ('resnet34', (64, 128, 256, 512)),
    ('resnet50', (256, 512, 1024, 2048)),
    ('resnext50_32x4d', (256, 512, 1024, 2048)),
    ('resnet50d', (256, 512, 1024, 2048)),
])
def test_stage_shapes_at_224(name, widths):
  model = resnet_jax.create_model(name)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = _init_shapes(model, 224)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)
  assert features['stem'].shape == (2, 56, 56, 64)
  for i, (width, size) in enumerate(zip(widths, (56, 28, 14, 7))):
    assert features[f'layer{i + 1}'].shape == (2, size, size, width)
  assert features['pre_logits'].shape == (2, widths[-1])
  assert features['logits'].shape == (2, 1000)


@pytest.mark.parametrize('name, first_convs, stem_out', [
    ('resnet50s', (64, 64, 128), 128), ('resnet26t', (24, 32, 64), 64),
    ('resnet50c', (32, 32, 64), 64)])
def test_deep_stem_widths(name, first_convs, stem_out):
  model = resnet_jax.create_model(name, num_classes=0)
  variables = _init_shapes(model, 64)
  stem = variables['params']['conv1']
  assert tuple(stem[i]['kernel'].shape[-1] for i in ('0', '3', '6')) == first_convs
  assert variables['params']['layer1']['0']['conv1']['kernel'].shape[2] == stem_out


@pytest.mark.parametrize('height, width', [(7, 9), (8, 8), (5, 6)])
def test_anti_aliasing_pools_are_torchs_and_timms(height, width):
  """AvgPool2d(2), timm's BlurPool2d (reflect padding) and the blur stem's stride-1
  max-pool, on odd and even sizes."""
  import timm.layers
  import torch
  x = np.random.default_rng(0).standard_normal((2, height, width, 3)).astype(np.float32)
  nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  references = {anti_alias.avg_pool_2x2: torch.nn.AvgPool2d(2),
                anti_alias.blur_pool: timm.layers.BlurPool2d(3, filt_size=3, stride=2),
                anti_alias.max_pool_3x3_s1: torch.nn.MaxPool2d(3, stride=1, padding=1)}
  for ours, theirs in references.items():
    with torch.no_grad():
      expected = theirs(nchw).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-6)


def test_group_norm_is_torchs():
  import torch
  x = np.random.default_rng(0).normal(1.0, 2.0, (2, 5, 3, 64)).astype(np.float32)
  scale, bias = (np.random.default_rng(s).standard_normal(64).astype(np.float32) for s in (1, 2))
  with torch.no_grad():
    expected = torch.nn.functional.group_norm(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 32, torch.from_numpy(scale),
        torch.from_numpy(bias), 1e-5).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(group_norm(jnp.asarray(x), scale, bias), expected,
                             rtol=1e-5, atol=1e-5)


def test_anti_aliased_blocks_stride_in_the_pool_not_the_conv():
  """resnetaa50 has resnet50's parameters, but its stride-2 blocks stride after conv2,
  so their feature maps are the same shape as resnet50's."""
  model = resnet_jax.create_model('resnetaa50', stage_sizes=(1, 1, 1, 1))
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True),
                            _init_shapes(model, 64), x)
  assert [features[k].shape[1] for k in ('stem', 'layer1', 'layer2', 'layer3', 'layer4')] == [
      16, 16, 8, 4, 2]


def test_pruned_widths_need_unscanned_bottlenecks():
  with pytest.raises(ValueError, match='block_widths needs bottleneck blocks'):
    resnet_jax.create_model('ecaresnet50d_pruned', scan_blocks=True).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_cifar_stage_shapes():
  model = resnet_jax.create_model('cifar_resnet20')
  variables = _init_shapes(model, 32)
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)
  assert [features[k].shape for k in ('stem', 'layer1', 'layer2', 'layer3')] == [
      (3, 32, 32, 16), (3, 32, 32, 16), (3, 16, 16, 32), (3, 8, 8, 64)]
  assert features['logits'].shape == (3, 10)


def test_headless_backbone_returns_pooled_features():
  model, variables, x = _init('resnet18', 32, num_classes=0)
  assert 'fc' not in variables['params']
  pooled = model.apply(variables, x)
  features = model.apply(variables, x, return_features=True)
  assert pooled.shape == (2, 512)
  np.testing.assert_allclose(pooled, features['layer4'].mean(axis=(1, 2)), atol=1e-6)
  assert 'logits' not in features


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
  model, variables, x = _init('cifar_resnet20', 16, batch=4)
  logits, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (4, 10)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updated['batch_stats'])
  assert all(jax.tree.leaves(changed))
  _, unchanged = model.apply(variables, x, train=False, mutable=['batch_stats'])
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables['batch_stats'],
                      unchanged['batch_stats'])
  assert all(jax.tree.leaves(same))


def test_train_and_eval_differ_and_eval_is_deterministic():
  model, variables, x = _init('cifar_resnet20', 16, batch=4)
  train_logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  eval_logits = model.apply(variables, x, train=False)
  assert not np.allclose(train_logits, eval_logits)
  np.testing.assert_array_equal(eval_logits, model.apply(variables, x[::-1])[::-1])


def test_bfloat16_compute_keeps_float32_params():
  model, variables, x = _init('cifar_resnet20', 16, batch=4, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  features, updated = model.apply(variables, x, train=True, return_features=True,
                                  mutable=['batch_stats'])
  assert features['layer3'].dtype == jnp.bfloat16
  assert features['logits'].dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updated)} == {jnp.dtype('float32')}
  reference = resnet_jax.create_model('cifar_resnet20').apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x), reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('name', quick_sample(['cifar_resnet20', 'resnet18', 'resnet50d'], {'resnet18'}))
def test_scan_matches_unrolled(name):
  model, variables, x = _init(name, 32 if name.startswith('cifar') else 64, batch=4, jit=True)
  scanned_model = resnet_jax.create_model(name, scan_blocks=True)
  scanned = resnet_jax.scan_variables(variables)
  expected_structure = jax.tree.structure(_init_shapes(scanned_model, 32))
  assert jax.tree.structure(scanned) == expected_structure
  # Jitted: eagerly, each op of the unrolled net compiles alone (a minute for resnet50d).
  apply, scanned_apply = jax.jit(model.apply), jax.jit(scanned_model.apply)
  np.testing.assert_allclose(scanned_apply(scanned, x), apply(variables, x),
                             atol=1e-4, rtol=1e-4)
  train = functools.partial(jax.jit, static_argnames=('train', 'mutable'))
  logits, stats = train(model.apply)(variables, x, train=True, mutable=('batch_stats',))
  scanned_logits, scanned_stats = train(scanned_model.apply)(scanned, x, train=True,
                                                             mutable=('batch_stats',))
  np.testing.assert_allclose(scanned_logits, logits, atol=1e-3, rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               resnet_jax.unscan_variables(scanned_stats), stats)
  jax.tree.map(np.testing.assert_array_equal, resnet_jax.unscan_variables(scanned), variables)


@pytest.mark.parametrize('overrides', [dict(remat=True),
                                       pytest.param(dict(remat=True, bn_fused_gradient=True),
                                                    marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients(overrides):
  model, variables, x = _init('cifar_resnet20', 16, batch=4)

  def grads(m):
    def loss(params):
      logits, _ = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                          train=True, mutable=['batch_stats'])
      return jnp.mean(logits ** 2)
    return jax.grad(loss)(variables['params'])

  expected = grads(model)
  actual = grads(resnet_jax.create_model('cifar_resnet20', **overrides))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), actual, expected)


@pytest.mark.parametrize('name, overrides', [
    ('resnet18', dict(stage_sizes=(1, 1))),
    ('resnet50', dict(stage_sizes=(2, 1), dtype=jnp.bfloat16)),
    pytest.param('resnet50', dict(stage_sizes=(1, 3), scan_blocks=True), marks=pytest.mark.slow),
    pytest.param('resnet50d', dict(stage_sizes=(1, 1), remat=True), marks=pytest.mark.slow),
    pytest.param('seresnext26t_32x4d', dict(stage_sizes=(1, 1)), marks=pytest.mark.slow),
    ('ecaresnet26t', dict(stage_sizes=(1, 2), scan_blocks=True))])
def test_elementwise_remat_gives_the_same_gradients_and_statistics(name, overrides):
  model, variables, x = _init(name, 32, batch=4, jit=True, num_classes=5, **overrides)

  def step(m):
    def loss(params):
      logits, updates = m.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
      return jnp.mean(logits.astype(jnp.float32) ** 2), updates
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  assert not model.elementwise_remat  # the default: the fastest step keeps what it computed
  recomputed = step(model.clone(elementwise_remat=True))
  kept = step(model)
  if model.dtype == jnp.float32:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 recomputed, kept)
  else:
    # XLA:CPU keeps some bfloat16 intermediates in float32 (xla_allow_excess_precision),
    # differently in the two programs; with that flag off they are bit-identical. Either
    # way the difference is far below bfloat16's own error against float32 (~20% here).
    flat = [np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)]).astype(float)
            for tree in (recomputed, kept)]
    assert np.linalg.norm(flat[0] - flat[1]) < 0.02 * np.linalg.norm(flat[1])


def _saved_activations(model, x):
  """(shape, description) of the image-sized values the backward pass of `model` keeps."""
  variables = model.init(jax.random.PRNGKey(0), x)
  return saved_activations(
      lambda params: model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 x, train=True, mutable=['batch_stats'])[0].sum(),
      variables['params'])


def test_elementwise_remat_keeps_only_conv_outputs_and_stage_inputs():
  model = resnet_jax.create_model('resnet50', stage_sizes=(2, 2), num_classes=5,
                                  elementwise_remat=True)
  x = jnp.ones((2, 32, 32, 3))
  saved = _saved_activations(model, x)
  convs = [shape for shape, why in saved if "named 'conv_output'" in why]
  others = [shape for shape, why in saved if "named 'conv_output'" not in why]
  # stem conv + 3 convs per block + the two first blocks' projections
  assert len(convs) == 1 + 3 * 4 + 2
  assert others == [(2, 32, 32, 3), (2, 8, 8, 64), (2, 8, 8, 256)]  # stem's, stages' inputs
  without = _saved_activations(model.clone(elementwise_remat=False), x)
  assert sum(np.prod(s) for s, _ in without) > 1.4 * sum(np.prod(s) for s, _ in saved)


@pytest.mark.parametrize('remat, bn_fused_gradient, fused', [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)])
def test_bn_fused_gradient_defaults_to_fused_unless_remat(remat, bn_fused_gradient, fused):
  model = resnet_jax.create_model('cifar_resnet20', remat=remat,
                                  bn_fused_gradient=bn_fused_gradient)
  seen = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, resnet_jax.BatchNorm):
      seen.add(context.module.fused_gradient)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _init_shapes(model, 16)
  assert seen == {fused}


def test_zero_init_residual_starts_blocks_as_identity_branches():
  _, variables, _ = _init('resnet50', 32, zero_init_residual=True)
  for stage in ('layer1', 'layer4'):
    np.testing.assert_array_equal(variables['params'][stage]['0']['bn3']['scale'], 0)
    np.testing.assert_array_equal(variables['params'][stage]['0']['bn2']['scale'], 1)


def test_cross_device_batch_norm_equals_global_batch():
  """bn_axis_name averages statistics over a mapped axis: the same as one global batch."""
  model, variables, x = _init('cifar_resnet20', 16, batch=8)
  expected, expected_stats = model.apply(variables, x, train=True, mutable=['batch_stats'])
  mapped = resnet_jax.create_model('cifar_resnet20', bn_axis_name='devices')
  logits, stats = jax.vmap(
      lambda x: mapped.apply(variables, x, train=True, mutable=['batch_stats']),
      axis_name='devices')(x.reshape(4, 2, 16, 16, 3))
  np.testing.assert_allclose(logits.reshape(8, 10), expected, atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, atol=1e-5, rtol=1e-5),
               stats, expected_stats)


def test_bn_group_size_normalizes_each_group_alone():
  model, variables, x = _init('cifar_resnet20', 16, batch=8)
  ghost = resnet_jax.create_model('cifar_resnet20', bn_group_size=4)
  logits, _ = ghost.apply(variables, x, train=True, mutable=['batch_stats'])
  first, _ = model.apply(variables, x[:4], train=True, mutable=['batch_stats'])
  second, _ = model.apply(variables, x[4:], train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(logits, np.concatenate([first, second]), atol=1e-4, rtol=1e-4)


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
  y = subsample_and_pad(x, 32, 2)
  assert y.shape == (2, 2, 2, 32)
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :8], 0)
  np.testing.assert_array_equal(y[..., 24:], 0)


@pytest.mark.parametrize('shortcut, has_projection', [('A', False), ('B', True), ('C', True),
                                                      ('none', False)])
def test_cifar_shortcut_options(shortcut, has_projection):
  model, variables, x = _init('cifar_resnet20', 16, shortcut=shortcut)
  params = variables['params']
  assert ('downsample' in params['layer2']['0']) == has_projection
  # Option C projects in every block, B only where the shape changes.
  assert ('downsample' in params['layer1']['1']) == (shortcut == 'C')
  assert model.apply(variables, x).shape == (2, 10)


def test_plain_net_has_no_shortcut():
  model, variables, x = _init('cifar_plain20', 16)
  zero = jax.tree.map(jnp.zeros_like, variables['params'])
  # With all weights zero, BN outputs its bias (0): a plain net outputs zeros before fc,
  # a residual net keeps the (non-negative, mostly non-zero) stem activations.
  plain = model.apply({**variables, 'params': zero}, x, return_features=True)
  assert float(jnp.abs(plain['layer3']).max()) == 0.0
  resnet = resnet_jax.create_model('cifar_resnet20')
  residual_params = {**zero, 'bn1': variables['params']['bn1'], 'conv1': variables['params']['conv1']}
  out = resnet.apply({**variables, 'params': residual_params}, x, return_features=True)
  assert float(jnp.abs(out['layer3']).max()) > 0.0


# timm's variants differ from these only in depth or width.
JIT_NAMES = [name for name in PARAM_COUNTS if name not in resnet_jax.models.zoo.TIMM_MODELS
             or name in ('resnet10t', 'resnet50d', 'seresnext26t_32x4d')]


@pytest.mark.parametrize('name', quick_sample(sorted(JIT_NAMES), {
    'resnet18', 'resnet50d', 'seresnext26t_32x4d', 'cifar_resnet20', 'cifar_plain20'}))
def test_every_model_jits(name):
  """init traces and lowers, the train-mode forward traces, lowers and compiles (both are
  executed in other tests). init's compile is left out: it took most of a case's time
  (XLA:CPU on its random initializers) and its program is the forward's and those."""
  # Scanning keeps compile time small; test_scan_matches_unrolled covers the unrolled path.
  model = resnet_jax.create_model(name, scan_blocks=True)
  size = _image_size(name)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  init = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x)).lower(x)
  variables = _init_shapes(model, size)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, stats = forward.lower(variables, x).compile().out_info
  assert logits.shape == (2, model.num_classes)
  assert jax.tree.structure(stats['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  assert jax.tree.structure(init.out_info) == jax.tree.structure(variables)


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='Unknown model .resnet51.*resnet50.*Valid names:.*resnet18'):
    resnet_jax.create_model('resnet51')


def test_unknown_option_lists_valid_options():
  with pytest.raises(ValueError, match="Unknown option.*'depth'.*valid options:.*scan_blocks"):
    resnet_jax.create_model('resnet18', depth=18)


@pytest.mark.parametrize('option, value', [('num_classes', -3), ('in_channels', 0),
                                           ('num_classes', 2.5)])
def test_impossible_head_or_channels_are_refused(option, value):
  with pytest.raises(ValueError, match=f'{option} must be an integer'):
    resnet_jax.create_model('resnet18', **{option: value})


@pytest.mark.parametrize('overrides, message', [
    (dict(stage_sizes=(1, 0, 1, 1)), 'stage_sizes and stage_widths must be positive'),
    (dict(stage_widths=(8, 16)), r'a width for each stage.*stage_widths=\(8, 16\)'),
    (dict(stage_sizes=()), 'stage_sizes and stage_widths must be positive'),
    (dict(stem='deep', stem_width=0), 'stem_width must be at least 1, got 0'),
])
def test_impossible_stages_or_stem_are_refused(overrides, message):
  """Before: zip() dropped the extra widths, and a zero-width layer built."""
  model = resnet_jax.create_model('resnet18', **overrides)
  with pytest.raises(ValueError, match=message):
    _init_shapes(model, 32)


@pytest.mark.parametrize('shape, message', [
    ((32, 32, 3), 'NHWC images with 3 channels'),
    ((1, 3, 32, 32), 'x.transpose'),
    ((1, 16, 16, 3), 'too small.*at least 32x32'),
])
def test_bad_input_shapes_raise_clear_errors(shape, message):
  model = resnet_jax.create_model('resnet18')
  variables = _init_shapes(model, 32)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32))

