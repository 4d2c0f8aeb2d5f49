"""tf.data input pipelines whose position is just the number of batches consumed.

Epoch e visits this process's shard in an order that is a pure function of (seed, e), and
example i of the epoch is augmented with the stateless seed (seed(e), i). So resuming at
batch b only needs b: the stream skips b batches of indices or raw records (before any
decoding or augmentation, so skipping is cheap) and then sees exactly the batches an
uninterrupted run would have seen.

Small datasets with fixed-size images (digits, CIFAR, MNIST) are held in memory as one
tensor on every process, and epoch e is one global stateless permutation of the whole
split: global batch b of the epoch is positions [b*B, (b+1)*B) of it, and process p of P
takes the p-th slice of each global batch, augmented with the seed (seed(e), position).
So which examples a step trains on, and how they are augmented, do not depend on the
number of processes: a run that resumes on another process count continues the epoch
where it stopped, every example of it used exactly once. Larger datasets (ImageNet, image
folders) stream from files: each process reads its shard of the files (index::count) in a
seeded order through a seeded shuffle buffer; a change of process count there changes the
shards, so the epoch it happens in is not exactly-once (the next epochs are). Consecutive
streamed epochs are one tf.data dataset (up to 1024 of them, EXAMPLES_PER_DATASET examples
at least), so that an epoch of a few batches does not wait for a new pipeline to start.

Repeated augmentation (config.repeated_augmentation=N, torchvision's RASampler) groups the
epochs into windows of N: window w is one pass over the data in the order of epoch w
without it, and every global batch holds B/N of its examples, N times each, copy c of
example j at slot c*B/N + j (B/N rounded up: when N does not divide B, the last
copies of a few examples per batch are cut off, as RASampler's straddle batches); so each
example is used N times per window, differently augmented (the augmentation seed is still the epoch and the position in it), by other
processes when N <= the process count, like RASampler's replicas. In memory that is
again a pure function of (seed, step) and independent of the process count; streamed, a
host batch of b holds b/N examples of the process's shard N times (copies b/N slots
apart, on different devices of the process).
"""

import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from resnet_jax.data import augment, normalization, preprocessing
from resnet_jax.data.sizes import image_sizes
from resnet_jax.data.sources import create_source
from resnet_jax.errors import UserError

# TensorFlow runs on the host only: keep it from reserving accelerator memory.
tf.config.set_visible_devices([], 'GPU')

IN_MEMORY_LIMIT_BYTES = 2 << 30
# A streamed dataset is built for at least this many examples, of up to this many epochs
# (each epoch's file order is held in a table; building 1024 orders takes about 0.1 s).
EXAMPLES_PER_DATASET = 1 << 18
MAX_EPOCHS_PER_DATASET = 1024


def epoch_seed(seed: int, epoch):
  """The augmentation seed of an epoch (works on ints and int64 tensors)."""
  return seed * 1_000_003 + epoch


