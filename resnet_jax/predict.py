"""Classify images with a checkpoint: the top-k classes and their probabilities.

  python -m resnet_jax.predict --checkpoint ckpt/ cat.jpg dog.png
  python -m resnet_jax.predict --pretrained resnet50.tv2_in1k cat.jpg

Preprocessing follows the checkpoint's input spec (`resnet_jax.input_spec`): pretrained
weights bring their own (ResNet-50 V2: resize the shorter side to 232, bilinear and
antialiased, center-crop 224, as `ResNet50_Weights.IMAGENET1K_V2.transforms()`; timm's
weights their crop_pct, interpolation, size, mean and std); a training workdir its run's
eval transform; a converted checkpoint without a spec torchvision's ImageNet one (resize
256, crop 224). Images are converted to the model's channels (grayscale for 1, RGB for 3)
with PIL, resized, cropped, scaled to [0, 1] and normalized with the spec's mean and std.
Class names are the spec's (ImageNet-1k's for ImageNet weights), else class indices.

Images over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are skipped
with a message, as undecodable ones are; the others are still classified. Images are read
and classified BATCH at a time, each batch printed when done, so any number of them fits
in memory.
"""

import argparse
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from resnet_jax import input_spec
from resnet_jax.accelerators import quiet_libtpu_without_tpu
from resnet_jax.errors import UserError
from resnet_jax.input_spec import imagenet_class_names  # noqa: F401 (public here too)

BATCH = 32  # images per forward pass


def imagenet_eval_transform(image) -> np.ndarray:
  """torchvision's ImageNet evaluation transform of a PIL image (resize 256 bilinear,
  crop 224, normalize): what a checkpoint without an input spec gets."""
  return input_spec.CONVERTED_DEFAULT.transform(3)(image)


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
  if args.top_k < 1:
    parser.error(f'--top-k {args.top_k}: pass 1 or more.')
  quiet_libtpu_without_tpu()

  import jax
  from resnet_jax.pretrained import input_spec as pretrained_input_spec, load_pretrained
  from resnet_jax.train.checkpoint_format import load_model

  try:
    if args.pretrained:
      model, variables = load_pretrained(args.pretrained)
      spec = pretrained_input_spec(args.pretrained)
    else:
      model, variables = load_model(args.checkpoint, args.raw_weights)
      spec = input_spec.of_checkpoint(args.checkpoint, model.num_classes, model.in_channels)
    transform = spec.transform(model.in_channels)
  except UserError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  if not model.num_classes:
    parser.exit(2, f'{parser.prog}: error: the model in {args.checkpoint or args.pretrained} '
                   f'has no classifier head (num_classes=0).\n')
  class_names = spec.names()
  if class_names is not None and len(class_names) != model.num_classes:
    class_names = None  # a head of another size (a fine-tuned model, say): indices
  forward = jax.jit(functools.partial(model.apply, train=False))
  classified = 0
  for start in range(0, len(args.images), BATCH):
    batch, names = _read_images(args.images[start:start + BATCH], transform)
    if not batch:
      continue
    logits = forward(variables, np.stack(batch))
    probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    for path, row in zip(names, probabilities):
      print(path)
      print('\n'.join(format_predictions(row, class_names, args.top_k)), flush=True)
    classified += len(batch)
  if not classified:
    parser.exit(1, f'{parser.prog}: error: none of the {len(args.images)} image(s) '
                   f'could be read.\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
