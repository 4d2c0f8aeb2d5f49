"""NVIDIA DALI input pipeline for ImageNet-style image folders (config.input_pipeline='dali').

DALI decodes on the GPU (nvJPEG, its 'mixed' device) when JAX runs on NVIDIA GPUs and on
the CPU otherwise; the batches come back as host-local numpy uint8 batches with the same
interface as `pipeline.Pipeline`, for the steps to shard and normalize as always.

Resume is exact, as on the tf.data path: DALI's own readers and random operators keep
state that a restart cannot skip to, so this module chooses everything in Python and feeds
it to DALI. Epoch e reads this process's shard in the order of `FolderSource.shard_files`
with the seed of (seed, e) (as tf.data's pipeline, without its shuffle buffer), and
example i of the epoch gets its crop window and flip from a numpy generator seeded by
(seed, e, i). A run resumed at step b therefore sees the batches, crops and flips of an
uninterrupted run, and the same pixels on the same kind of decoder; the GPU and CPU
decoders (nvJPEG, libjpeg-turbo) round differently, and this path's pixels differ from
tf.data's (other crop sampler, DALI's resize).

DALI is imported here only, lazily: installing the `dali` extra on a host without CUDA
leaves the rest of the package alone.
"""

import io
import math
import os
from typing import Iterator

import jax
import numpy as np
from PIL import Image

from resnet_jax.data import normalization
from resnet_jax.data.pipeline import epoch_seed, host_batch_size
from resnet_jax.data.sizes import image_sizes
from resnet_jax.data.sources import FOLDER_PREFIX, FolderSource, create_source
from resnet_jax.errors import UserError

AREA_RANGE, ASPECT_RANGE, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10


def _import_dali():
  try:
    from nvidia import dali  # pylint: disable=g-import-not-at-top
    from nvidia.dali import fn, types  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"input_pipeline='dali' needs NVIDIA DALI ({e}): pip install "
                    f"'resnet_jax[dali]', or use --config.input_pipeline=tf.data.") from None
  return dali, fn, types


def decoder_device() -> str:
  """'mixed' (nvJPEG on the GPU) when JAX runs on NVIDIA GPUs, else 'cpu'."""
  return 'mixed' if jax.default_backend() == 'gpu' else 'cpu'


