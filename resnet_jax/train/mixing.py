"""Mixup and CutMix on the devices, inside the jitted train step, as timm's `Mixup` does
them in its default 'batch' mode.

Each batch is mixed with itself reversed (example i with example n-1-i, timm's
`x.flip(0)`): by Mixup, lam * x + (1 - lam) * x_flipped, or by CutMix, a box of
x_flipped pasted into x; the targets are lam * y + (1 - lam) * y_flipped, with label
smoothing (timm's `mixup_target`). lam ~ Beta(alpha, alpha); with both alphas positive,
CutMix is chosen with probability `switch_prob` (timm's 0.5), else Mixup. A CutMix box
of side sqrt(1 - lam) of the image's, centred uniformly and clipped to the image, turns
lam into 1 - box area / image area (timm's `correct_lam`). The global batch is mixed
as a whole: under jit a sharded batch is reversed across the devices.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixDraw(NamedTuple):
  """The random choices of one batch: CutMix or Mixup, lam, and the box centre."""
  use_cutmix: jax.Array
  lam: jax.Array
  centre_y: jax.Array
  centre_x: jax.Array


def draw(rng: jax.Array, height: int, width: int, mixup_alpha: float, cutmix_alpha: float,
         switch_prob: float = 0.5) -> MixDraw:
  """The choices timm's `Mixup._params_per_batch` and `rand_bbox` make, from `rng`."""
  k_switch, k_lam, k_y, k_x = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.asarray(max(mixup_alpha, cutmix_alpha), jnp.float32)
  lam = jax.random.beta(k_lam, alpha, alpha)
  return MixDraw(use_cutmix, lam, jax.random.randint(k_y, (), 0, height),
                 jax.random.randint(k_x, (), 0, width))


def cutmix_box(lam, centre_y, centre_x, height: int, width: int):
  """(top, bottom, left, right) of timm's `rand_bbox` (timm 1.0): sides
  cut = int(size * sqrt(1 - lam)), from centre - cut // 2 to centre + (cut + 1) // 2,
  clipped to the image."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  return (jnp.clip(centre_y - cut_h // 2, 0, height),
          jnp.clip(centre_y + (cut_h + 1) // 2, 0, height),
          jnp.clip(centre_x - cut_w // 2, 0, width),
          jnp.clip(centre_x + (cut_w + 1) // 2, 0, width))


def apply(images: jax.Array, choice: MixDraw):
  """(mixed NHWC images, lam of the targets) for the choices of `draw`."""
  height, width = images.shape[1:3]
  flipped = images[::-1]
  lam = choice.lam.astype(images.dtype)
  mixed = images * lam + flipped * (1 - lam)
  top, bottom, left, right = cutmix_box(choice.lam, choice.centre_y, choice.centre_x,
                                        height, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cut = jnp.where(in_box[None, :, :, None], flipped, images)
  cut_lam = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  return (jnp.where(choice.use_cutmix, cut, mixed),
          jnp.where(choice.use_cutmix, cut_lam, choice.lam).astype(jnp.float32))


def mix_batch(rng: jax.Array, images: jax.Array, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5):
  """(mixed images, lam): `draw` then `apply`."""
  height, width = images.shape[1:3]
  return apply(images, draw(rng, height, width, mixup_alpha, cutmix_alpha, switch_prob))


def targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0, lam=None):
  """timm's `mixup_target`: smoothed one-hot targets (on 1 - s + s/K, off s/K), mixed
  as lam * y + (1 - lam) * y_flipped when `lam` is given."""
  off = smoothing / num_classes
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  y = jnp.where(hot > 0, 1.0 - smoothing + off, off)
  return y if lam is None else y * lam + y[::-1] * (1.0 - lam)
