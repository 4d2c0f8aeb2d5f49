"""Tests of `python -m resnet_jax.evaluate`."""

import numpy as np
import pytest
from PIL import Image

from resnet_jax import evaluate
from resnet_jax.data.sources import DatasetNotPreparedError
from resnet_jax.errors import UserError


def test_evaluate_workdir_matches_the_in_training_eval(trained_workdir, capsys):
  workdir, in_training = trained_workdir
  results = evaluate.main(['--workdir', workdir])
  assert results == in_training
  assert 'top-1' in capsys.readouterr().out


def test_evaluate_checkpoint_directory(trained_workdir):
  workdir, in_training = trained_workdir
  results = evaluate.evaluate(checkpoint=workdir, dataset='digits', preprocess='digits',
                              image_size=8, split='test')
  assert results['top1'] == in_training['top1'] and results['count'] == 360


def test_a_checkpoints_input_spec_gives_the_image_size(trained_workdir):
  workdir, in_training = trained_workdir
  results = evaluate.evaluate(checkpoint=workdir, dataset='digits', preprocess='digits',
                              split='test')  # no image_size: the spec's 8, not 224
  assert results['top1'] == in_training['top1'] and results['count'] == 360


# A timm spec unlike our recipes: bicubic, crop_pct 0.95, mean = std = 0.5 (as
# resnet50d.ra4_e3600_r224_in1k's, at a small size).
TIMM_SPEC = {'crop_size': 20, 'resize_size': 21, 'crop_pct': 0.95, 'interpolation': 'bicubic',
             'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5], 'class_names': None}


@pytest.fixture(scope='module')
def converted_with_timm_spec(tmp_path_factory):
  """(a converted checkpoint of a tiny 3-class model with TIMM_SPEC, an image folder of
  odd-sized photographs-like PNGs with train/ and val/ splits)."""
  import jax
  from helpers import TINY_MODEL
  from resnet_jax.models import create_model
  from resnet_jax.train import checkpoint_format
  root = tmp_path_factory.mktemp('spec_eval')
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for label in range(3):
      (root / 'images' / split / f'c{label}').mkdir(parents=True)
      for i in range(3):
        size = (int(rng.integers(23, 41)), int(rng.integers(23, 41)))
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'images' / split / f'c{label}' / f'{i}.png')
  config = {'name': 'resnet18', **TINY_MODEL, 'num_classes': 3}
  model = create_model(**config)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 20, 20, 3), np.float32))
  checkpoint_format.save_converted(variables, config, root / 'converted', TIMM_SPEC)
  return root / 'converted', root / 'images'


def _timm_transformed(folder):
  """timm's own eval transform of TIMM_SPEC (create_transform, torchvision underneath) of
  every image of `folder`, NHWC, with labels, in sorted order."""
  timm_data = pytest.importorskip('timm.data')
  transform = timm_data.create_transform(
      input_size=(3, 20, 20), interpolation='bicubic', crop_pct=0.95, mean=(0.5,) * 3,
      std=(0.5,) * 3)
  paths = sorted(folder.glob('*/*.png'))
  images = np.stack([transform(Image.open(p).convert('RGB')).numpy().transpose(1, 2, 0)
                     for p in paths])
  return images, np.array([int(p.parent.name[1:]) for p in paths])