def inception_crop(height: int, width: int, rng: np.random.Generator):
  """(x, y, w, h) of torchvision's RandomResizedCrop window: 8%-100% of the area, aspect
  3/4-4/3, ten attempts, else the central crop of clamped aspect."""
  area = height * width
  log_ratio = np.log(ASPECT_RANGE)
  for _ in range(ATTEMPTS):
    target = area * rng.uniform(*AREA_RANGE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  ratio = width / height
  if ratio < ASPECT_RANGE[0]:
    w, h = width, round(width / ASPECT_RANGE[0])
  elif ratio > ASPECT_RANGE[1]:
    h, w = height, round(height * ASPECT_RANGE[1])
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _augmentation(encoded: bytes, seed: int, epoch: int, index: int):
  """(crop anchor, crop shape, flip) of example `index` of `epoch`: a pure function of
  them and the image size (read from the file's header)."""
  width, height = Image.open(io.BytesIO(encoded)).size
  rng = np.random.default_rng([epoch_seed(seed, epoch), index])
  x, y, w, h = inception_crop(height, width, rng)
  flip = np.int32(rng.integers(0, 2))
  return np.array([x, y], np.float32), np.array([w, h], np.float32), flip


class DaliPipeline:
  """Train and eval streams of an image folder, decoded and augmented by DALI (the
  'imagenet' recipe), as host-local numpy uint8 batches."""

  def __init__(self, config):
    if not config.dataset.startswith(FOLDER_PREFIX) or config.preprocess != 'imagenet':
      raise UserError(f"input_pipeline='dali' reads image folders with the imagenet recipe "
                      f"(--config.dataset='folder:/path' --config.preprocess=imagenet), not "
                      f"dataset={config.dataset!r}, preprocess={config.preprocess!r}; use "
                      f"--config.input_pipeline=tf.data for those.")
    if config.repeated_augmentation > 1:
      raise UserError(f'input_pipeline=\'dali\' has no repeated augmentation '
                      f'(repeated_augmentation={config.repeated_augmentation}): use '
                      f'--config.input_pipeline=tf.data, or repeated_augmentation=1.')
    self.dali, self.fn, self.types = _import_dali()
    self.config = config
    self.source: FolderSource = create_source(config.dataset)
    self.num_classes, self.channels = self.source.num_classes, self.source.channels
    self.normalization = normalization.RECIPE_STATISTICS['imagenet']
    self.batch = host_batch_size(config.batch_size)
    self.shard_size = self.source.num_examples(config.train_split) // jax.process_count()
    if self.shard_size < self.batch:
      raise UserError(f'batch_size={config.batch_size} is larger than the training split '
                      f'{config.train_split!r} ({self.shard_size} examples per process).')
    self.steps_per_epoch = self.shard_size // self.batch
    self.device = decoder_device()

  def split_size(self, split: str) -> int:
    return self.source.num_examples(split)

  def check_files(self, splits):
    self.source.check_files(splits)

  def _build(self, batch_size, source, graph):
    """A DALI pipeline over `source` (a Python iterator of batches) through `graph`."""
    device_id = jax.local_devices()[0].local_hardware_id if self.device == 'mixed' else None
    pipe = self.dali.Pipeline(batch_size=batch_size, num_threads=_threads(),
                              device_id=device_id, seed=self.config.seed,
                              exec_dynamic=True)
    with pipe:
      outputs = graph(source)
      pipe.set_outputs(*outputs)
    pipe.build()
    return pipe

  def _train_graph(self, source):
    fn, types = self.fn, self.types
    encoded, labels, anchors, shapes, flips = fn.external_source(
        source=source, num_outputs=5, batch=True, dtype=[types.UINT8, types.INT32,
                                                          types.FLOAT, types.FLOAT,
                                                          types.INT32])
    images = fn.decoders.image_slice(encoded, anchors, shapes, device=self.device,
                                     output_type=types.RGB, normalized_anchor=False,
                                     normalized_shape=False)
    size = image_sizes(self.config).train
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                       antialias=False)
    return fn.flip(images, horizontal=flips), labels

  def _epoch_batches(self, epoch: int, skip_batches: int):
    """This epoch's (encoded, labels, anchors, shapes, flips) batches after `skip_batches`."""
    shuffle_seed = int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0]
                       >> 1)
    paths, labels = self.source.shard_files(
        self.config.train_split, jax.process_index(), jax.process_count(), drop_remainder=True,
        shuffle_seed=shuffle_seed)
    for step in range(skip_batches, self.steps_per_epoch):
      indices = range(step * self.batch, (step + 1) * self.batch)
      encoded = [np.fromfile(paths[i], np.uint8) for i in indices]
      augment = [_augmentation(e.tobytes(), self.config.seed, epoch, i)
                 for e, i in zip(encoded, indices)]
      anchors, shapes, flips = (list(column) for column in zip(*augment))
      yield encoded, [np.int32(labels[i]) for i in indices], anchors, shapes, flips

  def _train_source(self, start_step: int):
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      yield from self._epoch_batches(epoch, skip)
      epoch, skip = epoch + 1, 0

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Endless stream of training batches, starting after `start_step` batches."""
    pipe = self._build(self.batch, self._train_source(start_step), self._train_graph)
    while True:
      images, labels = pipe.run()
      yield {'image': _numpy(images), 'label': _numpy(labels).reshape(-1)}

  def _eval_graph(self, source):
    fn, types = self.fn, self.types
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                         dtype=[types.UINT8, types.INT32])
    images = fn.decoders.image(encoded, device=self.device, output_type=types.RGB)
    sizes = image_sizes(self.config)
    images = fn.resize(images, resize_shorter=sizes.eval_resize,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop(images, crop=(sizes.eval, sizes.eval)), labels

  def eval_batches(self, split: str, batch_size: int):
    """(num_batches, iterable) over all of `split`, each batch with a 0/1 'mask', as
    `Pipeline.eval_batches` (padding examples repeat the last image with mask 0)."""
    batch = host_batch_size(batch_size)
    paths, labels = self.source.shard_files(split, jax.process_index(), jax.process_count(),
                                            drop_remainder=False)
    total = self.source.num_examples(split)
    num_batches = math.ceil(math.ceil(total / jax.process_count()) / batch)

    def source():
      for b in range(num_batches):
        indices = [min(i, len(paths) - 1) for i in range(b * batch, (b + 1) * batch)]
        yield ([np.fromfile(paths[i], np.uint8) for i in indices],
               [np.int32(labels[i]) for i in indices])

    def batches():
      pipe = self._build(batch, source(), self._eval_graph)
      for b in range(num_batches):
        images, batch_labels = pipe.run()
        mask = (np.arange(b * batch, (b + 1) * batch) < len(paths)).astype(np.float32)
        yield {'image': _numpy(images), 'label': _numpy(batch_labels).reshape(-1),
               'mask': mask}

    return num_batches, batches


def _threads() -> int:
  return max(1, len(os.sched_getaffinity(0)))


def _numpy(tensor_list) -> np.ndarray:
  """A DALI output batch as one host numpy array (copied from the GPU if it is there)."""
  if hasattr(tensor_list, 'as_cpu'):
    tensor_list = tensor_list.as_cpu()
  return tensor_list.as_array()
