"""The NNX models against the linen ones on the same variables: logits, BN statistics, steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import nchw, quick_sample, saved_activations
from flax import nnx, traverse_util

import resnet_jax
from resnet_jax import nnx as rnnx
from resnet_jax.convert import torch_reference_model, torch_to_flax
from resnet_jax.errors import UserError
from resnet_jax.models import scan_variables

# (zoo name, overrides, image size): basic, option A, ghost BN, bottleneck, ResNeXt, ResNet-D,
# and timm's stems and attentions.
CASES = {
    'cifar_resnet20': ('cifar_resnet20', {}, 8),
    'cifar_ghost_bn': ('cifar_resnet20', dict(bn_group_size=2, num_classes=3), 8),
    'resnet18': ('resnet18', dict(num_classes=7), 32),
    'resnext': ('resnext50_32x4d', dict(num_classes=5, stage_sizes=(1, 2, 1, 1)), 32),
    'resnet50d': ('resnet50d', dict(num_classes=5, stage_sizes=(1, 2, 1, 1)), 32),
    # timm's stems and attention: tiered stem + SE + ResNeXt, the -s stem, ECA.
    'seresnext26t': ('seresnext26t_32x4d', dict(num_classes=5, stage_sizes=(1, 1, 1, 1)), 32),
    'resnet50s': ('resnet50s', dict(num_classes=5, stage_sizes=(1, 1, 1, 1),
                                    stage_widths=(16, 32, 64, 128)), 32),
    'ecaresnetlight': ('ecaresnetlight', dict(num_classes=5, stage_sizes=(1, 1, 1, 1),
                                              stage_widths=(16, 32, 64, 128)), 32),
    'resnet10t': ('resnet10t', dict(num_classes=5), 32),
    # timm's other families: pruned widths, 'avg' anti-aliasing with SE-ResNeXt and avg-down,
    # blur pool, GroupNorm, ResNet-RS's stem conv and SE 1/4, SENet-154.
    'ecaresnet50d_pruned': ('ecaresnet50d_pruned', dict(num_classes=5), 32),
    'seresnextaa': ('seresnextaa101d_32x8d', dict(num_classes=5, stage_sizes=(1, 1, 1, 1)), 32),
    'resnetblur50': ('resnetblur50', dict(num_classes=5, stage_sizes=(1, 1, 1, 1),
                                          stage_widths=(16, 32, 64, 128)), 32),
    'resnet50_gn': ('resnet50_gn', dict(num_classes=5, stage_sizes=(1, 1, 1, 1)), 32),
    'resnetrs50': ('resnetrs50', dict(num_classes=5, stage_sizes=(1, 1, 1, 1),
                                      stage_widths=(16, 32, 64, 128)), 32),
    'senet154': ('senet154', dict(num_classes=5, stage_sizes=(1, 1, 1, 1)), 32),
}


def _randomized(variables, seed=0):
  """Every leaf different (BN variances positive), so a mis-mapped variable changes the logits.

  The noise is NumPy's: drawn by JAX, each leaf's shape is a program to compile (eagerly one
  each, jitted one large one), minutes for a net whose leaves all differ in shape
  (ecaresnet50d_pruned's widths) on 2 busy cores."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda leaf: np.asarray(leaf) + 0.1 * rng.standard_normal(
      leaf.shape, dtype=leaf.dtype), variables)
  # GroupNorm nets have no running statistics; NNX's to_linen and torch_to_flax give an
  # empty collection for them, as here.
  out['batch_stats'] = jax.tree.map(np.abs, out.get('batch_stats', {}))
  return jax.device_put(out)


def _linen(name, overrides, size, batch=4):
  spec = resnet_jax.create_model(name, **overrides)
  x = jax.random.normal(jax.random.key(1), (batch, size, size, spec.in_channels))
  # Jitted: eagerly, each initializer compiles alone, and the pruned net's all differ.
  return spec, _randomized(jax.jit(spec.init)(jax.random.key(0), x)), x


