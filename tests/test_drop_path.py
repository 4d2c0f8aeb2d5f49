"""Stochastic depth (resnet_jax.models.drop_path) against timm's `drop_path` and timm's
ResNet with `drop_path_rate`: the same masks give the same outputs, in linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.layers import drop_path as timm_drop_path

from resnet_jax import convert, create_model
from resnet_jax.models import drop_path as drop_path_module
from resnet_jax.models import scan_variables
from resnet_jax.models.drop_path import block_rates, drop_path, drop_path_mask
from resnet_jax.nnx import create_model as create_nnx_model
from resnet_jax.nnx.convert import from_linen

BATCH = 6


def _kept(rate: float) -> np.ndarray:
  """A fixed (BATCH, 1, 1, 1) keep mask for a block of drop rate `rate` (a function of
  the rate only, so it can be handed to timm and to us in any call order)."""
  rng = np.random.default_rng(int(round(rate * 1e6)))
  kept = rng.random((BATCH, 1, 1, 1)) >= rate
  kept[0] = False if rate > 0 else kept[0]  # at least one dropped example where dropping
  return kept


@pytest.fixture
def shared_masks(monkeypatch):
  """Makes our masks and torch's bernoulli_ (which timm's drop_path draws with) both
  return `_kept(rate)`."""
  def our_mask(rng, rate, batch_size, dtype=jnp.float32):
    del rng, batch_size
    if not isinstance(rate, jax.core.Tracer):
      return jnp.asarray(_kept(float(rate)) / np.float32(1 - rate), dtype)
    # A scanned block's traced rate: pick the mask of the rate it equals.
    known = sum(block_rates(0.2, (2, 2, 2, 2)), [])
    masks = [jnp.asarray(_kept(r) / np.float32(1 - r), dtype) for r in known]
    return jnp.select([jnp.abs(rate - r) < 1e-7 for r in known], masks, jnp.nan)

  def torch_bernoulli_(self, p):
    return self.copy_(torch.from_numpy(_kept(1.0 - p).astype(np.float32)))

  monkeypatch.setattr(drop_path_module, 'drop_path_mask', our_mask)
  monkeypatch.setattr(torch.Tensor, 'bernoulli_', torch_bernoulli_)


def test_drop_path_matches_timms_for_the_same_mask(shared_masks):
  x = np.random.default_rng(0).standard_normal((BATCH, 4, 4, 3)).astype(np.float32)
  got = drop_path(jnp.asarray(x), 0.3, jax.random.key(0))
  expected = timm_drop_path(torch.from_numpy(x), 0.3, training=True).numpy()
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert np.all(np.asarray(got)[0] == 0) and np.any(np.asarray(got) != 0)


def test_masks_keep_each_example_with_probability_one_minus_rate():
  mask = np.asarray(drop_path_mask(jax.random.key(1), 0.25, 20_000))
  assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.75)}
  assert abs(np.mean(mask > 0) - 0.75) < 0.015


def test_block_rates_are_timms():
  reference = timm.create_model('resnet50', drop_path_rate=0.05)
  expected = [[getattr(block.drop_path, 'drop_prob', 0.0) if block.drop_path else 0.0
               for block in getattr(reference, f'layer{i}')] for i in range(1, 5)]
  np.testing.assert_allclose(sum(block_rates(0.05, (3, 4, 6, 3)), []), sum(expected, []))


@pytest.fixture(scope='module')
def timm_resnet18():
  torch.manual_seed(0)
  reference = timm.create_model('resnet18', num_classes=10, drop_path_rate=0.2)
  with torch.no_grad():  # timm zero-inits each block's last BN: nothing to drop
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return reference, convert.torch_to_flax(reference.state_dict(), 'resnet18')


def _images():
  return np.random.default_rng(1).standard_normal((BATCH, 32, 32, 3)).astype(np.float32)


def _timm_train_logits(reference, x):
  return reference.train()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()


@pytest.mark.parametrize('scan_blocks', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_linen_resnet_trains_like_timms_with_the_same_masks(shared_masks, timm_resnet18,
                                                            scan_blocks):
  reference, variables = timm_resnet18
  x = _images()
  expected = _timm_train_logits(reference, x)
  model = create_model('resnet18', num_classes=10, drop_path_rate=0.2)
  if scan_blocks:  # the scanned blocks get their rates as traced values
    model = model.clone(scan_blocks=True)
    variables = scan_variables(variables)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                               rngs={'drop_path': jax.random.key(0)}))(
      variables, x)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=2e-4)
  without = model.clone(drop_path_rate=0.0).apply(
      variables, x, train=True, mutable=['batch_stats'])[0]
  assert not np.allclose(np.asarray(without), expected, atol=1e-2)  # the masks mattered


def test_nnx_resnet_trains_like_timms_with_the_same_masks(shared_masks, timm_resnet18):
  reference, variables = timm_resnet18
  x = _images()
  model = from_linen(variables, 'resnet18', num_classes=10, drop_path_rate=0.2)
  model.train()
  got = model(x, rngs=nnx.Rngs(drop_path=0))
  np.testing.assert_allclose(np.asarray(got), _timm_train_logits(reference, x), rtol=0,
                             atol=2e-4)


def test_eval_mode_and_variables_do_not_depend_on_the_rate():
  x = jnp.asarray(_images())
  plain = create_model('resnet18', num_classes=10)
  dropped = create_model('resnet18', num_classes=10, drop_path_rate=0.1)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(dropped.init, jax.random.key(0), x))
  np.testing.assert_array_equal(plain.apply(variables, x), dropped.apply(variables, x))
  # Train mode with drop path needs its rng stream, and says so.
  with pytest.raises(Exception, match='drop_path'):
    dropped.apply(variables, x, train=True, mutable=['batch_stats'])
  nnx_model = create_nnx_model('resnet18', num_classes=10, drop_path_rate=0.1)
  nnx_model.train()
  with pytest.raises(Exception, match='rngs=nnx.Rngs\\(drop_path=key\\)'):
    nnx_model(x)


def test_impossible_rates_are_refused():
  x = jnp.zeros((1, 32, 32, 3))
  for model in (create_model('resnet18', drop_path_rate=1.0),
                create_model('cifar_plain20', drop_path_rate=0.1)):
    with pytest.raises(ValueError, match='drop_path_rate'):
      model.init(jax.random.key(0), x)


def test_drop_path_rate_is_neutral_for_converted_checkpoints(timm_resnet18):
  """A workdir's model.json with drop_path_rate converts to the same torch layout."""
  from resnet_jax.models.torch_names import layout_overrides  # pylint: disable=g-import-not-at-top
  _, variables = timm_resnet18
  assert layout_overrides({'name': 'resnet18', 'drop_path_rate': 0.1}) == {}
  state_dict = convert.flax_to_torch(variables, 'resnet18', drop_path_rate=0.1)
  assert set(state_dict) == set(timm_resnet18[0].state_dict())


@pytest.mark.slow  # compiles two train steps: ~1 min on a loaded 2-core machine
def test_train_step_masks_are_a_function_of_seed_and_step():
  import functools  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.step import Recipe, train_step  # pylint: disable=g-import-not-at-top
  model = create_model('cifar_resnet20', num_classes=10, stage_sizes=(2, 2, 2),
                       stage_widths=(4, 8, 16), drop_path_rate=0.5)
  state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), (1, 8, 8, 3))
  batch = {'image': np.random.default_rng(0).standard_normal((8, 8, 8, 3)).astype(np.float32),
           'label': np.arange(8) % 10}
  losses = {}
  for seed, step in ((0, 0), (0, 0), (0, 1), (1, 0)):
    run = jax.jit(functools.partial(train_step, recipe=Recipe(seed=seed, drop_path=True)))
    losses.setdefault((seed, step), []).append(
        float(run(state.replace(step=step), batch)[1]['loss']))
  assert losses[0, 0][0] == losses[0, 0][1]
  assert len({losses[0, 0][0], losses[0, 1][0], losses[1, 0][0]}) == 3
