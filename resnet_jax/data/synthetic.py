"""Random images and labels of any size, for benchmarking without a dataset (no TF)."""

import math

import jax
import numpy as np

from resnet_jax.data import normalization
from resnet_jax.data.sizes import image_sizes


class SyntheticPipeline:
  """The same fixed batch of random pixels over and over, so input never limits the speed."""

  def __init__(self, config):
    self.config = config
    self.num_classes = config.num_classes
    self.channels = config.in_channels
    # Of the preprocessing recipe only the normalization applies (in the steps).
    self.recipe = normalization.checked_recipe(config.preprocess)
    self.normalization = normalization.RECIPE_STATISTICS[self.recipe]
    self.steps_per_epoch = max(1, config.synthetic_train_size
                               // config.batch_size)

  def _batch(self, batch_size, seed, size):
    rng = np.random.default_rng(seed)
    host = batch_size // jax.process_count()
    return {
        'image': rng.integers(0, 256, (host, size, size, self.channels), np.uint8),
        'label': rng.integers(0, self.num_classes, host).astype(np.int32),
    }

  def split_size(self, split: str) -> int:
    """synthetic_train_size for the train split, else synthetic_eval_size."""
    return (self.config.synthetic_train_size if split == self.config.train_split
            else self.config.synthetic_eval_size)

  def check_files(self, splits):
    del splits  # no files

  def train_batches(self, start_step: int = 0):
    del start_step  # every batch is the same
    batch = self._batch(self.config.batch_size, self.config.seed,
                        image_sizes(self.config).train)
    while True:
      yield batch

  def eval_batches(self, split: str, batch_size: int):
    del split
    total = self.config.synthetic_eval_size
    num_batches = math.ceil(total / batch_size)
    batch = dict(self._batch(batch_size, self.config.seed + 1, image_sizes(self.config).eval),
                 mask=np.ones(batch_size // jax.process_count(), np.float32))
    return num_batches, lambda: iter([batch] * num_batches)
