"""Tests of resnet_jax.data.dali: the DALI pipeline (CPU decoding on JPEG folders written
here; GPU decoding only where JAX runs on an NVIDIA GPU)."""

import sys

import jax
import numpy as np
import pytest
from helpers import tiny_digits_config
from PIL import Image

from resnet_jax.data import create_pipeline
from resnet_jax.data.dali import inception_crop
from resnet_jax.errors import UserError

requires_dali = pytest.mark.skipif(
    __import__('importlib').util.find_spec('nvidia.dali') is None,
    reason="NVIDIA DALI is not installed (pip install '.[dali]')")


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """3 classes of 10 JPEGs each (27 train, 3 test) of different sizes."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(0)
  for label in range(3):
    (root / f'c{label}').mkdir()
    for i in range(10):
      shape = (int(rng.integers(40, 60)), int(rng.integers(40, 60)), 3)
      Image.fromarray(rng.integers(0, 255, shape, np.uint8)).save(
          root / f'c{label}' / f'{i}.jpg', quality=90)
  return root


def dali_config(root, **overrides):
  return tiny_digits_config(**{'dataset': f'folder:{root}', 'preprocess': 'imagenet',
                               'image_size': 16, 'batch_size': 4, 'input_pipeline': 'dali',
                               **overrides})


@requires_dali
def test_resumed_stream_sees_the_same_batches(jpeg_folder):
  pipeline = create_pipeline(dali_config(jpeg_folder))
  assert pipeline.device == 'cpu' or jax.default_backend() == 'gpu'
  assert pipeline.steps_per_epoch == 6  # 27 // 4
  stream = pipeline.train_batches()
  batches = [next(stream) for _ in range(10)]  # across an epoch boundary
  assert batches[0]['image'].shape == (4, 16, 16, 3) and batches[0]['image'].dtype == np.uint8
  for start in (4, 7):
    resumed = next(pipeline.train_batches(start))
    for key in ('image', 'label'):
      np.testing.assert_array_equal(resumed[key], batches[start][key])
  epoch_labels = np.concatenate([b['label'] for b in batches[:6]])
  assert len(epoch_labels) == 24 and max(np.bincount(epoch_labels)) <= 9  # no file twice
  assert not np.array_equal(batches[0]['image'], batches[6]['image'])  # epochs differ


@requires_dali
def test_order_and_augmentation_are_functions_of_the_seed(jpeg_folder):
  first = next(create_pipeline(dali_config(jpeg_folder)).train_batches())
  again = next(create_pipeline(dali_config(jpeg_folder)).train_batches())
  other = next(create_pipeline(dali_config(jpeg_folder, seed=1)).train_batches())
  np.testing.assert_array_equal(first['image'], again['image'])
  assert not np.array_equal(first['image'], other['image'])


@requires_dali
def test_eval_counts_every_example_once(jpeg_folder):
  pipeline = create_pipeline(dali_config(jpeg_folder))
  num_batches, make = pipeline.eval_batches('test', 2)
  batches = list(make())
  assert num_batches == len(batches) == 2
  assert [b['mask'].tolist() for b in batches] == [[1, 1], [1, 0]]
  assert [b['label'].tolist()[:1] for b in batches] == [[0], [2]]
  assert batches[0]['image'].shape == (2, 16, 16, 3)


@pytest.mark.skipif(jax.default_backend() != 'gpu',
                    reason='GPU decoding (DALI mixed device) needs JAX on an NVIDIA GPU')
@requires_dali
def test_decodes_on_the_gpu_where_jax_runs_on_one(jpeg_folder):
  pipeline = create_pipeline(dali_config(jpeg_folder))
  assert pipeline.device == 'mixed'
  batch = next(pipeline.train_batches(3))
  np.testing.assert_array_equal(batch['label'], next(pipeline.train_batches(3))['label'])


def test_refuses_what_it_cannot_read(jpeg_folder, monkeypatch):
  with pytest.raises(UserError, match="image folders.*input_pipeline=tf.data"):
    create_pipeline(tiny_digits_config(input_pipeline='dali'))
  monkeypatch.setitem(sys.modules, 'nvidia.dali', None)  # as if not installed
  with pytest.raises(UserError, match=r"pip install 'resnet_jax\[dali\]'"):
    create_pipeline(dali_config(jpeg_folder))


def test_inception_crop_windows_are_torchvisions():
  rng = np.random.default_rng(0)
  for height, width in [(375, 500), (500, 375), (60, 600), (224, 224)]:
    for _ in range(200):
      x, y, w, h = inception_crop(height, width, rng)
      assert 0 <= x <= width - w and 0 <= y <= height - h and w > 0 and h > 0
      if (height, width) != (60, 600):  # else mostly the clamped center crop
        assert 0.075 <= w * h / (height * width) <= 1.0
  # No 8% window of 3/4-4/3 aspect fits: the central crop of aspect 4/3, as torchvision's.
  assert inception_crop(10, 1000, rng) == (493, 0, 13, 10)


@pytest.mark.slow  # trains and resumes in-process: 30-40 s loaded
@requires_dali
def test_trains_an_imagenet_style_run_and_resumes_it_exactly(jpeg_folder, tmp_path):
  """train.py's loop on the DALI pipeline (CPU decoding): 4 steps in one go equal 2 + 2."""
  from resnet_jax.train.loop import train_and_evaluate
  from helpers import assert_same_state
  config = dict(eval_batch_size=2, num_train_steps=4, checkpoint_every_steps=2)  # 3 test images
  results = train_and_evaluate(dali_config(jpeg_folder, **config), str(tmp_path / 'whole'))
  assert results['count'] == 3 and 0 <= results['top1'] <= 1
  train_and_evaluate(dali_config(jpeg_folder, **{**config, 'num_train_steps': 2}),
                     str(tmp_path / 'resumed'))
  train_and_evaluate(dali_config(jpeg_folder, **config), str(tmp_path / 'resumed'))
  assert_same_state(tmp_path / 'resumed', tmp_path / 'whole')
