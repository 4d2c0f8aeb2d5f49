"""Classify images with a checkpoint: the top-k classes and their probabilities.

  python -m resnet_jax.predict --checkpoint ckpt/ cat.jpg dog.png

Preprocessing follows the checkpoint. A training workdir brings its run's own (config.json:
`preprocess` and `image_size`): the 'imagenet' recipe resizes the shorter side to
image_size * 256/224 and center-crops image_size, the others ('digits', 'cifar', 'none')
resize to image_size x image_size, as the eval pipeline does. A converted checkpoint gets
torchvision's ImageNet evaluation transform: resize the shorter side to 256 (bilinear)
and center-crop 224 with PIL. Images are converted to the model's channels (grayscale for
1, RGB for 3), scaled to [0, 1] and normalized with the recipe's mean and std, as the train
and eval steps do (`normalization.normalize`).

Images over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are skipped
with a message, as undecodable ones are; the others are still classified.
"""

import argparse
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np

from resnet_jax.accelerators import quiet_libtpu_without_tpu
from resnet_jax.data.normalization import (RECIPE_STATISTICS, STATISTICS, checked_recipe,
                                           normalize)
from resnet_jax.errors import UserError

RESIZE_SIZE = 256
CROP_SIZE = 224
CLASS_NAMES_FILE = Path(__file__).with_name('imagenet_classes.txt')
MODES = {1: 'L', 3: 'RGB'}  # PIL mode of the images a model of N input channels takes


def imagenet_class_names() -> List[str]:
  """The 1000 ImageNet-1k class names in index order (torchvision's categories)."""
  return CLASS_NAMES_FILE.read_text().splitlines()


def _pixels(image) -> np.ndarray:
  pixels = np.asarray(image)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def imagenet_eval_transform(image, resize_size: int = RESIZE_SIZE,
                            crop_size: int = CROP_SIZE, mode: str = 'RGB') -> np.ndarray:
  """A PIL image -> normalized float32 (crop_size, crop_size, channels of `mode`), as
  torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize compute it (but HWC)."""
  from PIL import Image

  image = image.convert(mode)  # grayscale, palette, RGBA (alpha dropped), CMYK
  width, height = image.size
  # torchvision keeps the short side exact and truncates the long one.
  if width <= height:
    size = (resize_size, int(resize_size * height / width))
  else:
    size = (int(resize_size * width / height), resize_size)
  image = image.resize(size, Image.BILINEAR)
  top = int(round((size[1] - crop_size) / 2.0))
  left = int(round((size[0] - crop_size) / 2.0))
  image = image.crop((left, top, left + crop_size, top + crop_size))
  return np.asarray(normalize(_pixels(image), 'imagenet'))


def resize_transform(image, image_size: int, statistics: str, mode: str) -> np.ndarray:
  """A PIL image -> normalized float32 (image_size, image_size, channels of `mode`): the
  eval pipeline's transform for the 'digits', 'cifar' and 'none' recipes, an antialiased
  bilinear resize to the square (PIL's, where the pipeline uses TensorFlow's)."""
  from PIL import Image

  image = image.convert(mode)
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(normalize(_pixels(image), statistics))


class Preprocessing(NamedTuple):
  """How images become model inputs: the run's recipe (config.preprocess), the size and
  the channels."""
  recipe: str
  image_size: int
  channels: int

  def transform(self) -> Callable:
    """A function PIL image -> normalized float32 pixels."""
    mode = MODES[self.channels]
    if self.recipe == 'imagenet':
      resize = round(self.image_size * RESIZE_SIZE / CROP_SIZE)
      return functools.partial(imagenet_eval_transform, resize_size=resize,
                               crop_size=self.image_size, mode=mode)
    return functools.partial(resize_transform, image_size=self.image_size,
                             statistics=RECIPE_STATISTICS[self.recipe], mode=mode)


