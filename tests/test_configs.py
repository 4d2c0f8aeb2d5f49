"""The recipe configs (torchvision's V2, timm's RSB A1-A3, MLPerf's LARS): each README
command parses, validates and runs a few steps on synthetic data with a tiny model."""

import re

import pytest
from helpers import REPO
from test_config_schema import _parse

from resnet_jax.data.sizes import image_sizes
from resnet_jax.train.config_schema import KEYS, check_config
from resnet_jax.train.loop import train_and_evaluate

RECIPES = ('imagenet_resnet50_tv2', 'imagenet_resnet50_a1', 'imagenet_resnet50_a2',
           'imagenet_resnet50_a3', 'imagenet_resnet50_mlperf', 'imagenet_resnet50_mlperf:gpu')
# Keys of resnet_jax.data.augment (TA-wide, RandAugment, random erasing): dropped from the
# configs where this tree does not have them yet, so the rest of each recipe still runs.
AUGMENT_KEYS = ('auto_augment', 'random_erase')


def _readme_recipe_commands():
  """{config argument: [--config.KEY=VALUE, ...]} of the README's recipe commands."""
  text = (REPO / 'README.md').read_text().replace('\\\n', ' ')
  commands = {}
  for match in re.finditer(r'python train\.py --config configs/(imagenet_resnet50_\w+)\.py'
                           r'(:\w+)?([^\n`]*)', text):
    name = match.group(1) + (match.group(2) or '')
    commands[name] = re.findall(r'--config\.[a-z_]+=\S+', match.group(3))
  return commands


README = _readme_recipe_commands()


def test_readme_shows_every_recipe():
  assert set(RECIPES) <= set(README), set(RECIPES) - set(README)


def _tiny(config):
  """`config` on synthetic data with a 4-block ResNet-50 of small widths, 3 steps; its
  train and eval sizes keep the recipe's relation (smaller, larger or the same)."""
  sizes = image_sizes(config)
  with config.unlocked():
    config.model_overrides.update({'stage_sizes': (1, 1, 1, 1), 'stage_widths': (4, 4, 8, 8)})
  config.update(dict(
      dataset='synthetic', num_classes=10, image_size=64,  # ResNet-50 downsamples by 32
      train_image_size=64 + (sizes.train - sizes.eval) // 8, eval_image_size=64,
      eval_resize_size=0, batch_size=12, eval_batch_size=12, synthetic_train_size=48,
      synthetic_eval_size=12, num_train_steps=3, num_epochs=-1, warmup_steps=1,
      warmup_epochs=0, log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3))
  return config


def _without_missing_augment_keys(config):
  with config.unlocked():
    for key in AUGMENT_KEYS:
      if key not in KEYS and key in config:
        del config[key]
  return config


@pytest.mark.slow  # a ResNet-50 train step per recipe: 15-90 s each
@pytest.mark.parametrize('name', RECIPES)
def test_recipe_readme_command_runs_a_few_steps_on_synthetic_data(tmp_path, name):
  file, _, setting = name.partition(':')
  config = _without_missing_augment_keys(
      _parse(f'configs/{file}.py' + (f':{setting}' if setting else ''), README[name]))
  check_config(config, num_devices=1)
  results = train_and_evaluate(_tiny(config), str(tmp_path))
  assert 0 <= results['top1'] <= 1


@pytest.mark.parametrize('name, expected', [
    ('imagenet_resnet50_tv2', dict(batch_size=1024, learning_rate=0.5, ema_decay=0.99998,
                                   train_image_size=176, eval_resize_size=232,
                                   repeated_augmentation=4, num_epochs=600)),
    ('imagenet_resnet50_a1', dict(optimizer='lamb', learning_rate=5e-3, batch_size=2048,
                                  num_epochs=600, weight_decay=0.01, label_smoothing=0.1,
                                  repeated_augmentation=3, drop_path_rate=0.05)),
    ('imagenet_resnet50_a2', dict(num_epochs=300, weight_decay=0.02, mixup_alpha=0.1,
                                  label_smoothing=0.0, repeated_augmentation=3)),
    ('imagenet_resnet50_a3', dict(num_epochs=100, learning_rate=8e-3, train_image_size=160,
                                  eval_image_size=224, repeated_augmentation=1,
                                  drop_path_rate=0.0)),
    ('imagenet_resnet50_mlperf', dict(optimizer='lars', batch_size=32_768,
                                      schedule='polynomial', polynomial_power=2.0,
                                      num_train_steps=2355, warmup_steps=625)),
    ('imagenet_resnet50_mlperf:gpu', dict(batch_size=3264, learning_rate=10.5,
                                          weight_decay=5e-5, num_train_steps=14_523)),
])
def test_recipe_values_are_the_published_ones(name, expected):
  file, _, setting = name.partition(':')
  config = _parse(f'configs/{file}.py' + (f':{setting}' if setting else ''), [])
  assert {key: config[key] for key in expected} == expected
