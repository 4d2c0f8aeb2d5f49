"""Tests of the image-folder file check made before the first step, and of what an
evaluation failure after training steps leaves behind."""

import os
import struct
import zlib

import numpy as np
import pytest
from helpers import tiny_digits_config
from PIL import Image

from resnet_jax.data import create_pipeline, sources
from resnet_jax.data.sources import FolderSource
from resnet_jax.errors import UserError
from resnet_jax.train import checkpoint_format, run_dir
from resnet_jax.train import loop, parallel


def _split_folder(root, per_class=4):
  """ROOT/{train,test}/{cat,dog}/<i>.png of small random images."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for label in ('cat', 'dog'):
      os.makedirs(root / split / label)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (9, 10, 3), np.uint8)).save(
            root / split / label / f'{i}.png')
  return f'folder:{root}'


def _folder_config(dataset, **overrides):
  return tiny_digits_config(**{'dataset': dataset, 'preprocess': 'cifar', 'batch_size': 4,
                               'eval_batch_size': 4, **overrides})


def _huge_png_header(path, width, height):
  """A PNG whose header declares `width` x `height` 1-bit pixels, without the pixels (the
  file check reads headers only)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))
  header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def test_bad_eval_file_is_refused_before_any_step(tmp_path, monkeypatch):
  dataset = _split_folder(tmp_path / 'images')
  (tmp_path / 'images' / 'test' / 'dog' / '2.png').write_bytes(b'not an image')

  def no_compile(*args, **kwargs):
    raise AssertionError('the check should refuse the data before compiling any step')

  monkeypatch.setattr(parallel, 'compile_steps', no_compile)
  with pytest.raises(UserError, match=r"1 file\(s\) are not readable images: "
                                      r"\['.*test/dog/2.png'\]\. Remove or re-save"):
    loop.train_and_evaluate(_folder_config(dataset), str(tmp_path / 'run'))


def test_file_check_names_the_first_ten_bad_files_and_counts_all(tmp_path):
  _split_folder(tmp_path, per_class=8)
  for i in range(8):
    (tmp_path / 'train' / 'cat' / f'{i}.png').write_bytes(b'')
  for i in range(4):
    (tmp_path / 'test' / 'dog' / f'{i}.png').write_bytes(b'GIF89a truncated')
  with pytest.raises(UserError, match=r"12 file\(s\) are not readable") as error:
    FolderSource(str(tmp_path)).check_files(('train', 'test'))
  assert str(error.value).count('.png') == 10


def test_a_split_that_is_no_folder_names_the_split_folders(tmp_path):
  _split_folder(tmp_path)
  os.rename(tmp_path / 'test', tmp_path / 'val')
  with pytest.raises(UserError, match=r"No split 'test' in image folder .*: its split folders "
                                      r"are train, val\. .*--config\.eval_split=val\)"):
    FolderSource(str(tmp_path)).num_examples('test')


def test_directory_named_like_an_image_is_not_an_image(tmp_path):
  dataset = _split_folder(tmp_path)
  os.makedirs(tmp_path / 'train' / 'cat' / 'photo.jpg')
  (tmp_path / 'train' / 'cat' / 'photo.jpg' / 'inner.png').write_bytes(b'')
  source = FolderSource(str(tmp_path))
  assert source.num_examples('train') == 8
  source.check_files(('train', 'test'))
  pipeline = create_pipeline(_folder_config(dataset, image_size=8, batch_size=8))
  assert next(pipeline.train_batches())['image'].shape == (8, 8, 8, 3)


def test_huge_images_are_refused_from_their_header(tmp_path, monkeypatch):
  _split_folder(tmp_path)
  # A real, decodable PNG that compresses to almost nothing, above a lowered limit.
  Image.new('1', (300, 200)).save(tmp_path / 'test' / 'cat' / 'big.png')
  monkeypatch.setattr(sources, 'MAX_IMAGE_PIXELS', 50_000)
  with pytest.raises(UserError, match=r"1 file\(s\) have more than 50,000 pixels.*"
                                      r"big.png \(300x200\)'\]\. Downscale them") as error:
    FolderSource(str(tmp_path)).check_files(('train', 'test'))
  assert 'not readable' not in str(error.value)


def test_the_20000_pixel_square_png_is_refused_at_the_default_limit(tmp_path):
  _split_folder(tmp_path)
  _huge_png_header(tmp_path / 'train' / 'dog' / 'huge.png', 20_000, 20_000)
  _huge_png_header(tmp_path / 'train' / 'dog' / 'large.png', 10_000, 10_000)  # PIL warns only
  with pytest.raises(UserError, match=r"2 file\(s\) have more than 89,478,485 pixels.*huge.png "
                                      r"\(400,000,000 pixels\).*large.png \(10000x10000\)'\]"):
    FolderSource(str(tmp_path)).check_files(('train', 'test'))


@pytest.mark.slow  # trains in-process: ~30 s loaded
def test_eval_failure_after_training_keeps_that_steps_checkpoint(tmp_path):
  """A truncated JPEG passes the header check and fails only when the evaluation decodes
  it; the step evaluated is saved first, so a rerun does not train it again."""
  dataset = _split_folder(tmp_path / 'images')
  jpeg = tmp_path / 'images' / 'test' / 'cat' / '9.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpeg)
  jpeg.write_bytes(jpeg.read_bytes()[:-1000])  # past the header: only its pixels are lost
  assert sources.header_problem(str(jpeg)) is None
  workdir = str(tmp_path / 'run')
  config = _folder_config(dataset, num_train_steps=2, log_every_steps=1, eval_every_steps=0,
                          checkpoint_every_steps=0)
  with pytest.raises(UserError, match=r"not readable images: \['.*test/cat/9.jpg'\]"):
    loop.train_and_evaluate(config, workdir)
  assert checkpoint_format.saved_steps(run_dir.checkpoint_dir(workdir)) == [2]
