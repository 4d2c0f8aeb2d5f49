"""The eval stream of a dataset transformed by a checkpoint's `InputSpec`.

A converted checkpoint or pretrained weights were made for their own preprocessing (timm's
crop_pct and bicubic resize, torchvision V2's resize to 232, mean = std = 0.5, ...), not for
a training recipe of ours. So `evaluate` reads such a checkpoint's split through here: each
file is decoded by PIL and transformed by `input_spec.apply`, the very function `predict`
applies, so that evaluation sees the pixels `predict` and the published accuracy saw. The
batches are float32 and already normalized (the eval step gets normalization=None).
"""

import io
import math

import jax
import numpy as np
import tensorflow as tf

from resnet_jax import input_spec
from resnet_jax.data.pipeline import Pipeline, host_batch_size


class SpecEvalPipeline:
  """`eval_batches` of `pipeline`'s dataset as `spec` transforms them for a model of
  `channels` input channels; `normalization` is None (the batches are normalized)."""

  normalization = None

  def __init__(self, pipeline: Pipeline, spec: input_spec.InputSpec, channels: int):
    spec.check_channels(channels)
    self.pipeline, self.spec, self.channels = pipeline, spec, channels

  def _transform(self):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    spec, mode = self.spec, input_spec.MODES[self.channels]

    def transform(encoded):
      with Image.open(io.BytesIO(encoded)) as image:
        image.load()
        return input_spec.apply(spec, mode, image).astype(np.float32)

    return transform

  def eval_batches(self, split: str, batch_size: int):
    """(num_batches, iterable) over all of `split`, each batch with a 0/1 'mask', as
    `Pipeline.eval_batches` (the same padding), of spec-transformed float32 images."""
    source, batch = self.pipeline.source, host_batch_size(batch_size)
    num_batches = math.ceil(math.ceil(source.num_examples(split) / jax.process_count()) /
                            batch)
    shape = (self.spec.crop_size, self.spec.crop_size, self.channels)
    transform = self._transform()

    def example(ex):
      image = tf.numpy_function(transform, [ex['image']], tf.float32, stateful=False)
      return {'image': tf.ensure_shape(image, shape),
              'label': tf.cast(ex['label'], tf.int32), 'mask': tf.constant(1.0)}

    ds = source.read(split, jax.process_index(), jax.process_count(), drop_remainder=False,
                     encoded=True).map(example, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros(shape, tf.float32), 'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0.0)}).repeat()
    ds = ds.concatenate(padding).take(num_batches * batch)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return num_batches, lambda: self.pipeline.readable(split, lambda: ds)
