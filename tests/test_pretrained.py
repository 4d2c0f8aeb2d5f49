"""resnet_jax.pretrained: names -> weights through torchvision's and the hub's caches, with
no network: random weights are written where the libraries look for them."""

import dataclasses
import os
import socket
import urllib.request

import jax
import numpy as np
import pytest
import torch

from resnet_jax import convert, pretrained
from resnet_jax.errors import UserError

HUB_COMMIT = 'a' * 40


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('caches')
  return {'torch': root / 'torch', 'hf': root / 'hf', 'ours': root / 'resnet_jax'}


@pytest.fixture(autouse=True)
def offline(dirs, monkeypatch):
  """Temporary caches, HF offline mode, and every way out to the network closed."""
  import huggingface_hub.constants as hf
  monkeypatch.setenv('TORCH_HOME', str(dirs['torch']))
  monkeypatch.setenv('HF_HOME', str(dirs['hf']))
  monkeypatch.setenv('RESNET_JAX_CACHE', str(dirs['ours']))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  # huggingface_hub reads its environment once, at import.
  monkeypatch.setattr(hf, 'HF_HOME', str(dirs['hf']))
  monkeypatch.setattr(hf, 'HF_HUB_CACHE', str(dirs['hf'] / 'hub'))
  monkeypatch.setattr(hf, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(torch.hub, '_hub_dir', None)

  def no_network(*args, **kwargs):
    raise urllib.error.URLError('no network in tests')
  monkeypatch.setattr(urllib.request, 'urlopen', no_network)
  monkeypatch.setattr(torch.hub, 'urlopen', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)


def _random_state_dict(module: torch.nn.Module) -> dict:
  """The module's state_dict with BatchNorm statistics that are not 0 and 1."""
  generator = torch.Generator().manual_seed(0)
  state_dict = module.state_dict()
  for key, value in state_dict.items():
    if key.endswith('running_mean'):
      value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    elif key.endswith('running_var'):
      value.copy_(0.5 + torch.rand(value.shape, generator=generator))
  return state_dict


def _put_torchvision_weights(dirs, arch: str, url_name: str) -> dict:
  state_dict = _random_state_dict(convert.torch_reference_model(arch))
  path = dirs['torch'] / 'hub' / 'checkpoints' / url_name
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(state_dict, path)
  return state_dict


def _put_hub_weights(dirs, repo_id: str, arch: str) -> dict:
  """The layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/<file>."""
  from safetensors.torch import save_file
  state_dict = _random_state_dict(convert.torch_reference_model(arch))
  repo = dirs['hf'] / 'hub' / f'models--{repo_id.replace("/", "--")}'
  (repo / 'refs').mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(HUB_COMMIT)
  snapshot = repo / 'snapshots' / HUB_COMMIT
  snapshot.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in state_dict.items()},
            str(snapshot / pretrained.HF_FILENAME))
  return state_dict


def _check_logits(state_dict, variables, arch):
  difference = convert.max_logit_difference(state_dict, variables, arch, image_size=64)
  assert difference < 1e-3, difference


def _forbid_conversion(monkeypatch):
  def fail(name):
    raise AssertionError(f'{name} was read again instead of coming from our cache')
  monkeypatch.setattr(pretrained, '_state_dict', fail)


def test_torchvision_weights_convert_once_and_match_torch(dirs, monkeypatch):
  state_dict = _put_torchvision_weights(dirs, 'resnet18', 'resnet18-f37072fd.pth')
  model, variables = pretrained.load_pretrained('resnet18.tv_in1k')
  assert model.num_classes == 1000
  _check_logits(state_dict, variables, 'resnet18')
  assert (dirs['ours'] / 'pretrained' / 'resnet18.tv_in1k' / 'model.json').is_file()
  # No temporary directory is left next to the cache entry, only the (hidden) lock file.
  assert sorted(os.listdir(dirs['ours'] / 'pretrained')) == ['.resnet18.tv_in1k.lock',
                                                             'resnet18.tv_in1k']

  _forbid_conversion(monkeypatch)
  _, again = pretrained.load_pretrained('resnet18.tv_in1k')
  jax.tree.map(np.testing.assert_array_equal, variables, again)


