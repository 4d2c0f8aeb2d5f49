"""`python -m resnet_jax.summary`: the shapes torchvision's forward hooks report, and GFLOPs."""

import re

import pytest

from resnet_jax import summary


def _stage_rows(output):
  return dict(re.findall(r'^(layer\d)\s+Stage\s+(\S+)', output, re.MULTILINE))


def test_resnet34_stages(capsys):
  summary.main(['resnet34', '--image-size', '224', '--depth', '1'])
  out = capsys.readouterr().out
  assert _stage_rows(out) == {'layer1': '64x56x56', 'layer2': '128x28x28',
                              'layer3': '256x14x14', 'layer4': '512x7x7'}
  # torchvision publishes 3.66 GFLOPS for resnet34.
  assert '21,797,672 parameters, 3.664 GFLOPs' in out


def test_resnet50_stages_and_layers(capsys):
  summary.main(['resnet50', '--depth', '3'])
  out = capsys.readouterr().out
  assert _stage_rows(out) == {'layer1': '256x56x56', 'layer2': '512x28x28',
                              'layer3': '1024x14x14', 'layer4': '2048x7x7'}
  assert re.search(r'layer2\.0\.downsample\s+Downsample\s+512x28x28\s+132,096', out)
  assert re.search(r'layer1\.0\.conv2\s+Conv\s+64x56x56\s+36,864', out)
  assert '25,557,032 parameters, 4.089 GFLOPs' in out  # torchvision: 4.09


def test_cifar_default_size_and_flops(capsys):
  summary.main(['cifar_resnet20', '--depth', '1'])
  out = capsys.readouterr().out
  assert 'cifar_resnet20 at 32x32: 269,722 parameters, 0.041 GFLOPs' in out  # paper: 41M


@pytest.mark.parametrize('argv, message', [
    (['resnet5'], 'unknown model'),
    (['resnet18', '--image-size', '8'], 'too small'),
    (['resnet18', '--image-size', '0'], 'Images of 0x0 are too small'),  # was 224's table
    (['resnet18', '--depth', '0'], '--depth 0: pass 1'),
    (['resnet18', '--num-classes', '-3'], 'num_classes must be an integer >= 0'),
])
def test_bad_arguments_exit_with_a_message(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    summary.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
