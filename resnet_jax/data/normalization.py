"""Per-channel pixel normalization, applied on the device at the start of every step.

The input pipelines deliver uint8 pixels: a quarter of float32's bytes to batch on the
host, copy to the devices and hold in prefetch buffers. The jitted train and eval steps
normalize them, where it costs next to nothing.
"""

import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError

# Per-channel mean and standard deviation of pixel values in [0, 1].
NORMALIZATION = {
    'digits': ((0.30,), (0.40,)),
    'cifar': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's
    'none': ((0.5,), (0.5,)),
}
PREPROCESSINGS = tuple(NORMALIZATION)


def checked(preprocess: str) -> str:
  """`preprocess`, or a UserError naming the choices."""
  if preprocess not in NORMALIZATION:
    raise UserError(f'preprocess={preprocess!r}; choose one of {PREPROCESSINGS}.')
  return preprocess


def normalize(pixels, preprocess: str) -> jax.Array:
  """Pixels in [0, 255] (any dtype, channels last) -> float32 (pixels / 255 - mean) / std,
  with the mean and std of `preprocess`, as torchvision's ToTensor + Normalize."""
  mean, std = NORMALIZATION[preprocess]
  return (jnp.asarray(pixels, jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
