"""Per-channel pixel normalization, applied on the device at the start of every step.

The input pipelines deliver uint8 pixels: a quarter of float32's bytes to batch on the
host, copy to the devices and hold in prefetch buffers. The jitted train and eval steps
normalize them, where it costs next to nothing.
"""

import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError

# Per-channel mean and standard deviation of pixel values in [0, 1], by name.
STATISTICS = {
    'digits': ((0.30,), (0.40,)),
    'cifar': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's
    'centered': ((0.5,), (0.5,)),  # pixels to [-1, 1]
}
# The statistics each preprocessing recipe (config.preprocess) normalizes with.
RECIPE_STATISTICS = {'digits': 'digits', 'cifar': 'cifar', 'imagenet': 'imagenet',
                     'none': 'centered'}
RECIPES = tuple(RECIPE_STATISTICS)


def checked_recipe(recipe: str) -> str:
  """`recipe`, or a UserError naming the choices."""
  if recipe not in RECIPE_STATISTICS:
    raise UserError(f'preprocess={recipe!r}; choose one of {RECIPES}.')
  return recipe


def normalize(pixels, statistics: str) -> jax.Array:
  """Pixels in [0, 255] (any dtype, channels last) -> float32 (pixels / 255 - mean) / std,
  with the mean and std named `statistics`, as torchvision's ToTensor + Normalize."""
  return normalize_with(pixels, *STATISTICS[statistics])


def normalize_with(pixels, mean, std) -> jax.Array:
  """Pixels in [0, 255] -> float32 (pixels / 255 - mean) / std, per channel."""
  return (jnp.asarray(pixels, jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
