"""`resnet_jax.models.group_norm.GroupNorm` in NNX: same `scale`/`bias`, same function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from resnet_jax.models.group_norm import NUM_GROUPS, group_norm


class GroupNorm(nnx.Module):
  """GroupNorm over `num_features` channels in `num_groups` groups (no running statistics,
  so `model.train()`/`model.eval()` do not change it)."""

  def __init__(self, num_features: int, *, num_groups: int = NUM_GROUPS, epsilon: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               scale_init=nn.initializers.ones, rngs: nnx.Rngs):
    shape = (num_features,)
    self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros(shape, param_dtype))
    self.num_groups, self.epsilon, self.dtype = num_groups, epsilon, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon,
                      self.dtype)