def test_hub_weights_offline_match_timm(dirs, monkeypatch):
  state_dict = _put_hub_weights(dirs, 'timm/resnet50d.ra2_in1k', 'resnet50d')
  import resnet_jax
  _, variables = resnet_jax.load_pretrained('timm/resnet50d.ra2_in1k')
  _check_logits(state_dict, variables, 'resnet50d')
  _forbid_conversion(monkeypatch)
  resnet_jax.load_pretrained('timm/resnet50d.ra2_in1k')


def test_missing_torchvision_weights_say_where_to_put_them(dirs):
  with pytest.raises(UserError) as error:
    pretrained.load_pretrained('resnet50.tv2_in1k')
  message = str(error.value)
  assert 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth' in message
  assert str(dirs['torch'] / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth') in message
  assert not (dirs['ours'] / 'pretrained' / 'resnet50.tv2_in1k').exists()


def test_missing_torchvision_weights_without_network(dirs, monkeypatch):
  """Not offline by setting, but the download fails: the same one message."""
  monkeypatch.delenv('HF_HUB_OFFLINE')
  with pytest.raises(UserError, match='could not be downloaded.*no network in tests.*'
                                      'resnet101-cd907fc2.pth'):
    pretrained.load_pretrained('resnet101.tv2_in1k')


def test_missing_hub_weights_say_where_to_put_them(dirs):
  with pytest.raises(UserError) as error:
    pretrained.load_pretrained('timm/resnet50d.a1_in1k')
  message = str(error.value)
  assert 'hf download timm/resnet50d.a1_in1k model.safetensors' in message
  assert str(dirs['hf'] / 'hub' / 'models--timm--resnet50d.a1_in1k') in message


def test_unknown_name_suggests_close_ones():
  with pytest.raises(UserError, match="Did you mean resnet50.tv2_in1k"):
    pretrained.load_pretrained('resnet50.tv2_in1')


def test_table_covers_the_converter_and_torchvision_enums():
  import torchvision
  for name, (arch, source) in pretrained.PRETRAINED.items():
    assert arch in convert.TORCH_ARCHS, name
    kind, _, ref = source.partition(':')
    if kind == 'torchvision':
      assert torchvision.models.get_weight(ref) in torchvision.models.get_model_weights(arch)
  for arch, library in convert.TORCH_ARCHS.items():
    if library == 'torchvision':
      members = list(torchvision.models.get_model_weights(arch))
      assert len(pretrained.list_pretrained(arch)) == len(members), arch
  assert 'resnet50.tv2_in1k' in pretrained.list_pretrained('resnet50')


def test_predict_cli_takes_a_pretrained_name(dirs, tmp_path, capsys):
  from PIL import Image
  from resnet_jax import predict
  if not (dirs['ours'] / 'pretrained' / 'resnet18.tv_in1k').exists():
    _put_torchvision_weights(dirs, 'resnet18', 'resnet18-f37072fd.pth')
  image = tmp_path / 'noise.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
  assert predict.main(['--pretrained', 'resnet18.tv_in1k', '--top-k', '2', str(image)]) == 0
  assert capsys.readouterr().out.count('\n') == 3
  with pytest.raises(SystemExit):
    predict.main(['--pretrained', 'resnet18.tv_in1k', '--checkpoint', 'x', str(image)])


def test_init_from_takes_a_pretrained_name(dirs):
  from resnet_jax import create_model
  from resnet_jax.train import build, parallel
  if not (dirs['ours'] / 'pretrained' / 'resnet18.tv_in1k').exists():
    _put_torchvision_weights(dirs, 'resnet18', 'resnet18-f37072fd.pth')

  @dataclasses.dataclass(frozen=True)
  class State:
    params: dict
    batch_stats: dict

    def replace(self, **kwargs):
      return dataclasses.replace(self, **kwargs)

  fresh = create_model('resnet18', num_classes=10).init(jax.random.key(0),
                                                        np.zeros((1, 32, 32, 3), np.float32))
  config = type('Config', (), {'init_from': 'resnet18.tv_in1k'})()
  mesh = parallel.create_mesh(jax.devices()[:1])
  state = build.initialize_from(config, State(fresh['params'], fresh['batch_stats']), {}, mesh)
  _, expected = pretrained.load_pretrained('resnet18.tv_in1k')
  np.testing.assert_array_equal(state.params['conv1']['kernel'],
                                expected['params']['conv1']['kernel'])
  assert state.params['fc']['kernel'].shape == (512, 10)  # a new head stays fresh
