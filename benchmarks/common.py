"""What the benchmarks share: the project's jitted train step on an abstract state."""

import jax
import jax.numpy as jnp
import ml_collections

import resnet_jax
from resnet_jax.train import loop, optim, state as train_state


def train_state_factory(name, batch, size, **overrides):
  """(model, a function making the project's SGD train state) for `name`."""
  model = resnet_jax.create_model(name, **overrides)
  config = ml_collections.ConfigDict(dict(weight_decay=1e-4, momentum=0.9, nesterov=False))
  tx = optim.create_optimizer(config, lambda step: 0.1)
  return model, lambda: train_state.create_train_state(
      model, tx, jax.random.PRNGKey(0), (batch, size, size, 3))


def abstract_train_state(name, batch, size, **overrides):
  """(model, state shapes), without allocating the state."""
  model, make_state = train_state_factory(name, batch, size, **overrides)
  return model, jax.eval_shape(make_state)


def lowered_train_step(name, batch, size, **overrides):
  """The train step train.py compiles, lowered for `name` at (batch, size, size, 3)."""
  model, state = abstract_train_state(name, batch, size, **overrides)
  train_fn, _ = loop.compile_steps(loop.create_mesh(), preprocess(name))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return train_fn.lower(state, {'image': images, 'label': labels})


def image_size(name):
  return 32 if name.startswith('cifar') else 224


def preprocess(name):
  """The preprocessing (and so the normalization in the step) that `name` trains with."""
  return 'cifar' if name.startswith('cifar') else 'imagenet'


def versions():
  import torch  # the benchmarks compare with PyTorch; only they import it here
  return (f'jax {jax.__version__}, jaxlib {jax.lib.__version__}, '
          f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), '
          f'torch {torch.__version__}')
