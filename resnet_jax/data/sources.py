"""Where examples come from: a TFDS dataset by name, or a folder of images per class.

A source reads one process's shard of a split as a tf.data.Dataset of
{'image': uint8 (H, W, C), 'label': int} (or the encoded image file, for the preprocessing to
decode) and knows the split's size and class count.
"""

import collections
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from concurrent import futures
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.data import digits  # noqa: F401  (registers the 'digits' builder)
from resnet_jax.data import preprocessing
from resnet_jax.errors import UserError, write_failure_words

class DatasetNotPreparedError(UserError, RuntimeError):
  """A TFDS dataset that is neither prepared nor preparable offline (a RuntimeError, as before)."""


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
FOLDER_PREFIX = 'folder:'

# Images of more pixels are refused before training. This is PIL's default
# Image.MAX_IMAGE_PIXELS (its guard against decompression bombs): such an image decodes to
# 268 MB of RGB and about 1 GB of float32 in a resize, for each image tf.data has in flight,
# while a 4:3 photo of up to 10900x8200 passes. A 20000x20000 PNG of 438 KB took a training
# run's host memory from 1.6 to 4.1 GB.
MAX_IMAGE_PIXELS = 89_478_485
# PIL's names of the formats tf.io.decode_image reads (MPO: a camera's multi-picture JPEG).
DECODABLE_FORMATS = ('JPEG', 'MPO', 'PNG', 'BMP', 'GIF', 'WEBP')
UNREADABLE, TOO_LARGE = 'unreadable', 'too large'


class TfdsSource:
  """A TFDS dataset; each process reads `tfds.even_splits` part of the split."""

  def __init__(self, name: str, data_dir: Optional[str] = None):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f'Unknown dataset {name!r}. Offline: digits, synthetic, '
                      f'"{FOLDER_PREFIX}/path/to/images"; TFDS names once prepared in '
                      f'data_dir: cifar10, cifar100, mnist, imagenet2012, imagenette, ... '
                      f'(`tfds build NAME --data_dir DIR`, then --config.data_dir=DIR).') from None
    _ensure_prepared(self.builder, name)
    features = self.builder.info.features
    self.num_classes = features['label'].num_classes
    self.channels = features['image'].shape[-1]
    self.image_shape = features['image'].shape

  def read(self, split: str, process_index: int, process_count: int, *,
           drop_remainder: bool, shuffle_seed: Optional[int] = None,
           encoded: bool = False) -> tf.data.Dataset:
    """This process's part of `split`; with `encoded`, 'image' is the encoded file. The
    shuffle_seed may also be an int64 tensor (inside a tf.data function)."""
    part = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    decoders = {'image': tfds.decode.SkipDecoding()} if encoded else None
    ds = self.builder.as_dataset(split=part, shuffle_files=shuffle_seed is not None,
                                 read_config=read_config, decoders=decoders)
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})

  def read_epochs(self, split: str, process_index: int, process_count: int, *,
                  drop_remainder: bool, seeds: Sequence[int], encoded: bool = False):
    """A function of i (an int64 tensor, inside a tf.data function) giving `read` with
    shuffle_seed=seeds[i], so that one dataset holds several epochs."""
    table = tf.constant(seeds, tf.int64)
    return lambda i: self.read(split, process_index, process_count,
                               drop_remainder=drop_remainder,
                               shuffle_seed=tf.gather(table, i), encoded=encoded)

  def num_examples(self, split: str) -> int:
    """The size of `split`; a split that TFDS cannot parse or that holds no examples
    (e.g. 'train[:0]') is a UserError naming the dataset's splits."""
    try:
      count = _cardinality(self.builder.as_dataset(split=split))
    except ValueError as e:  # TFDS: unknown split, bad slice syntax, empty slice
      raise UserError(self._split_message(split, _first_line(e))) from None
    if not count:
      raise UserError(self._split_message(split, 'it holds no examples'))
    return count

  def _split_message(self, split: str, why: str) -> str:
    splits = ', '.join(f'{name!r} ({info.num_examples} examples)'
                       for name, info in self.builder.info.splits.items())
    return (f'Split {split!r} of dataset {self.builder.name!r} cannot be read ({why}). '
            f'Its splits: {splits}; a part is written like \'train[:90%]\'.')

  def check_files(self, splits: Sequence[str]):
    """Nothing to check: TFDS checked the records when it prepared them."""
    del splits

  def explain_read_error(self, split: str, error: Exception) -> str:
    return (f'Reading split {split!r} of {self.builder.name!r} from {self.builder.data_dir} '
            f'failed ({_first_line(error)}). The prepared files may be damaged: rebuild them '
            f'with `tfds build {self.builder.name} --data_dir DIR`.')


