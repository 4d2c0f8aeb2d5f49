"""The train state: parameters, BatchNorm statistics, optimizer state, step and rng."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

CHECKPOINT_KEYS = ('params', 'batch_stats', 'opt_state', 'step', 'rng')


class TrainState(train_state.TrainState):
  """Flax's TrainState plus running BN statistics, an rng and the loss's label smoothing."""
  batch_stats: Any = None
  rng: jax.Array = None
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)

  def to_checkpoint(self) -> dict:
    """The pytree saved as the checkpoint's 'state' item."""
    return {key: getattr(self, key) for key in CHECKPOINT_KEYS}

  def from_checkpoint(self, tree: dict) -> 'TrainState':
    return self.replace(**{key: tree[key] for key in CHECKPOINT_KEYS})


def initial_variables(model: nn.Module, rng: jax.Array, input_shape) -> dict:
  """{'params', 'batch_stats'} of `model` for NHWC inputs of `input_shape` (batch first)."""
  return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape, label_smoothing: float = 0.0, variables=None) -> TrainState:
  """A fresh state; `variables` (e.g. from `init_from`) replace the random initialization."""
  init_rng, state_rng = jax.random.split(rng)
  if variables is None:
    variables = initial_variables(model, init_rng, input_shape)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}), rng=state_rng,
                           label_smoothing=label_smoothing)


def model_spec(config, num_classes: int, in_channels: int) -> dict:
  """The `create_model` arguments of a run, as written to WORKDIR/model.json."""
  spec = {'name': config.model, 'num_classes': num_classes, 'in_channels': in_channels}
  if config.dtype != 'float32':
    spec['dtype'] = config.dtype
  if config.bn_group_size:
    spec['bn_group_size'] = config.bn_group_size
  overrides = config.model_overrides
  spec.update(overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides or {}))
  return spec
