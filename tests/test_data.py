"""Tests of resnet_jax.data: the digits builder, resumable order, eval padding, sources."""

import collections
import errno
import io
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import tiny_digits_config
from PIL import Image

from resnet_jax.data import create_pipeline, normalization, preprocessing
from resnet_jax.data.sources import FolderSource, TfdsSource
from resnet_jax.errors import UserError


@pytest.fixture(scope='module')
def digits():
  return create_pipeline(tiny_digits_config(batch_size=64))


def test_digits_builder_ships_all_1797_images(digits):
  source = digits.source
  assert (source.num_examples('train'), source.num_examples('test')) == (1437, 360)
  assert source.num_classes == 10 and source.image_shape == (8, 8, 1)
  assert digits.in_memory and digits.steps_per_epoch == 1437 // 64


def test_resumed_stream_sees_the_same_batches(digits):
  stream = digits.train_batches(0)
  start = digits.steps_per_epoch - 1  # the resumed stream crosses an epoch boundary
  batches = [next(stream) for _ in range(start + 3)]
  resumed = digits.train_batches(start)
  for expected in batches[start:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
  assert batches[0]['image'].shape == (64, 8, 8, 1)
  assert not np.array_equal(batches[0]['label'], batches[digits.steps_per_epoch]['label'])


def test_batches_are_uint8_pixels_normalized_as_torchvision_does(digits):
  train, (_, eval_batches) = next(digits.train_batches()), digits.eval_batches('test', 128)
  assert train['image'].dtype == next(eval_batches())['image'].dtype == np.uint8
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  mean, std = normalization.STATISTICS['imagenet']
  expected = transforms.Normalize(mean, std)(transforms.ToTensor()(pixels))
  np.testing.assert_allclose(normalization.normalize(pixels, 'imagenet'),
                             expected.numpy().transpose(1, 2, 0), atol=1e-6)


def test_order_is_a_function_of_the_seed(digits):
  other = create_pipeline(tiny_digits_config(batch_size=64, seed=1))
  same = create_pipeline(tiny_digits_config(batch_size=64))
  first = next(digits.train_batches())['label']
  assert np.array_equal(first, next(same.train_batches())['label'])
  assert not np.array_equal(first, next(other.train_batches())['label'])


def test_eval_counts_every_example_once(digits):
  num_batches, batches = digits.eval_batches('test', 128)
  batches = list(batches())
  assert num_batches == len(batches) == 3  # 360 = 128 + 128 + 104 real examples
  masks = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[masks == 1]
  expected = [int(ex['label']) for ex in tfds.load('digits', split='test').as_numpy_iterator()]
  assert masks.sum() == 360 and sorted(labels) == sorted(expected)


def test_streamed_pipeline_resumes_exactly():
  """Datasets of variable-size images stream from files through a shuffle buffer."""
  config = tiny_digits_config(dataset='imagenet2012', preprocess='imagenet', image_size=16,
                              batch_size=4, shuffle_buffer=8)
  with tfds.testing.mock_data(num_examples=12):
    pipeline = create_pipeline(config)
    assert not pipeline.in_memory and pipeline.steps_per_epoch == 3
    stream = pipeline.train_batches(0)
    batches = [next(stream) for _ in range(5)]
    resumed = next(pipeline.train_batches(4))
  np.testing.assert_array_equal(resumed['image'], batches[4]['image'])
  assert batches[0]['image'].shape == (4, 16, 16, 3)


@pytest.mark.parametrize('mode, file_format', [('RGB', 'JPEG'), ('L', 'JPEG'), ('RGB', 'PNG')])
def test_imagenet_crop_of_encoded_file_equals_crop_of_decoded_pixels(mode, file_format):
  """Decoding only the crop window of a file gives the pixels of a full decode + crop
  (but for a few color JPEG pixels along the window's edges)."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (75, 100, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format=file_format)
  encoded = tf.constant(buffer.getvalue())
  decoded = preprocessing.decode(encoded, 3)
  for index in range(4):
    seed = tf.constant([7, index], tf.int64)
    crop = preprocessing.train_transform({'image': encoded, 'label': 0}, seed, 'imagenet', 24)
    reference = preprocessing.train_transform({'image': decoded, 'label': 0}, seed,
                                               'imagenet', 24)
    assert crop['image'].shape == (24, 24, 3)
    assert crop['image'].dtype == tf.uint8
    if (mode, file_format) == ('RGB', 'JPEG'):  # chroma is upsampled apart at window edges
      levels = np.abs(crop['image'].numpy().astype(int) - reference['image'].numpy())
      assert np.mean(levels > 0) < 0.1 and np.mean(levels) < 1
    else:
      np.testing.assert_array_equal(crop['image'], reference['image'])


def _image_folder(root):
  """root/cat and root/dog, 10 random 12x10 PNGs each (18 train, 2 test)."""
  rng = np.random.default_rng(0)
  for label in ('cat', 'dog'):
    (root / label).mkdir()
    for i in range(10):
      Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(
          root / label / f'{i}.png')


def test_image_folder(tmp_path):
  _image_folder(tmp_path)
  source = FolderSource(str(tmp_path))
  assert source.num_classes == 2
  assert (source.num_examples('train'), source.num_examples('test')) == (18, 2)
  config = tiny_digits_config(dataset=f'folder:{tmp_path}', preprocess='cifar', image_size=8,
                              batch_size=6)
  pipeline = create_pipeline(config)
  batch = next(pipeline.train_batches())
  assert batch['image'].shape == (6, 8, 8, 3) and set(batch['label']) <= {0, 1}
  _, batches = pipeline.eval_batches('test', 4)
  assert sum(b['mask'].sum() for b in batches()) == 2


def test_webp_images_are_read_and_other_files_are_named_in_one_warning(tmp_path, caplog):
  """Before: .webp files (which TensorFlow decodes) and every other file were left out
  without a word."""
  _image_folder(tmp_path)
  Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / 'cat' / 'x.webp')
  for name in ('a.tif', 'b.tif', 'notes.txt', '.DS_Store'):  # hidden files are no images
    (tmp_path / 'dog' / name).write_bytes(b'')
  source = FolderSource(str(tmp_path))
  assert source.num_examples('train') + source.num_examples('test') == 21
  source.check_files(('train', 'test'))
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
      f"Image folder {str(tmp_path)!r}: left out 3 file(s) whose names do not end in an image "
      'extension (.tif: 2, .txt: 1; images are .jpg, .jpeg, .png, .bmp, .gif, .webp). Rename '
      'or convert them to use them.']


def test_small_streamed_epochs_are_one_dataset_and_resume_exactly(tmp_path, monkeypatch):
  """Epochs of a few batches stream from one tf.data dataset (the transform is traced once
  for many epochs, not once per epoch: a stall per epoch, benchmarks/RESULTS.md); a stream
  of datasets holding 1 or 2 epochs each, or resumed mid-epoch, gives the same batches."""
  _image_folder(tmp_path)
  config = tiny_digits_config(dataset=f'folder:{tmp_path}', preprocess='imagenet',
                              image_size=8, batch_size=4, shuffle_buffer=8)
  traces, transform = [], preprocessing.train_transform
  monkeypatch.setattr(preprocessing, 'train_transform',
                      lambda *args: traces.append(args) or transform(*args))
  pipeline = create_pipeline(config)
  steps = pipeline.steps_per_epoch
  assert not pipeline.in_memory and steps == 4
  stream = pipeline.train_batches(0)
  batches = [next(stream) for _ in range(3 * steps + 1)]
  assert len(traces) == 1
  for epoch in range(3):  # each epoch: every train file once, in its own order
    labels = np.concatenate([b['label'] for b in batches[epoch * steps:(epoch + 1) * steps]])
    assert sorted(labels) in ([0] * 8 + [1] * 8, [0] * 9 + [1] * 7, [0] * 7 + [1] * 9)
  assert not np.array_equal(batches[0]['image'], batches[steps]['image'])
  for epochs_per_dataset in (1, 2):
    monkeypatch.setattr(pipeline, 'epochs_per_dataset', epochs_per_dataset)
    for start in (0, steps + 2):
      stream = pipeline.train_batches(start)
      for expected in batches[start:]:
        got = next(stream)
        np.testing.assert_array_equal(got['image'], expected['image'])
        np.testing.assert_array_equal(got['label'], expected['label'])


def test_missing_dataset_says_what_to_do(tmp_path):
  with pytest.raises(RuntimeError, match='(?s)manual download.*--config.data_dir'):
    TfdsSource('imagenet2012', str(tmp_path))
  with pytest.raises(UserError, match='Unknown dataset'):
    TfdsSource('no_such_dataset_xyz', str(tmp_path))


def test_first_preparation_of_digits_is_quiet(tmp_path, capsys, caplog):
  """The first `python train.py` builds digits: no TFDS warning, no "Downloading" line, no
  progress bars; the dataset is then prepared."""
  caplog.set_level(logging.INFO)
  source = TfdsSource('digits', str(tmp_path))
  out, err = capsys.readouterr()
  assert (out, err) == ('', '')
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert source.builder.is_prepared() and source.num_examples('test') == 360


@pytest.mark.parametrize('error, message', [
    (OSError('simulated: disk error'), 'could not be downloaded .*simulated: disk error'),
    (OSError(errno.ENOSPC, 'No space left on device'),
     r"Preparing dataset 'digits' in .* failed \(No space left on device\): free disk space"),
])
def test_a_failed_digits_preparation_shows_what_tfds_printed(tmp_path, capsys, monkeypatch,
                                                             error, message):
  from resnet_jax.data import digits

  def failing(self, images, labels, indices):
    print('partial output of the build')
    raise error
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(digits.Digits, '_generate_examples', failing)
  with pytest.raises(RuntimeError, match=message):
    TfdsSource('digits', str(tmp_path))
  assert 'partial output of the build' in capsys.readouterr().err


def test_a_data_dir_that_is_a_file_is_one_message(tmp_path):
  """Before: 'could not be downloaded', and to run `tfds build` on a machine with network."""
  (tmp_path / 'file').write_text('')
  with pytest.raises(UserError, match=r"Preparing dataset 'digits' in .*file failed \(Not a "
                     r'directory\): free disk space there or make it a writable folder, or pass '
                     '--config.data_dir=DIR elsewhere'):
    TfdsSource('digits', str(tmp_path / 'file'))


def test_synthetic_data_needs_no_dataset():
  config = tiny_digits_config(dataset='synthetic', image_size=16, batch_size=8)
  config.in_channels = 3
  pipeline = create_pipeline(config)
  batch = next(pipeline.train_batches())
  assert batch['image'].shape == (8, 16, 16, 3) and batch['label'].max() < 10


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_imagenet_eval_of_encoded_file_is_pils_resize_of_the_central_crop(mode):
  """The crop kept by torchvision's Resize(size / 0.875) + CenterCrop(size), resized by PIL
  (a PNG, so that no two JPEG decoders are compared)."""
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, 'PNG')
  channels = len(mode)
  out = preprocessing.eval_transform({'image': tf.constant(buffer.getvalue()), 'label': 0},
                                     'imagenet', 16, channels)['image']
  side = round(50 * preprocessing.EVAL_CROP_FRACTION)  # 44
  top, left = (50 - side) // 2, (70 - side) // 2
  reference = np.asarray(image.crop((left, top, left + side, top + side)).resize(
      (16, 16), Image.BILINEAR)).reshape(16, 16, channels)
  np.testing.assert_array_equal(out, reference)


# --- repeated augmentation (config.repeated_augmentation) ----------------------------------

def _ra_reference_slots(num_examples, copies, replicas, step_batch):
  """timm's RepeatAugSampler (torchvision's RASampler) over `replicas` processes: for each
  step, {example: the replicas holding its copies}, the reference our layout is held to."""
  from timm.data.distributed_sampler import RepeatAugSampler  # pylint: disable=g-import-not-at-top
  per_replica = [list(RepeatAugSampler(range(num_examples), num_replicas=replicas, rank=rank,
                                       num_repeats=copies, selected_round=0))
                 for rank in range(replicas)]
  steps = []
  for start in range(0, len(per_replica[0]) - step_batch + 1, step_batch):
    holders = collections.defaultdict(set)
    for rank, indices in enumerate(per_replica):
      for index in indices[start:start + step_batch]:
        holders[index].add(rank)
    steps.append(holders)
  return steps


def test_repeated_augmentation_uses_each_example_n_times_per_window_on_other_processes(
    monkeypatch):
  """As RASampler: over a window of N epochs, each example of the window N times, its
  copies in one step on N different processes, each differently augmented; the batches do
  not depend on the process count, and a resumed stream sees the same ones."""
  from test_pods import _global_batches  # pylint: disable=g-import-not-at-top
  copies, processes = 3, 3
  config = tiny_digits_config(batch_size=48, preprocess='none', repeated_augmentation=copies)
  steps = create_pipeline(config).steps_per_epoch  # 29
  window = _global_batches(monkeypatch, processes, 0, copies * steps, config)
  # Resumed mid-window on 2 processes, and on 1 from the start: the same global batches.
  changed = (_global_batches(monkeypatch, 1, 0, steps + 5, config) +
             _global_batches(monkeypatch, 2, steps + 5, 2 * steps - 5, config))
  for a, b in zip(changed, window):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  used = collections.Counter(image.tobytes() for b in window for image in b['image'])
  assert set(used.values()) == {copies} and len(used) == steps * 48  # N each, 1392 examples
  reference = _ra_reference_slots(1437, copies, processes, 16)
  for batch, holders in zip(window, reference):
    ours = collections.defaultdict(set)
    for slot, image in enumerate(batch['image']):
      ours[image.tobytes()].add(slot // 16)  # the process of the slot
    assert sorted(map(len, ours.values())) == sorted(map(len, holders.values())) == [3] * 16
  # Differently augmented copies: an augmenting recipe gives each copy its own pixels.
  augmented = tiny_digits_config(batch_size=48, repeated_augmentation=copies)
  batch = next(create_pipeline(augmented).train_batches(0))
  groups = batch['image'].reshape(copies, 16, -1)
  assert np.mean([not np.array_equal(groups[0, j], groups[1, j]) for j in range(16)]) > 0.5
  np.testing.assert_array_equal(batch['label'].reshape(copies, 16)[0],
                                batch['label'].reshape(copies, 16)[1])


def test_repeated_augmentation_when_the_copies_do_not_divide_the_batch():
  """RSB's 3 copies in batches of 2048: 683 examples a batch, one of them twice (its third
  copy cut off, as RASampler's straddle a batch boundary); here 3 in 50 (17, one twice)."""
  config = tiny_digits_config(batch_size=50, preprocess='none', repeated_augmentation=3)
  pipeline = create_pipeline(config)
  stream = pipeline.train_batches(0)
  for _ in range(3 * pipeline.steps_per_epoch):
    batch = next(stream)['image']
    copies = collections.Counter(image.tobytes() for image in batch)
    assert sorted(copies.values()) == [2] + [3] * 16
    for j in range(16):  # copy c of example j at slot 17c + j
      np.testing.assert_array_equal(batch[j], batch[17 + j])
      np.testing.assert_array_equal(batch[j], batch[34 + j])