def _assert_trees_close(actual, expected, tol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=tol, atol=tol), actual, expected)


@pytest.mark.parametrize('case', quick_sample(list(CASES), {'cifar_ghost_bn', 'resnet18', 'seresnext26t'}))
def test_same_logits_and_running_statistics_as_linen(case):
  name, overrides, size = CASES[case]
  spec, variables, x = _linen(name, overrides, size)
  model = rnnx.from_linen(variables, name, **overrides)
  call = nnx.jit(lambda model, x: model(x))
  _assert_trees_close(call(model, x), jax.jit(spec.apply)(variables, x))
  _assert_trees_close(rnnx.to_linen(model), variables, tol=0)  # eval keeps the statistics

  model.train()
  logits, updates = jax.jit(lambda variables, x: spec.apply(
      variables, x, train=True, mutable=['batch_stats']))(variables, x)
  _assert_trees_close(call(model, x), logits)
  _assert_trees_close(rnnx.to_linen(model)['batch_stats'], updates.get('batch_stats', {}))


def test_attribute_paths_follow_torchvision():
  model = rnnx.create_model('resnet50d', num_classes=3, zero_init_residual=True)
  assert model.conv1[0].kernel.shape == (3, 3, 3, 32)  # deep stem conv1.0
  assert model.bn1.scale.shape == (64,)
  assert model.layer1[0].conv1.kernel.shape == (1, 1, 64, 64)
  assert model.layer2[0].downsample[1].kernel.shape == (1, 1, 256, 512)  # [0] is the pool
  assert model.fc.kernel.shape == (2048, 3)
  assert isinstance(model.bn1.scale, nnx.Param) and isinstance(model.bn1.mean, nnx.BatchStat)
  assert not np.any(model.layer1[0].bn3.scale[...])  # zero_init_residual
  assert rnnx.create_model('resnet18', num_classes=0).fc is None


def test_train_and_eval_switch_running_averages():
  model = rnnx.create_model('cifar_resnet20')
  assert model.bn1.use_running_average  # built in eval mode, like linen's train=False
  model.train()
  assert not model.layer3[2].bn2.use_running_average
  model(jnp.ones((2, 8, 8, 3)))
  assert not np.allclose(model.bn1.mean[...], 0)
  model.eval()
  before = rnnx.to_linen(model)['batch_stats']
  model(jnp.ones((2, 8, 8, 3)))
  _assert_trees_close(rnnx.to_linen(model)['batch_stats'], before, tol=0)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_optimizer_steps_equal_the_linen_steps():
  spec, variables, x = _linen('cifar_resnet20', dict(num_classes=3), 8)
  labels = jnp.array([0, 1, 2, 1])
  tx = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def linen_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = spec.apply({'params': params, 'batch_stats': batch_stats}, x,
                                   train=True, mutable=['batch_stats'])
      return _cross_entropy(logits, labels), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda model: _cross_entropy(model(x), labels))(model)
    optimizer.update(model, grads)
    return loss

  model = rnnx.from_linen(variables, 'cifar_resnet20', num_classes=3)
  model.train()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  for _ in range(2):  # the second step uses the momentum
    params, batch_stats, opt_state, loss = linen_step(params, batch_stats, opt_state)
    np.testing.assert_allclose(nnx_step(model, optimizer), loss, rtol=1e-5)
  _assert_trees_close(rnnx.to_linen(model), {'params': params, 'batch_stats': batch_stats},
                      tol=1e-5)


def test_jit_gives_the_eager_logits():
  model = rnnx.create_model('cifar_resnet20')
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  _assert_trees_close(nnx.jit(lambda model, x: model(x))(model, x), model(x), tol=1e-5)


