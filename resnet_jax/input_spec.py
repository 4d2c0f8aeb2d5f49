"""How a checkpoint's images become its inputs: one `InputSpec` per checkpoint.

A spec says how to resize (the shorter side to `resize_size`, with `interpolation`,
antialiased as PIL and torchvision's `antialias=True` do; or, with no resize_size, the whole
image to a `crop_size` square), the center crop, the mean and std to normalize pixels in
[0, 1] with, and the class names (a name of a list shipped with the package).

Where a checkpoint's spec comes from (`of_checkpoint`):
  - its `input_spec.json` (run_dir reads and writes it): written for pretrained names from
    the weights' own metadata (the table in pretrained_weights.json: torchvision's
    `weights.transforms()`, timm's pretrained_cfg), and for a training workdir from its
    config (`of_run`, with the train-time recipe under 'train');
  - else a workdir's config.json (`preprocess`, `image_size`: `of_recipe`);
  - else, for a converted checkpoint, torchvision's ImageNet transform at 224 (resize 256).
predict, export and evaluate (data.spec_eval) apply it.
"""

import dataclasses
import functools
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from resnet_jax.data.normalization import RECIPE_STATISTICS, STATISTICS, checked_recipe
from resnet_jax.data.sizes import EVAL_CROP_FRACTION, image_sizes
from resnet_jax.errors import UserError

CLASS_NAME_FILES = {'imagenet-1k': Path(__file__).with_name('imagenet_classes.txt')}
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic')
IMAGENET_CROP = 224  # torchvision's ImageNet evaluation: a 224 crop of 256 (data.sizes)
# The config keys that make a workdir's train-time recipe (recorded under 'train').
TRAIN_RECIPE_KEYS = ('dataset', 'train_split', 'preprocess', 'image_size', 'train_image_size',
                     'auto_augment', 'random_erase', 'repeated_augmentation',
                     'label_smoothing', 'mixup_alpha', 'cutmix_alpha', 'loss',
                     'bce_target_thresh', 'drop_path_rate', 'ema_decay')


def imagenet_class_names() -> List[str]:
  """The 1000 ImageNet-1k class names in index order (torchvision's categories)."""
  return CLASS_NAME_FILES['imagenet-1k'].read_text().splitlines()