class FolderSource:
  """ROOT/<class>/<image> (or ROOT/<split>/<class>/<image>, as tfds's ImageFolder).

  Without split sub-folders, every tenth image (in sorted order) is the 'test' split and
  the rest is 'train'.
  """

  def __init__(self, root: str, channels: int = 3):
    if not os.path.isdir(root):
      raise UserError(f'Image folder {root!r} does not exist.')
    self.root = root
    self.channels = channels
    self.image_shape = (None, None, channels)
    self.classes = self._class_names()
    self.num_classes = len(self.classes)
    self.skipped = {}  # folder read: {extension: count} of its files that are no images

  def _has_splits(self):
    return os.path.isdir(os.path.join(self.root, 'train'))

  def _class_names(self):
    base = os.path.join(self.root, 'train') if self._has_splits() else self.root
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not names:
      raise UserError(f'No class sub-folders in {base!r}; expected {base}/<class>/<image>.')
    return names

  def _files(self, split):
    base = os.path.join(self.root, split) if self._has_splits() else self.root
    if not os.path.isdir(base):
      present = sorted(d for d in os.listdir(self.root)
                       if os.path.isdir(os.path.join(self.root, d)))
      raise UserError(f'No split {split!r} in image folder {self.root!r}: its split folders '
                      f'are {", ".join(present)}. Name them with --config.train_split and '
                      f'--config.eval_split (e.g. --config.eval_split={present[-1]}).')
    paths, labels, skipped = [], [], collections.Counter()
    for label, name in enumerate(self.classes):
      images, others = _image_files(os.path.join(base, name))
      paths += images
      labels += [label] * len(images)
      skipped.update(os.path.splitext(other)[1].lower() or other for other in others)
    self.skipped[base] = skipped
    empty = [name for name, count in zip(self.classes, np.bincount(labels, minlength=len(
        self.classes))) if not count] if not self._has_splits() or split == 'train' else []
    if empty:
      raise UserError(f'Class folder(s) {empty[:10]} in {base!r} hold no images '
                      f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder(s).')
    if not self._has_splits():
      held_out = np.arange(len(paths)) % 10 == 0
      keep = held_out if split == 'test' else ~held_out
      paths, labels = list(np.array(paths)[keep]), list(np.array(labels)[keep])
    return np.array(paths), np.array(labels, np.int64)

  def shard_files(self, split, process_index, process_count, *, drop_remainder,
                  shuffle_seed=None):
    """(paths, labels) of this process's part of `split`, in the seeded order if given (the
    files `read` reads, for pipelines that read them themselves)."""
    paths, labels = self._files(split)
    part = shard_positions(len(paths), process_index, process_count, drop_remainder,
                           shuffle_seed)
    return paths[part], labels[part]

  def read(self, split, process_index, process_count, *, drop_remainder, shuffle_seed=None,
           encoded=False):
    return self.read_epochs(split, process_index, process_count,
                            drop_remainder=drop_remainder, seeds=[shuffle_seed],
                            encoded=encoded)(0)

  def read_epochs(self, split, process_index, process_count, *, drop_remainder, seeds,
                  encoded=False):
    """A function of i (an int64 tensor, inside a tf.data function) giving the files of
    `shard_files` with shuffle_seed=seeds[i], so that one dataset holds several epochs.
    Their orders are computed here, in numpy (a table of len(seeds) x the part's size)."""
    paths, labels = self._files(split)
    table = np.stack([shard_positions(len(paths), process_index, process_count,
                                      drop_remainder, seed) for seed in seeds])
    paths, labels, table = tf.constant(paths), tf.constant(labels), tf.constant(table)
    channels = self.channels

    def load(path, label):
      image = tf.io.read_file(path)
      return {'image': image if encoded else preprocessing.decode(image, channels),
              'label': label}

    def epoch(i):
      part = tf.gather(table, i)
      return tf.data.Dataset.from_tensor_slices(
          (tf.gather(paths, part), tf.gather(labels, part))).map(
              load, num_parallel_calls=tf.data.AUTOTUNE)

    return epoch

  def num_examples(self, split):
    count = len(self._files(split)[0])
    if not count:
      raise UserError(f'Split {split!r} of image folder {self.root!r} holds no images '
                      f'({", ".join(IMAGE_EXTENSIONS)}).')
    return count

  def check_files(self, splits: Sequence[str]):
    """Refuses, before any training step, the files of `splits` that TensorFlow cannot
    decode or that exceed MAX_IMAGE_PIXELS.

    Reads only each file's header (format and size, in threads), not its pixels: a
    one-time cost at the start of each run (benchmarks/RESULTS.md). A file damaged past
    its header (truncated) is found only when read, by `explain_read_error`.
    """
    paths = sorted({str(p) for split in dict.fromkeys(splits) for p in self._files(split)[0]})
    for folder, skipped in self.skipped.items():
      if skipped:
        logging.warning('Image folder %r: left out %d file(s) whose names do not end in an '
                        'image extension (%s; images are %s). Rename or convert them to use '
                        'them.', folder, sum(skipped.values()),
                        ', '.join(f'{name}: {count}' for name, count in skipped.most_common()),
                        ', '.join(IMAGE_EXTENSIONS))
    bad = _find_problems(paths, header_problem)
    if bad:
      raise UserError(self._bad_files_message(', '.join(map(repr, dict.fromkeys(splits))),
                                              bad))

  def explain_read_error(self, split: str, error: Exception) -> str:
    """Finds the files of `split` that do not decode (only after a read failed)."""
    bad = _find_problems([str(p) for p in self._files(split)[0]],
                         lambda path: decode_problem(path, self.channels))
    if bad:
      return self._bad_files_message(repr(split), bad)
    return (f'Image folder {self.root!r}, split {split!r}: reading failed '
            f'({_first_line(error)}).')

  def _bad_files_message(self, splits: str, bad: list) -> str:
    """One message naming the first 10 files of each kind of problem and what to do."""
    unreadable = [path for path, kind, _ in bad if kind == UNREADABLE]
    large = [f'{path} ({size})' if size else path for path, kind, size in bad
             if kind == TOO_LARGE]
    found = []
    if unreadable:
      found.append(f'{len(unreadable)} file(s) are not readable images: {unreadable[:10]}. '
                   f'Remove or re-save them as JPEG/PNG/BMP/GIF (any of grayscale, RGB, '
                   f'RGBA, CMYK is fine).')
    if large:
      found.append(f'{len(large)} file(s) have more than {MAX_IMAGE_PIXELS:,} pixels, too '
                   f'many to decode within host memory: {large[:10]}. Downscale them (e.g. '
                   f'PIL\'s Image.thumbnail) or remove them.')
    return f'Image folder {self.root!r}, split(s) {splits}: ' + ' '.join(found)


def shard_positions(count: int, process_index: int, process_count: int,
                    drop_remainder: bool, shuffle_seed: Optional[int]) -> np.ndarray:
  """Positions in a split of `count` files of one process's part: every process_count-th of
  the seeded permutation (or of the files in order), the last incomplete round dropped if
  `drop_remainder`."""
  order = (np.arange(count) if shuffle_seed is None else
           np.random.default_rng(shuffle_seed).permutation(count))
  if drop_remainder:
    order = order[:count // process_count * process_count]
  return order[process_index::process_count]


def _image_files(folder: str) -> Tuple[list, list]:
  """Sorted paths of the image files in `folder`, and the names of its other files (hidden
  ones, such as .DS_Store, aside); sub-folders (even one named x.jpg) and other entries
  that are not files are neither."""
  if not os.path.isdir(folder):
    return [], []
  with os.scandir(folder) as entries:
    files = [entry for entry in entries if entry.is_file()]
  images = sorted(f.path for f in files if f.name.lower().endswith(IMAGE_EXTENSIONS))
  others = [f.name for f in files
            if not f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith('.')]
  return images, others


def header_problem(path: str) -> Optional[tuple]:
  """(UNREADABLE or TOO_LARGE, size) of the image file `path` from its header alone, or
  None when TensorFlow can decode it within MAX_IMAGE_PIXELS."""
  try:
    with Image.open(path) as image:
      image_format, (width, height) = image.format, image.size
  except Image.DecompressionBombError as e:  # over twice PIL's limit: PIL will not open it
    pixels = re.search(r'\((\d+) pixels\)', str(e))
    return TOO_LARGE, pixels and f'{int(pixels[1]):,} pixels'
  except Exception:  # pylint: disable=broad-except  (PIL raises many kinds on a bad file)
    return UNREADABLE, None
  if image_format not in DECODABLE_FORMATS:
    return UNREADABLE, None
  if width * height > MAX_IMAGE_PIXELS:
    return TOO_LARGE, f'{width}x{height}'
  return None


def decode_problem(path: str, channels: int) -> Optional[tuple]:
  """(UNREADABLE, None) when TensorFlow fails to decode the file `path`, else None."""
  try:
    preprocessing.decode(tf.io.read_file(path), channels)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
    return UNREADABLE, None
  return None


def _find_problems(paths: Sequence[str], problem: Callable, chunk: int = 256) -> list:
  """[(path, kind, detail)] of the `paths` for which `problem` says something, checked in
  a thread pool (file reads and TensorFlow's decoding release the GIL), in order."""
  def check(start):
    return [(path, *found) for path in paths[start:start + chunk]
            for found in [problem(path)] if found]

  with warnings.catch_warnings():  # PIL warns of large images; the message names them
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    with futures.ThreadPoolExecutor(max_workers=32) as pool:
      return [bad for part in pool.map(check, range(0, len(paths), chunk)) for bad in part]


def _first_line(error: Exception) -> str:
  return f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:200]}'


