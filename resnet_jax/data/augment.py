"""Automatic augmentation and random erasing in TensorFlow, on uint8 training crops.

config.auto_augment picks torchvision's TrivialAugmentWide ('ta_wide') or a timm
RandAugment string ('rand-m9-mstd0.5-inc1', see augment_policy); config.random_erase is
torchvision's RandomErasing probability. They run after the crop, resize and flip, in the
order of torchvision's and timm's training transforms, and every random choice is a
stateless draw from the example's seed, so a resumed run sees the same pixels.

The operations follow torchvision.transforms.v2.functional on uint8 tensors (a blend is
computed in float32, clipped and truncated to uint8; grayscale is 0.2989 R + 0.587 G +
0.114 B, floored) and PIL's geometry (an affine map sends each output pixel centre to an
input position; pixels outside the image get the fill). Both interpolate bilinearly:
TrivialAugmentWide fills with 0, as torchvision's V2 recipe runs it (on PIL images, with
interpolation=BILINEAR; the class's own default is NEAREST); RandAugment fills with the
mean pixel as timm does (timm draws bilinear or bicubic at random; TF's projective
transform has no bicubic). tests/test_augment.py compares each op with torchvision's and
timm's.
"""

import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from resnet_jax.data import augment_policy

NUM_BINS = 31  # TrivialAugmentWide's num_magnitude_bins
ERASE_SCALE = (0.02, 0.33)  # RandomErasing's defaults
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def _to_uint8(pixels):
  """Float pixels clipped to [0, 255] and truncated, as torchvision's `_blend` casts."""
  return tf.cast(tf.clip_by_value(pixels, 0.0, 255.0), tf.uint8)


def _blend(image, degenerate, factor):
  """image * factor + degenerate * (1 - factor) (torchvision's `_blend`)."""
  pixels = tf.cast(image, tf.float32)
  return _to_uint8(pixels * factor + degenerate * (1.0 - factor))


def _grayscale(image):
  """torchvision's floored luma ([H, W, 1] float32); a 1-channel image is its own."""
  pixels = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return pixels
  return tf.floor(tf.reduce_sum(pixels * [0.2989, 0.587, 0.114], -1, keepdims=True))


def brightness(image, factor):
  return _blend(image, 0.0, factor)


def color(image, factor):
  return _blend(image, _grayscale(image), factor)


def contrast(image, factor):
  return _blend(image, tf.reduce_mean(_grayscale(image)), factor)


def sharpness(image, factor):
  """Blend with a 3x3 smoothing (centre 5, others 1, over 13; borders kept), as
  torchvision's adjust_sharpness and PIL's ImageFilter.SMOOTH."""
  pixels = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, image.shape[-1], 1])
  blurred = tf.round(tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], 'VALID')[0])
  inner = pixels[1:-1, 1:-1]
  change = tf.pad((1.0 - factor) * (blurred - inner), [[1, 1], [1, 1], [0, 0]])
  return _to_uint8(pixels + change)


def posterize(image, bits):
  """Keeps the `bits` (0-8) high bits of each value."""
  mask = 256 - tf.bitwise.left_shift(tf.constant(1), 8 - tf.cast(bits, tf.int32))
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def solarize(image, threshold):
  """Inverts the values at or above `threshold`."""
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image, addition, threshold=128):
  """Adds `addition` to the values below `threshold` (timm's solarize_add)."""
  added = tf.cast(tf.minimum(tf.cast(image, tf.int32) + addition, 255), tf.uint8)
  return tf.where(image < threshold, added, image)


def invert(image):
  return 255 - image


def autocontrast(image):
  """Stretches each channel to [0, 255]; a constant channel stays."""
  pixels = tf.cast(image, tf.float32)
  low = tf.reduce_min(pixels, [0, 1])
  high = tf.reduce_max(pixels, [0, 1])
  flat = tf.equal(low, high)
  low = tf.where(flat, 0.0, low)
  inv_scale = tf.where(flat, 1.0, (high - low) / 255.0)
  return _to_uint8((pixels - low) / inv_scale)