def assumed_class_names(num_classes: int) -> Optional[str]:
  """The class names a model with no record of its classes is taken to have:
  ImageNet-1k's for 1000 classes (as predict always assumed), none otherwise."""
  return 'imagenet-1k' if num_classes == 1000 else None


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """The evaluation transform of a checkpoint: resize, center crop, normalize."""
  crop_size: int
  resize_size: Optional[int]  # shorter side, then a center crop; None: a crop_size square
  interpolation: str = 'bilinear'
  antialias: bool = True
  mean: Tuple[float, ...] = STATISTICS['imagenet'][0]
  std: Tuple[float, ...] = STATISTICS['imagenet'][1]
  class_names: Optional[str] = None  # a key of CLASS_NAME_FILES
  crop_pct: Optional[float] = None  # timm's ratio crop / resize, kept for the record
  train: Optional[Dict[str, Any]] = None  # a workdir's train-time recipe

  def to_json(self) -> Dict[str, Any]:
    fields = dataclasses.asdict(self)
    fields['mean'], fields['std'] = list(self.mean), list(self.std)
    return {k: v for k, v in fields.items() if v is not None or k == 'resize_size'}

  @classmethod
  def from_json(cls, fields: Mapping[str, Any], where: str = 'the input spec') -> 'InputSpec':
    """The spec of a JSON object, or one UserError saying what is wrong in `where`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    try:
      if unknown:
        raise ValueError(f'unknown keys {unknown}')
      spec = cls(**{**fields, 'mean': tuple(fields.get('mean', cls.mean)),
                    'std': tuple(fields.get('std', cls.std))})
      spec.check()
    except (TypeError, ValueError) as e:
      raise UserError(f'{where} is not a valid input spec ({e}); expected keys among '
                      f'{sorted(known)}.') from None
    return spec

  def check(self) -> None:
    """ValueError unless the fields describe a transform `transform` can apply."""
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f'interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}')
    if not self.antialias:
      raise ValueError('antialias=False: PIL resizes (as torchvision on images) antialiased')
    if self.class_names is not None and self.class_names not in CLASS_NAME_FILES:
      raise ValueError(f'class_names {self.class_names!r} is not one of {list(CLASS_NAME_FILES)}')
    if len(self.mean) != len(self.std) or self.crop_size < 1:
      raise ValueError(f'mean {self.mean}, std {self.std}, crop_size {self.crop_size}')

  def names(self) -> Optional[List[str]]:
    """The class names, or None when the spec names none."""
    if self.class_names is None:
      return None
    return CLASS_NAME_FILES[self.class_names].read_text().splitlines()

  def statistics_name(self) -> Optional[str]:
    """The name in normalization.STATISTICS of this mean and std, if there is one."""
    for name, (mean, std) in STATISTICS.items():
      if np.allclose(mean, self.mean, atol=1e-6) and np.allclose(std, self.std, atol=1e-6):
        return name
    return None

  def check_channels(self, channels: int) -> None:
    """A UserError unless the mean and std fit images of `channels` channels."""
    if len(self.mean) not in (1, channels):
      raise UserError(f'The checkpoint normalizes {len(self.mean)}-channel images, but its '
                      f'model takes {channels}.')

  def at_crop_size(self, crop_size: int) -> 'InputSpec':
    """This transform for crops of `crop_size`: the resize keeps its ratio to the crop
    (timm's rule, floor(crop / crop_pct), where the spec has a crop_pct)."""
    if crop_size == self.crop_size or self.resize_size is None:
      return dataclasses.replace(self, crop_size=crop_size)
    if self.crop_pct:
      resize = int(crop_size / self.crop_pct)
    else:
      resize = round(crop_size * self.resize_size / self.crop_size)
    return dataclasses.replace(self, crop_size=crop_size, resize_size=resize)

  def transform(self, channels: int) -> Callable:
    """A function PIL image -> normalized float32 (crop_size, crop_size, channels)."""
    self.check_channels(channels)
    return functools.partial(apply, self, MODES[channels])


MODES = {1: 'L', 3: 'RGB'}  # PIL mode of the images a model of N input channels takes


def _resized_size(width: int, height: int, shorter: int) -> Tuple[int, int]:
  # torchvision keeps the short side exact and truncates the long one.
  if width <= height:
    return shorter, int(shorter * height / width)
  return int(shorter * width / height), shorter


def apply(spec: InputSpec, mode: str, image) -> np.ndarray:
  """`spec`'s transform of a PIL image, as torchvision's Resize + CenterCrop + ToTensor +
  Normalize compute it on PIL images (but HWC): float32 (crop, crop, channels of mode)."""
  from PIL import Image
  from resnet_jax.data.normalization import normalize_with

  image = image.convert(mode)  # grayscale, palette, RGBA (alpha dropped), CMYK
  resample = getattr(Image, spec.interpolation.upper())
  crop = spec.crop_size
  if spec.resize_size is None:
    size = (crop, crop)
  else:
    size = _resized_size(*image.size, spec.resize_size)
  if image.size != size:
    image = image.resize(size, resample)
  top = int(round((size[1] - crop) / 2.0))
  left = int(round((size[0] - crop) / 2.0))
  if (left, top) != (0, 0) or size != (crop, crop):
    image = image.crop((left, top, left + crop, top + crop))
  pixels = np.asarray(image)
  pixels = pixels[..., None] if pixels.ndim == 2 else pixels
  return np.asarray(normalize_with(pixels, spec.mean, spec.std))


def of_recipe(recipe: str, image_size: int, class_names: Optional[str] = None,
              resize_size: int = 0) -> InputSpec:
  """The eval transform of a training recipe (config.preprocess), as the eval pipeline does
  it: 'imagenet' resizes the shorter side to resize_size (0: data.sizes' rule, 256 for 224) and
  center-crops, the others resize to the square."""
  mean, std = STATISTICS[RECIPE_STATISTICS[checked_recipe(recipe)]]
  resize = None
  if recipe == 'imagenet':
    resize = resize_size or round(image_size / EVAL_CROP_FRACTION)
  return InputSpec(crop_size=int(image_size), resize_size=resize, mean=mean, std=std,
                   class_names=class_names)


def of_config(config: Mapping[str, Any], class_names: Optional[str] = None) -> InputSpec:
  """The eval transform of a run's config (a ConfigDict or its config.json): its recipe at
  its eval sizes (data.sizes; runs from before the size keys evaluate at image_size)."""
  sizes = image_sizes(types.SimpleNamespace(
      image_size=config['image_size'],
      **{key: config.get(key, 0) for key in ('train_image_size', 'eval_image_size',
                                             'eval_resize_size')}))
  return of_recipe(config['preprocess'], sizes.eval, class_names, sizes.eval_resize)


def of_run(config: Mapping[str, Any], num_classes: int) -> InputSpec:
  """A training run's spec: its recipe's eval transform and its train-time recipe."""
  spec = of_config(config, assumed_class_names(num_classes))
  train = {k: config[k] for k in TRAIN_RECIPE_KEYS if k in config}
  return dataclasses.replace(spec, train=_plain(train))


def _plain(value):
  """JSON-able copies of config values (ml_collections' ConfigDicts and tuples)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


# A converted checkpoint without a spec (torchvision/timm weights converted before specs).
CONVERTED_DEFAULT = of_recipe('imagenet', IMAGENET_CROP, 'imagenet-1k')


def converted_default(num_classes: int) -> InputSpec:
  """The spec of converted weights with no name: torchvision's ImageNet transform."""
  return dataclasses.replace(CONVERTED_DEFAULT, class_names=assumed_class_names(num_classes))


def of_checkpoint(checkpoint: Path, num_classes: int = 1000, in_channels: int = 3) -> InputSpec:
  """A checkpoint directory's spec: its input_spec.json; else a workdir's config.json;
  else (a converted checkpoint of older versions) torchvision's ImageNet transform. A
  UserError when the model's images are neither grayscale nor RGB, or when a converted
  checkpoint without a spec holds a model that does not take RGB images."""
  from resnet_jax.train import run_dir

  if in_channels not in MODES:
    raise UserError(f'The model in {checkpoint} takes {in_channels}-channel images; images '
                    f'are read as grayscale (1 channel) or RGB (3).')
  saved = run_dir.read_input_spec(checkpoint)
  if saved is not None:
    return InputSpec.from_json(saved, str(Path(checkpoint) / run_dir.INPUT_SPEC_JSON))
  if run_dir.is_training_workdir(checkpoint):
    config = run_dir.read_run_config(checkpoint)
    if config is None:
      raise UserError(f'Cannot read the run settings of the workdir {checkpoint} (its '
                      f'{run_dir.CONFIG_JSON}); the input transform comes from its '
                      f'preprocess and image_size.')
    return of_config(config, assumed_class_names(num_classes))
  if in_channels != 3:
    raise UserError(f'{checkpoint} holds a {in_channels}-channel model but no record of how '
                    f'its images were preprocessed (a training workdir keeps one in its '
                    f'{run_dir.INPUT_SPEC_JSON}); the default ImageNet transform fits '
                    f'3-channel models only.')
  return converted_default(num_classes)