def create_source(dataset: str, data_dir: Optional[str] = None):
  if dataset.startswith(FOLDER_PREFIX):
    return FolderSource(dataset[len(FOLDER_PREFIX):])
  return TfdsSource(dataset, data_dir)


def _cardinality(ds: tf.data.Dataset) -> int:
  n = int(ds.cardinality())
  if n < 0:
    n = int(ds.reduce(0, lambda count, _: count + 1))
  return n


def _ensure_prepared(builder, name):
  """Prepares datasets that need no download (digits); otherwise says what to do."""
  if _is_prepared(builder):
    return
  try:
    if getattr(builder, 'NEEDS_NO_DOWNLOAD', False):
      _quietly(builder.download_and_prepare)
    else:
      builder.download_and_prepare()
  except Exception as e:  # a network, manual-download or disk failure: say what to do
    root = builder.data_dir_root
    manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
    failed_write = write_failure_words(e)
    if failed_write:  # a full or read-only disk, a file in the way
      hint = (f'Preparing dataset {name!r} in {root} failed ({failed_write}): free disk '
              f'space there or make it a writable folder, or pass --config.data_dir=DIR '
              f'elsewhere.')
    elif manual:
      hint = (f'Dataset {name!r} is not prepared in {root} and needs a manual download:\n'
              f'{manual.strip()}\nPut those files in {os.path.join(root, "downloads", "manual")} '
              f'(train.py then prepares it), or pass --config.data_dir=DIR where the dataset is '
              f'already prepared.')
    else:
      reason = (str(e).strip().splitlines() or [''])[0][:200]
      hint = (f'Dataset {name!r} is not prepared in {root} and could not be downloaded '
              f'({type(e).__name__}: {reason}). On a machine with network access run '
              f'`tfds build {name} --data_dir DIR`, copy DIR here and pass '
              f'--config.data_dir=DIR.')
    raise DatasetNotPreparedError(hint) from None


class _BelowError(logging.Filter):
  def filter(self, record):
    return record.levelno >= logging.ERROR


def _is_prepared(builder) -> bool:
  """builder.is_prepared(), without its warning that a dataset not yet built has no
  dataset_info.json (the answer no says as much; preparing it follows)."""
  absl_logger, quiet = logging.getLogger('absl'), _BelowError()
  absl_logger.addFilter(quiet)
  try:
    return builder.is_prepared()
  finally:
    absl_logger.removeFilter(quiet)


def _quietly(prepare):
  """Runs `prepare` with TFDS's "Downloading and preparing" lines and progress bars (a
  second's work for digits) held back; shown after all if it fails."""
  held = io.StringIO()
  try:
    with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
      prepare()
  except BaseException:
    sys.stderr.write(held.getvalue())
    raise