def equalize(image):
  """PIL's ImageOps.equalize per channel: the lookup table (step // 2 + number of smaller
  pixels) // step, where step is (pixels - the count of the largest value) // 255."""
  channels = image.shape[-1]
  values = tf.reshape(tf.cast(image, tf.int32), [-1, channels]) + tf.range(channels) * 256
  histogram = tf.reshape(tf.math.bincount(tf.reshape(values, [-1]), minlength=256 * channels,
                                          maxlength=256 * channels), [channels, 256])
  largest = 255 - tf.argmax(tf.reverse(histogram, [1]) > 0, axis=1, output_type=tf.int32)
  count_of_largest = tf.gather(histogram, largest, batch_dims=1)
  step = (tf.reduce_sum(histogram, 1) - count_of_largest) // 255
  below = tf.cumsum(histogram, axis=1, exclusive=True)
  lut = tf.minimum((step[:, None] // 2 + below) // tf.maximum(step[:, None], 1), 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # step 0: unchanged
  flat = tf.gather(tf.reshape(lut, [-1]), values)
  return tf.reshape(tf.cast(flat, tf.uint8), tf.shape(image))


def affine(image, matrix, fill: Sequence[float], interpolation: str):
  """`image` resampled at matrix [a, b, c, d, e, f] x (x, y, 1) of each output pixel
  centre (PIL's Image.transform convention: pixel centres at +0.5); positions outside the
  image get `fill`, positions inside interpolate between edge-clamped pixels as PIL does.
  interpolation: 'NEAREST' or 'BILINEAR'."""
  a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
  # TF's transform indexes pixels at their centres: x_tf = x - 0.5 on both sides.
  transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5,
                        0.0, 0.0])[None]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  moved = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform,
      output_shape=[height, width], fill_value=0.0, interpolation=interpolation,
      fill_mode='NEAREST')[0]
  # Where the position falls outside the image, as PIL decides it (computed here: a
  # second transform of a mask took as long as the image's).
  x = tf.range(tf.cast(width, tf.float32))[None] + 0.5
  y = tf.range(tf.cast(height, tf.float32))[:, None] + 0.5
  x_in, y_in = a * x + b * y + c, d * x + e * y + f
  inside = ((x_in >= 0) & (x_in < tf.cast(width, tf.float32)) &
            (y_in >= 0) & (y_in < tf.cast(height, tf.float32)))
  moved = tf.where(inside[..., None], moved, tf.constant(fill, tf.float32))
  return tf.cast(tf.clip_by_value(tf.round(moved), 0.0, 255.0), tf.uint8)


def shear_x_matrix(factor):
  return tf.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0])


def shear_y_matrix(factor):
  return tf.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0])


def translate_matrix(dx, dy):
  """Output pixel (x, y) shows input (x + dx, y + dy)."""
  return tf.stack([1.0, 0.0, tf.cast(dx, tf.float32), 0.0, 1.0, tf.cast(dy, tf.float32)])


def rotate_matrix(degrees, height, width):
  """Counter-clockwise rotation by `degrees` about the image centre (PIL's Image.rotate,
  torchvision's rotate)."""
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = tf.cast(width, tf.float32) / 2.0, tf.cast(height, tf.float32) / 2.0
  return tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


# TrivialAugmentWide.


def _torch_linspace(start: float, end: float):
  """torch.linspace(start, end, NUM_BINS) as torch computes it: a float32 step, each value
  from the nearer end, rounded once to float32 (int() of a TranslateX bin truncates where
  torchvision's does: bin 15 is 15.999999)."""
  start, end = float(np.float32(start)), float(np.float32(end))
  step = float(np.float32((end - start) / (NUM_BINS - 1)))
  return [float(np.float32(start + step * i if i < NUM_BINS // 2 else
                           end - step * (NUM_BINS - 1 - i))) for i in range(NUM_BINS)]


# TrivialAugmentWide's magnitudes by bin (its _AUGMENTATION_SPACE).
_TA_SHEAR_OR_ENHANCE = _torch_linspace(0.0, 0.99)
_TA_TRANSLATE = _torch_linspace(0.0, 32.0)
_TA_ROTATE = _torch_linspace(0.0, 135.0)
_TA_SOLARIZE = _torch_linspace(1.0, 0.0)
_TA_POSTERIZE = [round(8 - i / ((NUM_BINS - 1) / 6)) for i in range(NUM_BINS)]


