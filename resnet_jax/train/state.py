"""The train state: parameters, BatchNorm statistics, optimizer state and step."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from resnet_jax.train import ema as ema_lib

CHECKPOINT_KEYS = ('params', 'batch_stats', 'opt_state', 'step')
EMA_KEY = 'ema'  # saved too when the run keeps a weight EMA


class TrainState(train_state.TrainState):
  """Flax's TrainState plus running BN statistics, the loss's label smoothing and, when
  the run keeps one, the weight EMA ({'params', 'batch_stats', 'count'},
  `resnet_jax.train.ema`)."""
  batch_stats: Any = None
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)
  ema: Any = None

  def _keys(self):
    return CHECKPOINT_KEYS + ((EMA_KEY,) if self.ema is not None else ())

  def to_checkpoint(self) -> dict:
    """The pytree saved as the checkpoint's 'state' item."""
    return {key: getattr(self, key) for key in self._keys()}

  def from_checkpoint(self, tree: dict) -> 'TrainState':
    return self.replace(**{key: tree[key] for key in self._keys()})

  def ema_state(self) -> 'TrainState':
    """This state with the EMA's parameters and statistics in place of the model's."""
    return self.replace(params=self.ema['params'], batch_stats=self.ema['batch_stats'])


def initial_variables(model: nn.Module, rng: jax.Array, input_shape) -> dict:
  """{'params', 'batch_stats'} of `model` for NHWC inputs of `input_shape` (batch first)."""
  return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape, label_smoothing: float = 0.0,
                       ema: bool = False) -> TrainState:
  """A fresh state, initialized from the first half of `rng` (as it always has been);
  with `ema`, its EMA starts as a copy of the model."""
  variables = initial_variables(model, jax.random.split(rng)[0], input_shape)
  batch_stats = variables.get('batch_stats', {})
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=batch_stats, label_smoothing=label_smoothing,
                           ema=ema_lib.init(variables['params'], batch_stats) if ema else None)