def test_streamed_repeated_augmentation_resumes_exactly(tmp_path):
  _image_folder(tmp_path)
  config = tiny_digits_config(dataset=f'folder:{tmp_path}', preprocess='imagenet',
                              image_size=8, batch_size=4, shuffle_buffer=8,
                              repeated_augmentation=2)
  pipeline = create_pipeline(config)
  steps = pipeline.steps_per_epoch
  stream = pipeline.train_batches(0)
  batches = [next(stream) for _ in range(2 * steps + 2)]
  window_labels = np.concatenate([b['label'] for b in batches[:2 * steps]])
  assert sorted(window_labels) in ([0] * 16 + [1] * 16, [0] * 18 + [1] * 14,
                                   [0] * 14 + [1] * 18)  # the 16 train files twice each
  for b in batches:  # copies two slots apart
    np.testing.assert_array_equal(b['label'][:2], b['label'][2:])
  for start in (steps - 1, 2 * steps):
    for got, expected in zip(pipeline.train_batches(start), batches[start:]):
      np.testing.assert_array_equal(got['image'], expected['image'])


def test_eval_sizes_differ_from_the_train_size(digits):
  """torchvision's V2 recipe trains at 176 and evaluates a 224 crop of 232: here 6 and 8."""
  config = tiny_digits_config(batch_size=64, train_image_size=6, eval_image_size=10)
  pipeline = create_pipeline(config)
  assert next(pipeline.train_batches())['image'].shape == (64, 6, 6, 1)
  assert next(pipeline.eval_batches('test', 128)[1]())['image'].shape == (128, 10, 10, 1)


def test_imagenet_eval_resizes_to_eval_resize_size_then_crops():
  """Resize 232, crop 224, as torchvision's Resize(232) + CenterCrop(224) (here 58 and 56),
  from pixels and from an encoded file, on a smooth image (resamplers differ on noise)."""
  from torchvision.transforms import v2  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:140, 0:180]
  pixels = np.stack([127 + 100 * np.sin(x / 30), 127 + 100 * np.cos(y / 40), (x + y) * 0.7],
                    -1).astype(np.uint8)
  expected = np.asarray(v2.CenterCrop(56)(v2.Resize(58, antialias=True)(
      Image.fromarray(pixels)))).astype(int)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'PNG')
  for image in (tf.constant(pixels), tf.constant(buffer.getvalue())):
    ours = preprocessing.eval_transform({'image': image, 'label': 0}, 'imagenet', 56, 3,
                                        crop_fraction=56 / 58)['image'].numpy()
    assert ours.shape == (56, 56, 3)
    assert np.abs(ours.astype(int) - expected).mean() < 1.5