def _ta_wide_ops(image, bin_index, negate):
  """torchvision's TrivialAugmentWide ops, in its order, at magnitude bin `bin_index`,
  negated for the signed ops when `negate`."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]

  def signed(table):
    value = tf.gather(tf.constant(table, tf.float32), bin_index)
    return tf.where(negate, -value, value)

  def geometric(matrix):
    return lambda: affine(image, matrix, [0.0], 'BILINEAR')

  # TranslateX/Y: torchvision's affine(translate=int(m)) moves the image by +int(m).
  pixels = tf.cast(tf.cast(signed(_TA_TRANSLATE), tf.int32), tf.float32)
  enhance = 1.0 + signed(_TA_SHEAR_OR_ENHANCE)
  return [
      lambda: image,
      geometric(shear_x_matrix(signed(_TA_SHEAR_OR_ENHANCE))),
      geometric(shear_y_matrix(signed(_TA_SHEAR_OR_ENHANCE))),
      geometric(translate_matrix(-pixels, 0.0)),
      geometric(translate_matrix(0.0, -pixels)),
      geometric(rotate_matrix(signed(_TA_ROTATE), height, width)),
      lambda: brightness(image, enhance),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: posterize(image, tf.gather(_TA_POSTERIZE, bin_index)),
      lambda: solarize(image, 255.0 * tf.gather(_TA_SOLARIZE, bin_index)),
      lambda: autocontrast(image),
      lambda: equalize(image),
  ]


TA_WIDE_OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate',
               'Brightness', 'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize',
               'AutoContrast', 'Equalize')


def ta_wide_op(image, op_index, bin_index, negate):
  """TrivialAugmentWide's op `op_index` (of TA_WIDE_OPS) at bin `bin_index` (of 31)."""
  branches = _ta_wide_ops(image, bin_index, negate)
  return tf.switch_case(tf.convert_to_tensor(op_index, tf.int32), branches)


def trivial_augment_wide(image, seed):
  """One op drawn uniformly, one of 31 magnitudes, a sign (torchvision's forward)."""
  op_seed, bin_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  op_index = tf.random.stateless_uniform([], op_seed, 0, len(TA_WIDE_OPS), tf.int32)
  bin_index = tf.random.stateless_uniform([], bin_seed, 0, NUM_BINS, tf.int32)
  negate = tf.random.stateless_uniform([], sign_seed) <= 0.5
  return ta_wide_op(image, op_index, bin_index, negate)


# timm's RandAugment.

RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel')  # timm's _RAND_TRANSFORMS order


def _rand_ops(image, magnitude, negate, increasing: bool, fill):
  """timm's RandAugment ops at `magnitude` (0-10 scale), with timm's level functions
  (the 'Increasing' variants of Posterize, Solarize and the enhancements if `increasing`)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  level = magnitude / augment_policy.LEVEL_DENOM

  def signed(value):
    return tf.where(negate, -value, value)

  def geometric(matrix):
    return lambda: affine(image, matrix, fill, 'BILINEAR')

  if increasing:
    enhance = tf.maximum(0.1, 1.0 + signed(level * 0.9))
    bits = 4.0 - tf.floor(level * 4.0)
    threshold = 256.0 - tf.minimum(256.0, tf.floor(level * 256.0))
  else:
    enhance = level * 1.8 + 0.1
    bits = tf.floor(level * 4.0)
    threshold = tf.minimum(256.0, tf.floor(level * 256.0))
  shift = signed(level * 0.45)  # of the image's width or height
  return [
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      geometric(rotate_matrix(signed(level * 30.0), height, width)),
      lambda: posterize(image, tf.minimum(bits, 8.0)),
      lambda: solarize(image, threshold),
      lambda: solarize_add(image, tf.cast(tf.minimum(128.0, tf.floor(level * 110.0)), tf.int32)),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      geometric(shear_x_matrix(signed(level * 0.3))),
      geometric(shear_y_matrix(signed(level * 0.3))),
      geometric(translate_matrix(shift * tf.cast(width, tf.float32), 0.0)),
      geometric(translate_matrix(0.0, shift * tf.cast(height, tf.float32))),
  ]


def rand_augment_op(image, op_index, magnitude, negate, increasing: bool, fill):
  """RandAugment's op `op_index` (of RAND_OPS) at `magnitude`."""
  branches = _rand_ops(image, tf.cast(magnitude, tf.float32), negate, increasing, fill)
  return tf.switch_case(tf.convert_to_tensor(op_index, tf.int32), branches)


