"""resnet_jax.predict against torchvision's preprocessing and model on the same images."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from resnet_jax import create_model, predict
from resnet_jax.convert import torch_to_flax
from resnet_jax.train.checkpoint_format import save_converted

LINE = re.compile(r'^  (\d+)\. (\d\.\d{6})  +(\d+)  (.+)$')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A converted resnet18 checkpoint with random weights, and the torchvision model."""
  torch.manual_seed(0)
  reference = torchvision.models.resnet18().eval()
  with torch.no_grad():
    reference.fc.weight.mul_(30.0)  # spread the probabilities so the comparison is sharp
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  directory = tmp_path_factory.mktemp('predict') / 'ckpt'
  save_converted(torch_to_flax(reference.state_dict(), 'resnet18'),
                  {'name': 'resnet18', 'num_classes': 1000}, directory)
  return directory, reference


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Images of every mode predict must accept, at sizes that exercise resize and crop."""
  directory = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  pixels = lambda h, w, c: rng.integers(0, 256, (h, w, c), np.uint8)
  files = {
      'rgb.jpg': Image.fromarray(pixels(300, 401, 3)),
      'gray.png': Image.fromarray(pixels(257, 190, 1)[..., 0], mode='L'),
      'rgba.png': Image.fromarray(pixels(230, 230, 4), mode='RGBA'),
      'cmyk.jpg': Image.fromarray(pixels(180, 333, 4), mode='CMYK'),
  }
  for name, image in files.items():
    image.save(directory / name)
  (directory / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  return directory


def torchvision_probabilities(model, path):
  transform = transforms.Compose([
      transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
      transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
  with Image.open(path) as image:
    x = transform(image.convert('RGB'))[None]
  with torch.no_grad():
    return torch.softmax(model(x), dim=-1)[0].numpy()


def parse(stdout):
  """{image path: [(rank, probability, index, name), ...]}."""
  results, current = {}, None
  for line in stdout.splitlines():
    match = LINE.match(line)
    if match:
      rank, prob, index, name = match.groups()
      results[current].append((int(rank), float(prob), int(index), name))
    else:
      current = line
      results[current] = []
  return results


def test_preprocess_matches_torchvision(image_files):
  transform = transforms.Compose([
      transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
      transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
  for name in ('rgb.jpg', 'gray.png', 'rgba.png', 'cmyk.jpg'):
    with Image.open(image_files / name) as image:
      expected = transform(image.convert('RGB')).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(predict.read_image(image_files / name), expected,
                               rtol=0, atol=1e-6, err_msg=name)


def test_predict_prints_top5_matching_torchvision(checkpoint, image_files, capsys):
  directory, reference = checkpoint
  names = ['rgb.jpg', 'gray.png', 'corrupt.jpg', 'rgba.png', 'cmyk.jpg']
  code = predict.main(['--checkpoint', str(directory)] + [str(image_files / n) for n in names])
  out, err = capsys.readouterr()
  assert code == 0
  assert 'skipping' in err and 'corrupt.jpg' in err
  results = parse(out)
  readable = [n for n in names if n != 'corrupt.jpg']
  assert list(results) == [str(image_files / n) for n in readable]
  categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta['categories']
  for name in readable:
    rows = results[str(image_files / name)]
    expected = torchvision_probabilities(reference, image_files / name)
    top5 = np.argsort(-expected)[:5]
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert [r[2] for r in rows] == list(top5), name
    assert [r[3] for r in rows] == [categories[i] for i in top5]
    np.testing.assert_allclose([r[1] for r in rows], expected[top5], rtol=0, atol=2e-5,
                               err_msg=name)
  assert max(r[1] for rows in results.values() for r in rows) > 0.05  # not near-uniform


def test_predict_fails_when_no_image_can_be_read(checkpoint, image_files, capsys):
  directory, _ = checkpoint
  with pytest.raises(SystemExit) as info:
    predict.main(['--checkpoint', str(directory), str(image_files / 'corrupt.jpg'),
                  str(image_files / 'missing.png')])
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert 'corrupt.jpg' in err and 'missing.png' in err and 'none of the 2' in err


def test_predict_prints_indices_for_other_heads(image_files, tmp_path, capsys):
  model = create_model('resnet18', num_classes=12)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  save_converted(variables, {'name': 'resnet18', 'num_classes': 12}, tmp_path / 'ckpt')
  assert predict.main(['--checkpoint', str(tmp_path / 'ckpt'), '--top-k', '3',
                       str(image_files / 'rgb.jpg')]) == 0
  rows = parse(capsys.readouterr().out)[str(image_files / 'rgb.jpg')]
  assert len(rows) == 3 and all(r[3] == f'class {r[2]}' for r in rows)
  assert 0 < sum(r[1] for r in rows) <= 1.0 + 1e-5


def test_class_names_ship_with_the_package():
  names = predict.imagenet_class_names()
  assert len(names) == 1000 and names[0] == 'tench' and names[999] == 'toilet tissue'
  assert names == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta['categories']


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')  # the 224 crop
def test_images_over_the_pixel_limit_are_skipped_and_the_others_predicted(
    checkpoint, tmp_path, capsys, monkeypatch):
  directory, _ = checkpoint
  # PIL warns over the limit and raises over twice it; the 224x224 crop must stay legal.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 30000)
  sizes = {'small.png': 150, 'over.png': 200, 'far_over.png': 250}
  for name, side in sizes.items():
    Image.new('RGB', (side, side), (200, 30, 90)).save(tmp_path / name)
  code = predict.main(['--checkpoint', str(directory)] + [str(tmp_path / n) for n in sizes])
  out, err = capsys.readouterr()
  assert code == 0
  assert list(parse(out)) == [str(tmp_path / 'small.png')]
  for name in ('over.png', 'far_over.png'):
    assert (f'skipping {tmp_path / name}: {sizes[name] ** 2} pixels, over the limit of 30000'
            in err), err
  assert 'resize it first' in err


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """Three 8x8 test digits of sklearn (as the digits dataset stores them) and a larger
  RGB image predict must shrink to 8x8 grayscale: (directory, {name: 8x8 uint8 pixels})."""
  from sklearn.datasets import load_digits
  directory = tmp_path_factory.mktemp('digits')
  digits = np.round(load_digits().images[:3] * (255 / 16)).astype(np.uint8)
  pixels = {f'digit{i}.png': image for i, image in enumerate(digits)}
  for name, image in pixels.items():
    Image.fromarray(image, mode='L').save(directory / name)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(
      directory / 'photo.jpg')
  return directory, pixels


@pytest.mark.parametrize('batch', [predict.BATCH, 2])  # 2: batches, one of them unreadable
def test_predict_uses_a_digits_workdirs_own_channels_and_preprocessing(
    trained_workdir, digit_files, capsys, monkeypatch, batch):
  from resnet_jax.train.checkpoint_format import load_model
  monkeypatch.setattr(predict, 'BATCH', batch)
  workdir, _ = trained_workdir
  directory, pixels = digit_files
  names = list(pixels) + ['photo.jpg']
  assert predict.main(['--checkpoint', workdir, '--top-k', '10']
                      + [str(directory / n) for n in names[:2]]
                      + [str(directory / 'missing1.png'), str(directory / 'missing2.png')]
                      + [str(directory / n) for n in names[2:]]) == 0
  out, err = capsys.readouterr()
  results = parse(out)
  assert list(results) == [str(directory / n) for n in names]
  assert 'missing1.png' in err and 'missing2.png' in err
  model, variables = load_model(workdir)
  mean, std = 0.30, 0.40  # the digits normalization, as the run trained with
  batch = np.stack([(p[..., None] / 255.0 - mean) / std for p in pixels.values()])
  expected = np.asarray(jax.nn.softmax(model.apply(variables, batch.astype(np.float32))))
  for name, row in zip(pixels, expected):
    got = {index: prob for _, prob, index, _ in results[str(directory / name)]}
    np.testing.assert_allclose([got[i] for i in range(10)], row, rtol=0, atol=2e-6,
                               err_msg=name)


def test_predict_refuses_a_one_channel_model_without_its_preprocessing(image_files, tmp_path,
                                                                      capsys):
  spec = {'name': 'cifar_resnet20', 'num_classes': 10, 'in_channels': 1,
          'stage_sizes': (1, 1, 1), 'stage_widths': (4, 8, 16)}
  model = create_model(**spec)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  save_converted(variables, spec, tmp_path / 'ckpt')
  with pytest.raises(SystemExit) as info:
    predict.main(['--checkpoint', str(tmp_path / 'ckpt'), str(image_files / 'rgb.jpg')])
  err = capsys.readouterr().err
  assert info.value.code == 2 and err.count('\n') == 1, err
  assert '1-channel model but no record of how its images were preprocessed' in err


@pytest.mark.parametrize('top_k', ['0', '-2'])  # -2 printed all but the last two classes
def test_top_k_below_one_is_one_message(top_k, tmp_path, capsys):
  with pytest.raises(SystemExit):
    predict.main(['--checkpoint', str(tmp_path), '--top-k', top_k, 'image.jpg'])
  assert f'--top-k {top_k}: pass 1 or more' in capsys.readouterr().err