def test_a_converted_checkpoint_is_evaluated_with_its_own_spec(converted_with_timm_spec):
  """The batches evaluate feeds are timm's transform of the images (not our 'imagenet'
  recipe: bilinear, 0.875, ImageNet statistics), and the loss is the model's on them."""
  import jax
  import optax
  from resnet_jax import input_spec
  from resnet_jax.data import create_pipeline
  from resnet_jax.data.spec_eval import SpecEvalPipeline
  from resnet_jax.train import checkpoint_format
  checkpoint, images = converted_with_timm_spec
  expected, labels = _timm_transformed(images / 'val')
  config = evaluate._dataset_config(None, {'dataset': f'folder:{images}', 'image_size': 20})
  spec = input_spec.of_checkpoint(checkpoint, 3)
  _, batches = SpecEvalPipeline(create_pipeline(config), spec, 3).eval_batches('val', 16)
  batch = next(iter(batches()))
  assert batch['mask'].tolist() == [1] * 9 + [0] * 7
  fed = batch['image'][:9]
  order = np.argsort(batch['label'][:9], kind='stable')  # files are read in a seeded order
  matched = [min(range(9), key=lambda j: np.abs(fed[i] - expected[j]).max()) for i in order]
  assert sorted(matched) == list(range(9))
  # PIL's bicubic, as timm's (torchvision's) on PIL images: equal up to float rounding.
  np.testing.assert_allclose(fed[order], expected[matched], atol=1e-5)
  assert (labels[matched] == batch['label'][:9][order]).all()

  results = evaluate.evaluate(checkpoint=str(checkpoint), dataset=f'folder:{images}',
                              split='val', batch_size=8)
  model, variables = checkpoint_format.load_model(checkpoint)
  logits = model.apply(variables, expected, train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert results['count'] == 9
  np.testing.assert_allclose(results['loss'], float(loss), rtol=1e-5)
  top1 = float(np.mean(np.argmax(jax.device_get(logits), -1) == labels))
  assert results['top1'] == pytest.approx(top1)


def test_pretrained_names_are_evaluated_with_their_own_spec():
  """--pretrained NAME evaluates with NAME's table spec (at --image_size when given);
  --preprocess picks a recipe instead."""
  name = 'timm/resnet50d.ra4_e3600_r224_in1k'
  spec = evaluate._applied_spec(None, name, {})
  assert (spec.crop_size, spec.resize_size, spec.interpolation, spec.mean, spec.std) == (
      224, 235, 'bicubic', (0.5,) * 3, (0.5,) * 3)
  assert evaluate._applied_spec(None, name, {'image_size': 288}).resize_size == 303
  assert evaluate._applied_spec(None, name, {'preprocess': 'imagenet'}) is None


def test_a_recipe_that_is_not_the_checkpoints_transform_is_warned_of(converted_with_timm_spec,
                                                                     caplog):
  """--preprocess chooses a recipe over the checkpoint's own spec, with a warning."""
  checkpoint, images = converted_with_timm_spec
  evaluate.evaluate(checkpoint=str(checkpoint), dataset=f'folder:{images}',
                    preprocess='imagenet', image_size=20, split='val', batch_size=8)
  warned = [r.getMessage() for r in caplog.records if 'not the preprocessing' in r.getMessage()]
  assert len(warned) == 1, caplog.text
  assert 'interpolation bilinear (its own: bicubic)' in warned[0]
  assert 'mean (0.485, 0.456, 0.406) (its own: (0.5, 0.5, 0.5))' in warned[0]


def test_a_run_with_a_weight_ema_is_evaluated_with_it(tmp_path, capsys):
  """A workdir is read with the weight EMA its run kept (and says so in one line);
  --raw_weights reads the trained weights. Each matches the evaluation the run reported
  for it (eval_ema/... and eval/...)."""
  from helpers import tiny_digits_config
  from resnet_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path)
  in_training = train_and_evaluate(tiny_digits_config(ema_decay=0.999, ema_every_steps=1),
                                   workdir)
  capsys.readouterr()
  ema = evaluate.main(['--workdir', workdir])
  assert capsys.readouterr().out.count('Using the weight EMA of checkpoint 4 in ') == 1
  raw = evaluate.main(['--workdir', workdir, '--raw_weights'])
  assert 'weight EMA' not in capsys.readouterr().out
  assert ema == {k[len('ema_'):]: v for k, v in in_training.items() if k.startswith('ema_')}
  assert raw == {k: v for k, v in in_training.items() if not k.startswith('ema_')}
  assert ema['loss'] != raw['loss']


@pytest.mark.parametrize('flag', ['--batch_size', '--image_size'])
@pytest.mark.parametrize('value', ['0', '-4'])
def test_a_size_below_one_is_one_message(flag, value, tmp_path):
  """Before: --batch_size 0 was taken for the default, --image_size 0 or -4 ended in a
  ZeroDivisionError or TensorFlow's ValueError."""
  with pytest.raises(SystemExit, match=f'Error: {flag} {value}: pass a positive number'):
    evaluate.main(['--workdir', str(tmp_path), flag, value])


def test_an_empty_source_is_one_message():  # an unset "$WORKDIR"; it was a TypeError
  with pytest.raises(SystemExit, match='Error: Pass exactly one of --workdir'):
    evaluate.main(['--workdir', ''])


def test_a_dataset_of_other_classes_or_channels_is_one_message(trained_workdir, tmp_path):
  """Before: 'batch_size=32 is larger than the training split' (the run's training batch,
  which evaluating never reads) for this small folder; with enough images, a ValueError
  traceback for the channels."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for label in ('cat', 'dog'):
      (tmp_path / split / label).mkdir(parents=True)
      for i in range(3):
        Image.fromarray(rng.integers(0, 255, (9, 9, 3), np.uint8)).save(
            tmp_path / split / label / f'{i}.png')
  with pytest.raises(UserError, match=r"The model predicts 10 classes from images of 1 "
                                      r"channel\(s\); dataset 'folder:.*' has 2 classes and 3 "
                                      r"channel\(s\)\. Evaluate it on a dataset of its own"):
    evaluate.evaluate(workdir=trained_workdir[0], dataset=f'folder:{tmp_path}', split='val')


def test_an_unprepared_dataset_names_evaluates_flag(trained_workdir, monkeypatch):
  """The message of a dataset that is not prepared names --data_dir, not train.py's
  --config.data_dir."""
  def not_prepared(config):
    raise DatasetNotPreparedError('Put those files in X, or pass --config.data_dir=DIR where '
                                  'the dataset is already prepared.')
  monkeypatch.setattr(evaluate, 'create_pipeline', not_prepared)
  with pytest.raises(UserError, match=r'or pass --data_dir DIR where the dataset is already'):
    evaluate.evaluate(workdir=trained_workdir[0])
