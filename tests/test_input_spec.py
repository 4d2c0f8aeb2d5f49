"""resnet_jax.input_spec: one spec per checkpoint, written by training and conversion, read
back as written; checkpoints without one keep the transform they always had."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import create_model, input_spec
from resnet_jax.train import checkpoint_format, run_dir
from resnet_jax.errors import UserError


def test_a_training_run_writes_its_eval_transform_and_train_recipe(trained_workdir):
  workdir, _ = trained_workdir
  saved = json.loads(open(os.path.join(workdir, 'input_spec.json')).read())
  config = run_dir.read_run_config(workdir)
  assert saved == {'crop_size': config['image_size'], 'resize_size': None,
                   'interpolation': 'bilinear', 'antialias': True, 'mean': [0.3], 'std': [0.4],
                   'train': {k: config[k] for k in input_spec.TRAIN_RECIPE_KEYS if k in config}}
  assert saved['train']['preprocess'] == 'digits' and saved['train']['dataset'] == 'digits'


def test_a_workdir_without_a_spec_gets_its_recipes_transform(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  old = tmp_path / 'old_run'
  shutil.copytree(workdir, old)
  os.remove(old / 'input_spec.json')  # a run of an older version
  spec = input_spec.of_checkpoint(old, num_classes=10, in_channels=1)
  config = run_dir.read_run_config(workdir)
  assert spec == input_spec.of_recipe('digits', config['image_size'])
  assert (spec.resize_size, spec.mean, spec.std) == (None, (0.3,), (0.4,))


def _converted(tmp_path, spec=None):
  model_config = {'name': 'cifar_resnet20', 'num_classes': 1000, 'stage_sizes': (1, 1, 1)}
  model = create_model(**model_config)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  checkpoint_format.save_converted(variables, model_config, tmp_path / 'ckpt', spec)
  return tmp_path / 'ckpt'


def test_a_converted_checkpoint_without_a_spec_gets_torchvisions_imagenet_transform(tmp_path):
  spec = input_spec.of_checkpoint(_converted(tmp_path))
  assert (spec.resize_size, spec.crop_size, spec.interpolation, spec.class_names) == (
      256, 224, 'bilinear', 'imagenet-1k')
  assert spec.statistics_name() == 'imagenet'


def test_a_converted_checkpoint_reads_its_spec_back_and_stays_a_converted_checkpoint(tmp_path):
  written = input_spec.InputSpec(crop_size=160, resize_size=168, interpolation='bicubic',
                                 mean=(0.5,) * 3, std=(0.5,) * 3, class_names='imagenet-1k',
                                 crop_pct=0.95)
  directory = _converted(tmp_path, written.to_json())
  assert input_spec.of_checkpoint(directory) == written
  assert checkpoint_format.is_converted_checkpoint(directory)
  assert written.statistics_name() == 'centered'


@pytest.mark.parametrize('fields, message', [
    ({'crop_size': 224, 'resize_size': 256, 'interpolation': 'lanczos5'}, 'interpolation'),
    ({'crop_size': 224, 'resize_size': 256, 'colour': 'yes'}, r"unknown keys \['colour'\]"),
    ({'crop_size': 224, 'resize_size': 256, 'antialias': False}, 'antialias'),
    ({'crop_size': 224}, 'resize_size'),
])
def test_a_bad_spec_file_is_one_message(tmp_path, fields, message):
  directory = _converted(tmp_path)
  (directory / 'input_spec.json').write_text(json.dumps(fields))
  with pytest.raises(UserError, match=message):
    input_spec.of_checkpoint(directory)


def test_the_square_resize_and_the_crop_are_torchvisions():
  import torch
  from torchvision import transforms
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 37, 3), np.uint8))
  for spec, reference in [
      (input_spec.InputSpec(crop_size=24, resize_size=None, interpolation='bicubic'),
       transforms.Resize((24, 24), transforms.InterpolationMode.BICUBIC)),
      (input_spec.InputSpec(crop_size=24, resize_size=29, interpolation='nearest'),
       transforms.Compose([transforms.Resize(29, transforms.InterpolationMode.NEAREST),
                           transforms.CenterCrop(24)]))]:
    expected = transforms.Compose([reference, transforms.ToTensor(), transforms.Normalize(
        spec.mean, spec.std)])(image)
    np.testing.assert_allclose(spec.transform(3)(image),
                               torch.permute(expected, (1, 2, 0)).numpy(), atol=2e-6)


@pytest.mark.parametrize('saved, expected', [
    # torchvision's V2 recipe: trained at 176, evaluated on 224 crops of 232.
    ({'preprocess': 'imagenet', 'image_size': 224, 'train_image_size': 176,
      'eval_image_size': 224, 'eval_resize_size': 232}, (224, 232)),
    # A run from before the size keys: image_size, resized by 256/224.
    ({'preprocess': 'imagenet', 'image_size': 160}, (160, 183)),
    (None, (224, 256)),  # a converted checkpoint: ImageNet's
])
def test_a_workdirs_spec_evaluates_at_its_eval_sizes(tmp_path, saved, expected):
  if saved is not None:
    (tmp_path / run_dir.CONFIG_JSON).write_text(json.dumps(saved))
    (tmp_path / run_dir.CHECKPOINTS_DIR).mkdir()
  spec = input_spec.of_checkpoint(tmp_path)
  assert (spec.crop_size, spec.resize_size) == expected
  assert spec.mean == input_spec.CONVERTED_DEFAULT.mean


def test_a_spec_at_another_crop_size_scales_its_resize():
  """timm's rule where the spec has a crop_pct (floor(crop / crop_pct)), else the same
  ratio of resize to crop (torchvision V2's 232/224)."""
  timm = input_spec.InputSpec(crop_size=224, resize_size=235, crop_pct=0.95,
                              interpolation='bicubic')
  assert timm.at_crop_size(288).resize_size == 303  # timm: int(288 / 0.95)
  tv2 = input_spec.InputSpec(crop_size=224, resize_size=232)
  assert tv2.at_crop_size(160).resize_size == round(160 * 232 / 224)
  square = input_spec.InputSpec(crop_size=8, resize_size=None)
  assert square.at_crop_size(16) == input_spec.InputSpec(crop_size=16, resize_size=None)