def file_order_seed(seed: int, epoch: int) -> np.int64:
  """The seed of epoch `epoch`'s file order and shuffle buffer (streamed datasets)."""
  return np.int64(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def host_batch_size(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise UserError(f'batch_size={batch_size} is not divisible by the number of processes '
                     f'({jax.process_count()}).')
  return batch_size // jax.process_count()


def copy_group(batch_size: int, copies: int) -> int:
  """How many examples a batch of `batch_size` holds `copies` times (the last copies of a
  few are cut off when `copies` does not divide the batch, as RASampler's straddle)."""
  return -(-batch_size // copies)


def repeated_positions(positions, epoch_in_window, steps_per_epoch: int, batch_size: int,
                       copies: int):
  """The positions in the window's order of the examples at `positions` of an epoch (global
  positions, int64) under repeated augmentation: with G = copy_group(B, N), global batch g
  of the window holds its examples g*G .. (g+1)*G - 1, copy c of the j-th at slot c*G + j.
  With one copy, `positions` themselves."""
  group = copy_group(batch_size, copies)
  batch_in_window = epoch_in_window * steps_per_epoch + positions // batch_size
  return batch_in_window * group + positions % batch_size % group


class Pipeline:
  """Train and eval streams of one dataset for this process (host-local numpy batches of
  uint8 pixels, for the steps to normalize with the `normalization` statistics)."""

  def __init__(self, config):
    self.config = config
    self.source = create_source(config.dataset, config.data_dir or None)
    self.num_classes = self.source.num_classes
    self.channels = self.source.channels
    self.recipe = normalization.checked_recipe(config.preprocess)
    self.normalization = normalization.RECIPE_STATISTICS[self.recipe]
    self.batch = host_batch_size(config.batch_size)
    self.num_examples = self.source.num_examples(config.train_split)
    shape = self.source.image_shape
    self.in_memory = None not in shape and (
        self.num_examples * int(np.prod(shape)) <= IN_MEMORY_LIMIT_BYTES)
    # In memory, every process holds the whole split; streamed, its shard of the files.
    self.shard_size = (self.num_examples if self.in_memory else
                       self.num_examples // jax.process_count())
    per_step = config.batch_size if self.in_memory else self.batch
    if self.shard_size < per_step:
      raise UserError(f'batch_size={config.batch_size} is larger than the training split '
                       f'{config.train_split!r} ({self.shard_size} examples per process).')
    self.steps_per_epoch = self.shard_size // per_step
    self.copies = config.repeated_augmentation
    self.sizes = image_sizes(config)
    # Streamed, one tf.data dataset holds this many epoch windows (of `copies` epochs; their
    # file orders are computed when it is built): a whole window when large, many when small.
    self.epochs_per_dataset = int(np.clip(
        EXAMPLES_PER_DATASET // (self.copies * self.steps_per_epoch * self.batch), 1,
        MAX_EPOCHS_PER_DATASET))

  def split_size(self, split: str) -> int:
    """The number of examples of `split` (a UserError if it names none)."""
    return self.source.num_examples(split)

  def check_files(self, splits):
    """Refuses unreadable or oversized image files of `splits` before any step reads them
    (image folders; TFDS checked its records when preparing them)."""
    self.source.check_files(splits)

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Endless stream of training batches, starting after `start_step` batches."""
    split = self.config.train_split
    if self.in_memory:
      yield from self.readable(split, lambda: self._in_memory_stream(start_step))
      return
    window, skip = divmod(start_step, self.copies * self.steps_per_epoch)
    while True:
      yield from self.readable(split, lambda: self._streamed_epochs(window, skip))
      window, skip = window + self.epochs_per_dataset, 0

  def readable(self, split: str, make_dataset):
    """The dataset's numpy batches; a file that fails to decode becomes a UserError naming
    the files to fix instead of a TensorFlow stack trace."""
    try:
      yield from make_dataset().as_numpy_iterator()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.DataLossError) as e:
      raise UserError(self.source.explain_read_error(split, e)) from None

  def _augment(self, ds):
    """(epoch, index in epoch, example) -> augmented batches: the recipe's crop and flip,
    then config.auto_augment and config.random_erase (each seeded by the example's seed)."""
    recipe, size, seed = self.recipe, self.sizes.train, self.config.seed
    extra = augment.train_augmentation(self.config.auto_augment, self.config.random_erase,
                                       normalization.STATISTICS[self.normalization][0],
                                       self.channels)

    def transform(epoch, index, example):
      example_seed = tf.stack([epoch_seed(seed, epoch), index])
      example = preprocessing.train_transform(example, example_seed, recipe, size,
                                              self.channels)
      if extra:
        example['image'] = extra(example['image'],
                                 tf.random.experimental.stateless_fold_in(example_seed, 1))
      return example

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(self.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def _in_memory_stream(self, start_step: int) -> tf.data.Dataset:
    ds = self.source.read(self.config.train_split, 0, 1, drop_remainder=True)
    data = next(ds.batch(self.shard_size).as_numpy_iterator())
    images, labels = tf.constant(data['image']), tf.constant(data['label'])
    steps, seed = self.steps_per_epoch, self.config.seed
    # This process's slice of every global batch, as positions in the epoch.
    first = jax.process_index() * self.batch
    positions = (np.arange(steps * self.config.batch_size).reshape(steps, -1)
                 [:, first:first + self.batch].reshape(-1))
    positions = tf.constant(positions, tf.int64)

    def epoch_order(epoch):
      window = epoch // self.copies
      order = tf.random.experimental.stateless_shuffle(
          tf.range(self.shard_size, dtype=tf.int64), tf.stack([tf.constant(seed, tf.int64),
                                                               window]))
      # Past the end (copies not dividing the batch) wraps to the window's first examples.
      examples = tf.gather(order, repeated_positions(positions, epoch % self.copies, steps,
                                                     self.config.batch_size, self.copies)
                           % self.shard_size)
      return tf.data.Dataset.from_tensor_slices(
          (tf.fill(tf.shape(positions), epoch), positions, examples))

    epoch, skip = divmod(start_step, self.steps_per_epoch)
    ds = tf.data.Dataset.range(epoch, 2**62).flat_map(epoch_order).skip(skip * self.batch)
    ds = ds.map(lambda e, i, k: (e, i, {'image': tf.gather(images, k),
                                        'label': tf.gather(labels, k)}))
    return self._augment(ds)

  def _streamed_epochs(self, first: int, skip_batches: int) -> tf.data.Dataset:
    """Epoch windows first .. first+epochs_per_dataset-1 as one dataset, after
    `skip_batches`: a small epoch does not start a new pipeline (its decoding threads and
    prefetch buffers refilled, its functions traced again), and the next epoch's files are
    read while the last batches of this one are augmented. Window w's file order and
    shuffle buffer are seeded by file_order_seed(seed, w), computed here (a window is an
    epoch without repeated augmentation)."""
    windows = range(first, first + self.epochs_per_dataset)
    seeds = [file_order_seed(self.config.seed, window) for window in windows]
    # The inception crop decodes only its window of a JPEG, so it gets the encoded files
    # (which also keeps the shuffle buffer small).
    read = self.source.read_epochs(self.config.train_split, jax.process_index(),
                                   jax.process_count(), drop_remainder=True, seeds=seeds,
                                   encoded=self.recipe == 'imagenet')
    seeds = tf.constant(seeds, tf.int64)

    epoch_size, copies, batch = self.steps_per_epoch * self.batch, self.copies, self.batch
    group = copy_group(batch, copies)
    # A window reads its epoch's examples, and the few more that groups of `group` need
    # when `copies` does not divide the batch (from the start of the shard again).
    extra = copies * self.steps_per_epoch * group - epoch_size

    def epoch_examples(i):
      ds = read(i).take(epoch_size)
      if copies > 1 and extra:
        ds = ds.concatenate(read(i).take(extra))
      ds = ds.shuffle(self.config.shuffle_buffer, seed=tf.gather(seeds, i),
                      reshuffle_each_iteration=False)
      if copies > 1:  # each group of examples `copies` times in a batch, group apart
        ds = ds.batch(group, drop_remainder=True).map(lambda examples: tf.nest.map_structure(
            lambda x: tf.concat([x] * copies, 0)[:batch], examples))
        ds = ds.unbatch()
      return ds.enumerate().map(lambda index, example: (
          (first + i) * copies + index // epoch_size, index % epoch_size, example))

    # Plain tracing: autograph would try to convert the source's reading code (TFDS's).
    ds = tf.data.Dataset.range(self.epochs_per_dataset).flat_map(
        tf.autograph.experimental.do_not_convert(epoch_examples))
    return self._augment(ds.skip(skip_batches * self.batch))

  def eval_batches(self, split: str, batch_size: int):
    """(num_batches, iterable) over all of `split`, each batch with a 0/1 'mask'.

    Every process yields the same number of batches; padding examples have mask 0, so no
    example is dropped or counted twice.
    """
    batch = host_batch_size(batch_size)
    total = self.source.num_examples(split)
    num_batches = math.ceil(math.ceil(total / jax.process_count()) / batch)
    recipe, size, channels = self.recipe, self.sizes.eval, self.channels
    ds = self.source.read(split, jax.process_index(), jax.process_count(), drop_remainder=False,
                          encoded=recipe == 'imagenet')  # decodes the central crop only
    ds = ds.map(lambda ex: preprocessing.eval_transform(ex, recipe, size, channels,
                                                        self.sizes.eval_crop_fraction),
                num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros((size, size, self.channels), tf.uint8),
        'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0)}).repeat()
    ds = ds.concatenate(padding).take(num_batches * batch)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return num_batches, lambda: self.readable(split, lambda: ds)
