"""Per-example transforms in TensorFlow: each recipe's training augmentation and eval resize.

Images stay uint8 (a resize rounds back to uint8, as torchvision's PIL transforms do); the
train and eval steps normalize them on the device (`normalization.py`).

Every random choice is a stateless op seeded by (epoch seed, index of the example in the
epoch), so an example's augmentation depends on nothing but the seed and its position:
a resumed run sees exactly the pixels an uninterrupted run would have seen.
"""

import numpy as np
import tensorflow as tf
from PIL import Image

from resnet_jax.data.sizes import EVAL_CROP_FRACTION


def _resize(image, shape, antialias=True):
  """Bilinear resize to `shape`, rounded back to uint8; antialiased as PIL's unless told
  otherwise."""
  resized = tf.image.resize(image, shape, method='bilinear', antialias=antialias)
  return tf.saturate_cast(tf.round(resized), tf.uint8)


def _pad_and_crop(image, pad, seed):
  """The CIFAR augmentation: zero-pad `pad` pixels, crop back to the original size."""
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed=seed)


def _inception_crop_window(image_shape, seed):
  """(begin, size) of a random 8%-100% area, 3/4-4/3 aspect crop (Szegedy et al. 2015)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
      seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def _inception_crop(image, seed):
  """The pixels of `image` in its random inception crop window (not resized)."""
  begin, crop_size = _inception_crop_window(tf.shape(image), seed)
  return tf.slice(image, begin, crop_size)


def decode(encoded, channels: int):
  """uint8 (H, W, channels) pixels of an encoded JPEG, PNG, BMP or GIF (first frame)."""
  return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def _decode_and_inception_crop(encoded, seed, channels):
  """`_inception_crop` of the decoded image, decoding only the crop window of a JPEG.

  The window depends only on the image size and the seed, so the pixels are those of a
  full decode followed by the crop, except that libjpeg upsamples a color JPEG's chroma
  differently along the window's edges; a JPEG skips decoding the rest of the image.
  """

  def crop_jpeg():
    begin, crop_size = _inception_crop_window(tf.image.extract_jpeg_shape(encoded), seed)
    window = tf.concat([begin[:2], crop_size[:2]], 0)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

  return tf.cond(tf.io.is_jpeg(encoded), crop_jpeg,
                 lambda: _inception_crop(decode(encoded, channels), seed))


def _decode_center_crop_and_resize(encoded, size, channels, crop_fraction):
  """The central crop that a resize to size / crop_fraction keeps, resized to `size`:
  decodes only that window of a JPEG and resizes only it (as Flax's ImageNet example does;
  0.6x the CPU of resizing the whole image, benchmarks/RESULTS.md)."""

  def window(shape):
    side = tf.cast(tf.round(tf.cast(tf.reduce_min(shape[:2]), tf.float32) *
                            crop_fraction), tf.int32)
    return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])

  def crop_jpeg():
    return tf.image.decode_and_crop_jpeg(encoded, window(tf.image.extract_jpeg_shape(encoded)),
                                         channels=channels)

  def crop_decoded():
    image = decode(encoded, channels)
    w = window(tf.shape(image))
    return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], -1])

  image = tf.cond(tf.io.is_jpeg(encoded), crop_jpeg, crop_decoded)
  return _pil_resize(image, size, channels)


def _pil_resize(image, size: int, channels: int):
  """PIL's antialiased bilinear resize to (size, size), as torchvision's transforms resize:
  its uint8 fixed-point kernel (which releases the GIL) took 0.7x the CPU of TensorFlow's
  float one on an eval crop (benchmarks/RESULTS.md)."""

  def resize(pixels):
    plane = pixels[..., 0] if channels == 1 else pixels
    resized = Image.fromarray(plane).resize((size, size), Image.BILINEAR)
    return np.asarray(resized).reshape(size, size, channels)

  resized = tf.numpy_function(resize, [image], tf.uint8, stateful=False)
  return tf.ensure_shape(resized, (size, size, channels))


def _resize_and_center_crop(image, size, crop_fraction):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / crop_fraction) / tf.reduce_min(shape)
  resized_shape = tf.cast(tf.round(shape * scale), tf.int32)
  image = _resize(image, resized_shape)
  top = (resized_shape[0] - size) // 2
  left = (resized_shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _maybe_resize(image, size):
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return _resize(image, (size, size))


def train_transform(example, seed, recipe: str, image_size: int, channels: int = 3):
  """Augments one {'image', 'label'} example by `recipe` (config.preprocess: 'digits',
  'cifar', 'imagenet' or 'none') to uint8 pixels; seed is a [2] int64 tensor.

  'image' is uint8 pixels or, for the 'imagenet' augmentation, may be the encoded file
  (a string tensor decoded to `channels` channels), of which only the crop is decoded.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = example['image']
  if recipe == 'digits':  # shift by up to one pixel; never flip a digit
    image = _maybe_resize(_pad_and_crop(image, 1, crop_seed), image_size)
  elif recipe == 'cifar':
    image = _maybe_resize(_pad_and_crop(image, 4, crop_seed), image_size)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  elif recipe == 'imagenet':
    if image.dtype == tf.string:
      image = _decode_and_inception_crop(image, crop_seed, channels)
    else:
      image = _inception_crop(image, crop_seed)
    # Plain bilinear, as Flax's and TensorFlow's reference ImageNet pipelines resize the
    # random crop: TF's antialiased kernel took 60% of the transform (benchmarks/RESULTS.md).
    image = _resize(image, (image_size, image_size), antialias=False)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  else:
    image = _maybe_resize(image, image_size)
  return {'image': image, 'label': tf.cast(example['label'], tf.int32)}


def eval_transform(example, recipe: str, image_size: int, channels: int = 3,
                   crop_fraction: float = EVAL_CROP_FRACTION):
  """Deterministic eval transform to uint8 pixels; adds mask=1 (padding gets mask=0).

  'imagenet' resizes the shorter side to image_size / crop_fraction and crops the center
  (`sizes.ImageSizes.eval_crop_fraction`: 224/232 for torchvision's V2 recipe).
  For 'imagenet', 'image' may be the encoded file (decoded to `channels` channels): then
  only the central crop is decoded and resized, instead of the whole image resized and
  then cropped (a crop of the same window; the pixels differ from those by resampling).
  """
  image = example['image']
  if recipe == 'imagenet' and image.dtype == tf.string:
    image = _decode_center_crop_and_resize(image, image_size, channels, crop_fraction)
  elif recipe == 'imagenet':
    image = _resize_and_center_crop(image, image_size, crop_fraction)
  else:
    image = _maybe_resize(image, image_size)
  return {'image': image, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1.0)}
