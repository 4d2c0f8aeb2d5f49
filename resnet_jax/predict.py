"""Classify images with a checkpoint: the top-k classes and their probabilities.

  python -m resnet_jax.predict --checkpoint ckpt/ cat.jpg dog.png

Preprocessing is torchvision's ImageNet evaluation transform: resize the shorter side to
256 (bilinear) and center-crop 224 with PIL, then scale to [0, 1] and normalize with the
ImageNet mean and std, as the train and eval steps do (`normalization.normalize`).
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from resnet_jax.data.normalization import normalize

RESIZE_SIZE = 256
CROP_SIZE = 224
CLASS_NAMES_FILE = Path(__file__).with_name('imagenet_classes.txt')


def imagenet_class_names() -> List[str]:
  """The 1000 ImageNet-1k class names in index order (torchvision's categories)."""
  return CLASS_NAMES_FILE.read_text().splitlines()


def preprocess(image, resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE) -> np.ndarray:
  """A PIL image -> normalized float32 (crop_size, crop_size, 3), as torchvision's
  Resize(256) + CenterCrop(224) + ToTensor + Normalize compute it (but HWC)."""
  from PIL import Image

  image = image.convert('RGB')  # grayscale, palette, RGBA (alpha dropped), CMYK
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
  return np.asarray(normalize(np.asarray(image), 'imagenet'))


def read_image(path: Path) -> np.ndarray:
  """Preprocessed pixels of an image file; OSError/ValueError if it cannot be decoded."""
  from PIL import Image

  with Image.open(path) as image:
    image.load()
    return preprocess(image)


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
  parser.add_argument('images', nargs='+', type=Path, help='image files (JPEG, PNG, ...)')
  return parser


def main(argv=None) -> int:
  """Entry point of `python -m resnet_jax.predict`."""
  parser = _parser()
  args = parser.parse_args(argv)
  batch, names = [], []
  for path in args.images:
    try:
      batch.append(read_image(path))
      names.append(path)
    except (OSError, ValueError) as e:
      print(f'skipping {path}: cannot read it as an image ({e})', file=sys.stderr)
  if not batch:
    parser.exit(1, f'{parser.prog}: error: none of the {len(args.images)} image(s) '
                   f'could be read.\n')

  import jax
  from resnet_jax.load import load_model
  from resnet_jax.pretrained import load_pretrained

  try:
    model, variables = (load_pretrained(args.pretrained) if args.pretrained
                        else load_model(args.checkpoint))
  except ValueError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  if not model.num_classes:
    parser.exit(2, f'{parser.prog}: error: the model in {args.checkpoint or args.pretrained} '
                   f'has no classifier head (num_classes=0).\n')
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, np.stack(batch))
  probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  class_names = imagenet_class_names() if model.num_classes == 1000 else None
  for path, row in zip(names, probabilities):
    print(path)
    print('\n'.join(format_predictions(row, class_names, args.top_k)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