def checkpoint_preprocessing(checkpoint: Path, in_channels: int) -> Preprocessing:
  """A training workdir's own preprocessing (its config.json, read as evaluate reads it);
  torchvision's ImageNet transform for a converted checkpoint of a 3-channel model; a
  UserError when neither applies."""
  from resnet_jax.train import run_dir

  if in_channels not in MODES:
    raise UserError(f'The model in {checkpoint} takes {in_channels}-channel images; predict '
                    f'reads images as grayscale (1 channel) or RGB (3).')
  if run_dir.is_training_workdir(checkpoint):
    config = run_dir.read_run_config(checkpoint)
    if config is None:
      raise UserError(f'Cannot read the run settings of the workdir {checkpoint} (its '
                      f'{run_dir.CONFIG_JSON}); predict takes its preprocess and image_size '
                      f'from there.')
    recipe = checked_recipe(config['preprocess'])
    if len(STATISTICS[RECIPE_STATISTICS[recipe]][0]) not in (1, in_channels):
      raise UserError(f'The run in {checkpoint} normalizes with preprocess={recipe!r}, made '
                      f'for 3-channel images, but its model takes {in_channels}.')
    return Preprocessing(recipe, config['image_size'], in_channels)
  if in_channels != 3:
    raise UserError(f'{checkpoint} holds a {in_channels}-channel model but no record of how '
                    f'its images were preprocessed (a training workdir keeps one in its '
                    f'config.json); predict\'s ImageNet transform fits 3-channel models only.')
  return Preprocessing('imagenet', CROP_SIZE, 3)


def _too_many_pixels(error: Exception) -> str:
  from PIL import Image

  found = re.search(r'\((\d+) pixels\)', str(error))
  pixels = f'{found.group(1)} pixels' if found else 'too many pixels'
  return (f'{pixels}, over the limit of {Image.MAX_IMAGE_PIXELS} '
          f'(PIL.Image.MAX_IMAGE_PIXELS, against decompression bombs); resize it first')


def read_image(path: Path, transform: Callable = imagenet_eval_transform) -> np.ndarray:
  """`transform`ed pixels of an image file; OSError/ValueError if it cannot be decoded,
  a UserError if it has more pixels than PIL's decompression-bomb limit."""
  from PIL import Image

  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    try:
      image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise UserError(_too_many_pixels(e)) from None
  with image:
    image.load()
    return transform(image)


def format_predictions(probabilities: np.ndarray, class_names: Optional[Sequence[str]],
                       top_k: int) -> List[str]:
  """Lines `  rank. probability  index  name` for the top_k classes of one image."""
  order = np.argsort(-probabilities, kind='stable')[:top_k]
  lines = []
  for rank, index in enumerate(order, 1):
    name = class_names[index] if class_names else f'class {index}'
    lines.append(f'  {rank}. {probabilities[index]:.6f}  {index:4d}  {name}')
  return lines


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m resnet_jax.predict',
      description='Print the top classes of images with a resnet_jax checkpoint.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', type=Path,
                      help='checkpoint directory (converted, or a training workdir)')
  source.add_argument('--pretrained', help='pretrained weights by name, e.g. resnet50.tv2_in1k '
                      '(resnet_jax.list_pretrained())')
  parser.add_argument('--top-k', type=int, default=5, help='classes to print per image')
  parser.add_argument('--raw_weights', action='store_true',
                      help='with a training workdir: its trained weights, not its weight EMA '
                           '(used by default when the run kept one)')
  parser.add_argument('images', nargs='+', type=Path, help='image files (JPEG, PNG, ...)')
  return parser


def _read_images(paths: Sequence[Path], transform: Callable):
  """(pixels, paths) of the images that could be read; a line on stderr for each other."""
  batch, names = [], []
  for path in paths:
    try:
      batch.append(read_image(path, transform))
      names.append(path)
    except UserError as e:
      print(f'skipping {path}: {e}', file=sys.stderr)
    except (OSError, ValueError) as e:
      print(f'skipping {path}: cannot read it as an image ({e})', file=sys.stderr)
  return batch, names


def main(argv=None) -> int:
  """Entry point of `python -m resnet_jax.predict`."""
  parser = _parser()
  args = parser.parse_args(argv)
  quiet_libtpu_without_tpu()

  import jax
  from resnet_jax.pretrained import load_pretrained
  from resnet_jax.train.checkpoint_format import load_model

  try:
    if args.pretrained:
      model, variables = load_pretrained(args.pretrained)
      transform = Preprocessing('imagenet', CROP_SIZE, 3).transform()
    else:
      model, variables = load_model(args.checkpoint, args.raw_weights)
      transform = checkpoint_preprocessing(args.checkpoint, model.in_channels).transform()
  except ValueError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  if not model.num_classes:
    parser.exit(2, f'{parser.prog}: error: the model in {args.checkpoint or args.pretrained} '
                   f'has no classifier head (num_classes=0).\n')
  batch, names = _read_images(args.images, transform)
  if not batch:
    parser.exit(1, f'{parser.prog}: error: none of the {len(args.images)} image(s) '
                   f'could be read.\n')
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, np.stack(batch))
  probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  class_names = imagenet_class_names() if model.num_classes == 1000 else None
  for path, row in zip(names, probabilities):
    print(path)
    print('\n'.join(format_predictions(row, class_names, args.top_k)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