def test_remat_gives_the_gradients_of_linen_remat():
  spec, variables, x = _linen('resnet18', dict(num_classes=3, remat=True, stage_sizes=(1, 1)),
                              16, batch=2)
  model = rnnx.from_linen(variables, spec)
  model.train()
  linen_grads = jax.grad(lambda params: spec.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
      mutable=['batch_stats'])[0].sum())(variables['params'])
  grads = nnx.grad(lambda model: model(x).sum())(model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(grads))
  grads = traverse_util.unflatten_dict({tuple(map(str, k)): v for k, v in flat.items()})
  _assert_trees_close(grads, linen_grads, tol=1e-5)


def test_elementwise_remat_keeps_what_linen_keeps():
  spec, variables, x = _linen('resnet50', dict(num_classes=3, stage_sizes=(1, 1),
                                               elementwise_remat=True), 32, batch=2)
  model = rnnx.from_linen(variables, spec)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  kept = saved_activations(
      lambda params: nnx.merge(graphdef, params, rest, copy=True)(x).sum(), params)
  linen_kept = saved_activations(lambda params: spec.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
      mutable=['batch_stats'])[0].sum(), variables['params'])
  # the stem's input, conv1 and the stem's output, 4 convs and the stage output per stage
  assert sorted(shape for shape, _ in kept) == sorted(shape for shape, _ in linen_kept)
  assert len(kept) == 3 + 2 * 5 - 1  # the last stage's output is not kept


def test_round_trip_is_exact_also_from_the_scan_layout():
  spec, variables, _ = _linen('cifar_resnet20', {}, 8)
  back = rnnx.to_linen(rnnx.from_linen(scan_variables(variables), 'cifar_resnet20'))
  _assert_trees_close(back, variables, tol=0)
  model = rnnx.from_linen(variables, spec.clone(scan_blocks=True))  # a scanned run's spec
  _assert_trees_close(rnnx.to_linen(model), variables, tol=0)


def test_errors_are_those_of_linen_create_model():
  for name, overrides in (('resnet5', {}), ('resnet18', {'num_class': 3})):
    with pytest.raises(ValueError) as linen_error:
      resnet_jax.create_model(name, **overrides)
    with pytest.raises(ValueError) as nnx_error:
      rnnx.create_model(name, **overrides)
    assert str(nnx_error.value) == str(linen_error.value)
  with pytest.raises(UserError, match='scan_blocks'):
    rnnx.create_model('cifar_resnet20', scan_blocks=True)


def test_variables_of_another_model_are_refused_with_the_differences():
  _, variables, _ = _linen('cifar_resnet20', {}, 8)
  wrong_head = r'wrong shape: .*fc/kernel \(64, 10\) \(expected \(64, 3\)\)'
  with pytest.raises(UserError, match=wrong_head):
    rnnx.from_linen(variables, 'cifar_resnet20', num_classes=3)
  with pytest.raises(UserError, match='missing: layer1/3/bn1/bias'):
    rnnx.from_linen(variables, 'cifar_resnet32')


@pytest.mark.parametrize('variables, stray', [({'foo': 1}, 'foo'), ({'params': 5}, 'params'),
                                              ([1, 2], 'list (not a mapping')])
def test_variables_that_are_not_collections_of_arrays_are_refused_alike(variables, stray):
  with pytest.raises(UserError) as info:
    rnnx.from_linen(variables, 'cifar_resnet20')
  message = str(info.value)
  assert message.startswith('The variables do not fit this model')
  assert 'missing: bn1/bias, ' in message and f'unexpected: {stray}' in message


@pytest.mark.parametrize('arch', quick_sample(
    ['resnet18', 'seresnext26t_32x4d', 'ecaresnet26t', 'resnet50_gn'], {'resnet18', 'resnet50_gn'}))
def test_converted_torchvision_and_timm_weights_give_their_logits(arch):
  torch_model = torch_reference_model(arch, num_classes=4).eval()
  model = rnnx.from_linen(torch_to_flax(torch_model.state_dict(), arch), arch, num_classes=4)
  x = np.random.default_rng(0).normal(size=(2, 37, 45, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(nchw(x)).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
