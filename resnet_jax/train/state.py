"""The train state: parameters, BatchNorm statistics, optimizer state and step."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

CHECKPOINT_KEYS = ('params', 'batch_stats', 'opt_state', 'step')


class TrainState(train_state.TrainState):
  """Flax's TrainState plus running BN statistics and the loss's label smoothing."""
  batch_stats: Any = None
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
                       input_shape, label_smoothing: float = 0.0) -> TrainState:
  """A fresh state, initialized from the first half of `rng` (as it always has been)."""
  variables = initial_variables(model, jax.random.split(rng)[0], input_shape)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}),
                           label_smoothing=label_smoothing)