def _noisy_magnitude(policy: augment_policy.RandAugment, seed):
  """timm's AugmentOp: magnitude plus N(0, mstd) noise (uniform in [0, m] if mstd is inf),
  clipped to [0, mmax]."""
  magnitude = tf.constant(policy.magnitude, tf.float32)
  if math.isinf(policy.magnitude_std):
    magnitude = tf.random.stateless_uniform([], seed, 0.0, policy.magnitude)
  elif policy.magnitude_std > 0:
    magnitude += policy.magnitude_std * tf.random.stateless_normal([], seed)
  return tf.clip_by_value(magnitude, 0.0, float(policy.magnitude_max))


def rand_augment(image, seed, policy: augment_policy.RandAugment, fill):
  """num_layers distinct ops (timm draws without replacement), each applied with
  probability prob, at a noisy magnitude and a random sign."""
  order_seed, *layer_seeds = tf.unstack(
      tf.random.experimental.stateless_split(seed, 1 + policy.num_layers))
  order = tf.argsort(tf.random.stateless_uniform([len(RAND_OPS)], order_seed))
  for i, layer_seed in enumerate(layer_seeds[:len(RAND_OPS)]):
    apply_seed, magnitude_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 3))
    magnitude = _noisy_magnitude(policy, magnitude_seed)
    negate = tf.random.stateless_uniform([], sign_seed) > 0.5
    applied = tf.random.stateless_uniform([], apply_seed) <= policy.prob
    image = tf.cond(applied, lambda im=image, op=order[i], m=magnitude, n=negate:
                    rand_augment_op(im, op, m, n, policy.increasing, fill),
                    lambda im=image: im)
  return image


# Random erasing.


def erase_box(seed, height, width):
  """(top, left, box height, box width) of torchvision's RandomErasing.get_params: up to
  10 tries of an area of 2-33% and an aspect ratio of 0.3-3.3 (log-uniform), the first
  that fits; a 0x0 box if none does."""
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
      [ERASE_ATTEMPTS], area_seed, *ERASE_SCALE)
  ratio = tf.exp(tf.random.stateless_uniform([ERASE_ATTEMPTS], ratio_seed,
                                             *map(math.log, ERASE_RATIO)))
  heights = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  widths = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (heights < height) & (widths < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  box_height = tf.where(fits[first], heights[first], 0)
  box_width = tf.where(fits[first], widths[first], 0)
  top = tf.random.stateless_uniform([], top_seed, 0, height - box_height + 1, tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0, width - box_width + 1, tf.int32)
  return top, left, box_height, box_width


def erase(image, top, left, box_height, box_width, fill):
  """`image` with the box filled with `fill` (one value per channel)."""
  rows = tf.range(tf.shape(image)[0])
  cols = tf.range(tf.shape(image)[1])
  in_rows = (rows >= top) & (rows < top + box_height)
  in_cols = (cols >= left) & (cols < left + box_width)
  box = in_rows[:, None, None] & in_cols[None, :, None]
  return tf.where(box, tf.cast(tf.round(fill), tf.uint8), image)


def random_erase(image, seed, probability: float, fill):
  """torchvision's RandomErasing(p=probability) at its defaults, with value 0 after
  normalization, which is `fill` (the mean pixel) rounded to uint8 before it."""
  apply_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def erased():
    box = erase_box(box_seed, tf.shape(image)[0], tf.shape(image)[1])
    return erase(image, *box, fill)

  applied = tf.random.stateless_uniform([], apply_seed) < probability
  return tf.cond(applied, erased, lambda: image)


def train_augmentation(auto_augment: str, erase_probability: float, mean: Sequence[float],
                       channels: int) -> Optional[Callable]:
  """(uint8 image, [2] int64 seed) -> uint8 image applying config.auto_augment and then
  config.random_erase, or None if both are off. `mean`: the normalization's mean pixel
  in [0, 1] (one value, or one per channel), which RandAugment fills with (timm's
  img_mean) and random erasing writes."""
  policy = augment_policy.parse(auto_augment)
  if policy is None and not erase_probability:
    return None
  mean = [255.0 * m for m in (mean if len(mean) == channels else mean[:1] * channels)]
  fill = [round(m) for m in mean]  # timm's img_mean: (124, 116, 104) for ImageNet

  def augment(image, seed):
    image = tf.ensure_shape(image, [None, None, channels])  # the ops need the channels
    augment_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if policy == augment_policy.TA_WIDE:
      image = trivial_augment_wide(image, augment_seed)
    elif policy is not None:
      image = rand_augment(image, augment_seed, policy, fill)
    if erase_probability:
      image = random_erase(image, erase_seed, erase_probability, mean)
    return image

  return augment
