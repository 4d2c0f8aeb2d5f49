"""The image sizes of a run: what it trains at, evaluates at, and resizes to before the
eval crop.

config.train_image_size, eval_image_size and eval_resize_size are 0 by default, meaning
the rule from config.image_size that runs have always used: train and evaluate at
image_size, and (the 'imagenet' recipe) resize the shorter side to image_size / 0.875
before the central crop (256 for 224). torchvision's V2 recipe sets all three: trains at
176, evaluates a 224 crop of images resized to 232.
"""

from typing import NamedTuple

EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize to size / 0.875 (256 for 224), crop


class ImageSizes(NamedTuple):
  train: int  # side of the training crops
  eval: int  # side of the eval crop
  eval_resize: int  # the eval image's shorter side before the central crop ('imagenet')

  @property
  def eval_crop_fraction(self) -> float:
    """The share of the resized image's shorter side that the eval crop keeps."""
    return self.eval / self.eval_resize


def image_sizes(config) -> ImageSizes:
  """The run's sizes, each config key that is 0 by the rule from config.image_size."""
  train = config.train_image_size or config.image_size
  evaluated = config.eval_image_size or config.image_size
  resize = config.eval_resize_size or round(evaluated / EVAL_CROP_FRACTION)
  return ImageSizes(train, evaluated, resize)
