"""resnet_jax.pretrained: names -> weights through torchvision's and the hub's caches, with
no network: random weights are written where the libraries look for them."""

import dataclasses
import fcntl
import os
import pathlib
import socket
import subprocess
import sys
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


def _point_caches(monkeypatch, dirs):
  """TORCH_HOME, HF_HOME and RESNET_JAX_CACHE at `dirs`, HF offline mode on."""
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


@pytest.fixture(autouse=True)
def offline(dirs, monkeypatch):
  """Temporary caches, HF offline mode, and every way out to the network closed."""
  _point_caches(monkeypatch, dirs)

  def no_network(*args, **kwargs):
    raise urllib.error.URLError('no network in tests')
  monkeypatch.setattr(urllib.request, 'urlopen', no_network)
  monkeypatch.setattr(torch.hub, 'urlopen', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
  """Empty caches of this test's own."""
  dirs = {'torch': tmp_path / 'torch', 'hf': tmp_path / 'hf', 'ours': tmp_path / 'resnet_jax'}
  _point_caches(monkeypatch, dirs)
  return dirs


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


# ------------------------------------------------------ damaged files, concurrent loads

RESNET18_FILE = 'resnet18-f37072fd.pth'


def _damage(path: pathlib.Path, how: str) -> None:
  if how == 'empty':
    path.write_bytes(b'')
  elif how == 'random':
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  else:  # truncated
    os.truncate(path, path.stat().st_size // 2)


def _predict(image_dir, capsys, name='resnet18.tv_in1k'):
  """(exit status, stdout, stderr) of `python -m resnet_jax.predict --pretrained NAME`."""
  from PIL import Image
  from resnet_jax import predict
  image = image_dir / 'noise.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
  try:
    status = predict.main(['--pretrained', name, '--top-k', '1', str(image)])
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


@pytest.mark.parametrize('how', ['empty', 'random', 'truncated'])
def test_damaged_torchvision_file_offline_is_named_in_one_message(fresh, tmp_path, capsys,
                                                                  how):
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  path = fresh['torch'] / 'hub' / 'checkpoints' / RESNET18_FILE
  _damage(path, how)
  damaged = path.read_bytes()
  status, out, err = _predict(tmp_path, capsys)
  assert status == 2 and not out
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert f'{path} is damaged' in err and 'Delete it' in err, err
  assert 'https://download.pytorch.org/models/' + RESNET18_FILE in err
  assert path.read_bytes() == damaged  # offline nothing is moved
  assert not (fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k').exists()


def test_damaged_torchvision_file_online_is_set_aside_and_downloaded_again(
    fresh, tmp_path, monkeypatch, capsys):
  monkeypatch.delenv('HF_HUB_OFFLINE')
  state_dict = _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  path = fresh['torch'] / 'hub' / 'checkpoints' / RESNET18_FILE
  good = path.read_bytes()
  _damage(path, 'truncated')
  damaged = path.read_bytes()
  # The network is down: the damaged file is set aside, and one message says where.
  status, out, err = _predict(tmp_path, capsys)
  assert status == 2 and 'Traceback' not in err, err
  asides = list(path.parent.glob(RESNET18_FILE + '.damaged-*'))
  assert len(asides) == 1 and asides[0].read_bytes() == damaged
  assert 'could not be downloaded' in err and f'moved to {asides[0]}' in err, err
  # With network: torch.hub downloads it again (here a stand-in writes the good bytes).
  downloads = []

  def download(url, dst, hash_prefix=None, progress=True):
    downloads.append((url, hash_prefix))
    pathlib.Path(dst).write_bytes(good)
  monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
  _, variables = pretrained.load_pretrained('resnet18.tv_in1k')
  assert downloads == [('https://download.pytorch.org/models/' + RESNET18_FILE, 'f37072fd')]
  _check_logits(state_dict, variables, 'resnet18')


def test_damaged_hub_file_offline_is_named_in_one_message(fresh, tmp_path, capsys):
  _put_hub_weights(fresh, 'timm/resnet50d.ra2_in1k', 'resnet50d')
  path = next((fresh['hf'] / 'hub').rglob(pretrained.HF_FILENAME))
  _damage(path, 'truncated')
  status, _, err = _predict(tmp_path, capsys, 'timm/resnet50d.ra2_in1k')
  assert status == 2 and err.count('\n') == 1, err
  assert f'Delete {path.resolve()}' in err and 'hf download timm/resnet50d.ra2_in1k' in err


def _damage_entry(entry: pathlib.Path, how: str) -> None:
  if how == 'empty model.json':
    (entry / 'model.json').write_text('')
  elif how == 'truncated variables':
    for f in (entry / 'variables').rglob('*'):
      if f.is_file() and f.stat().st_size > 100_000:
        os.truncate(f, f.stat().st_size // 2)
  else:  # random variables
    for f in (entry / 'variables').rglob('*'):
      if f.is_file() and f.stat().st_size > 100_000:
        f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


@pytest.mark.parametrize('how', ['empty model.json', 'truncated variables',
                                 'random variables'])
def test_damaged_cache_entry_is_set_aside_and_converted_again(fresh, tmp_path, capsys, how):
  state_dict = _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  pretrained.load_pretrained('resnet18.tv_in1k')
  entry = fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k'
  _damage_entry(entry, how)
  damaged = sorted((p.relative_to(entry), p.stat().st_size) for p in entry.rglob('*'))
  stale = entry.with_name('.resnet18.tv_in1k.tmp-killed')  # what a killed conversion left
  stale.mkdir()
  status, out, err = _predict(tmp_path, capsys)
  assert status == 0 and out.count('\n') == 2, err
  warnings = [line for line in err.splitlines() if line.startswith('WARNING')]
  assert len(warnings) == 1 and f'cached conversion {entry} ' in warnings[0], err
  asides = list(entry.parent.glob('resnet18.tv_in1k.damaged-*'))
  assert len(asides) == 1 and f'moved it to {asides[0]}' in warnings[0]
  # Set aside as it was, nothing deleted; the new entry reads and matches torch.
  assert sorted((p.relative_to(asides[0]), p.stat().st_size)
                for p in asides[0].rglob('*')) == damaged
  assert not stale.exists()
  _, variables = pretrained.load_pretrained('resnet18.tv_in1k')
  _check_logits(state_dict, variables, 'resnet18')


@pytest.mark.cli
def test_a_command_heals_damaged_variables_with_one_line(fresh, tmp_path):
  """orbax's threads print 'Event loop is closed' tracebacks after a failed read, from
  outside the call; in a command only the one warning may show."""
  from PIL import Image
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  pretrained.load_pretrained('resnet18.tv_in1k')
  _damage_entry(fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k', 'random variables')
  image = tmp_path / 'black.png'
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': str(pathlib.Path(__file__).resolve().parent.parent)}
  result = subprocess.run([sys.executable, '-m', 'resnet_jax.predict', '--pretrained',
                           'resnet18.tv_in1k', '--top-k', '1', str(image)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert result.stderr.startswith('WARNING: the cached conversion '), result.stderr
  assert result.stderr.count('\n') == 1, result.stderr


def test_a_conversion_in_progress_is_waited_for_with_a_limit(fresh, monkeypatch, capsys):
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  lock = fresh['ours'] / 'pretrained' / '.resnet18.tv_in1k.lock'
  lock.parent.mkdir(parents=True)
  monkeypatch.setattr(pretrained, 'LOCK_TIMEOUT_S', 0.5)
  with open(lock, 'w') as holder:
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process converting (flock is per open file)
    with pytest.raises(UserError, match=f'Waited 0 s for another process.*holds {lock}'):
      pretrained.load_pretrained('resnet18.tv_in1k')
  assert 'waiting for it' in capsys.readouterr().err
  assert not (fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k').exists()


def test_a_symlinked_lock_file_is_refused(fresh, tmp_path):
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  mine = tmp_path / 'notes.txt'
  mine.write_text('mine')
  lock = fresh['ours'] / 'pretrained' / '.resnet18.tv_in1k.lock'
  lock.parent.mkdir(parents=True)
  lock.symlink_to(mine)
  with pytest.raises(UserError, match='must be a plain file'):
    pretrained.load_pretrained('resnet18.tv_in1k')
  assert mine.read_text() == 'mine'


LOADER = """
import hashlib, os, pathlib, sys, time
import numpy as np
from resnet_jax import pretrained
read = pretrained._state_dict
def counted(name):
  print('converting', flush=True)
  return read(name)
pretrained._state_dict = counted
ready = pathlib.Path(sys.argv[1])
(ready / sys.argv[2]).touch()
while len(os.listdir(ready)) < 2:  # both processes imported: start together
  time.sleep(0.01)
_, variables = pretrained.load_pretrained('resnet18.tv_in1k')
kernel = np.asarray(variables['params']['layer4']['1']['conv2']['kernel'])
print('loaded', hashlib.sha256(kernel.tobytes()).hexdigest(), flush=True)
"""


@pytest.mark.cli
@pytest.mark.parametrize('cache', ['empty', 'damaged'])
def test_concurrent_loads_convert_once(fresh, tmp_path, cache):
  """Two processes started together (the hosts of a pod with init_from=<name>) on an empty
  cache, or on a damaged entry: one converts (or sets aside and converts), the other
  waits and reads its result."""
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)
  if cache == 'damaged':
    pretrained.load_pretrained('resnet18.tv_in1k')
    _damage_entry(fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k', 'empty model.json')
  ready = tmp_path / 'ready'
  ready.mkdir()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': str(pathlib.Path(__file__).resolve().parent.parent)}
  runs = [subprocess.Popen([sys.executable, '-c', LOADER, str(ready), str(i)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  try:
    outputs = [run.communicate(timeout=300) for run in runs]
  finally:
    for run in runs:
      if run.poll() is None:
        run.kill()
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-3000:]
  lines = [out.splitlines() for out, _ in outputs]
  assert sum(line == 'converting' for out in lines for line in out) == 1, lines
  assert len({out[-1] for out in lines}) == 1 and lines[0][-1].startswith('loaded'), lines
  listing = sorted(os.listdir(fresh['ours'] / 'pretrained'))
  assert listing[:2] == ['.resnet18.tv_in1k.lock', 'resnet18.tv_in1k'], listing
  aside = ['resnet18.tv_in1k.damaged-'] if cache == 'damaged' else []  # set aside once
  assert [name[:len('resnet18.tv_in1k.damaged-')] for name in listing[2:]] == aside, listing


def test_damaged_hub_file_online_is_downloaded_again(fresh, monkeypatch, capsys):
  import huggingface_hub
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  state_dict = _put_hub_weights(fresh, 'timm/resnet50d.ra2_in1k', 'resnet50d')
  path = next((fresh['hf'] / 'hub').rglob(pretrained.HF_FILENAME))
  good = path.read_bytes()
  _damage(path, 'truncated')
  # The network is down: one message naming the damaged file.
  with pytest.raises(UserError, match=f'could not be downloaded.*{path} cannot be read'):
    pretrained.load_pretrained('timm/resnet50d.ra2_in1k')
  assert f'{path} cannot be read' in capsys.readouterr().err
  # With network: huggingface_hub downloads it again (here a stand-in writes the good bytes).
  read_cache = huggingface_hub.hf_hub_download

  def download(repo_id, filename, force_download=False):
    if force_download:
      path.write_bytes(good)
    return read_cache(repo_id, filename, local_files_only=True)
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
  _, variables = pretrained.load_pretrained('timm/resnet50d.ra2_in1k')
  _check_logits(state_dict, variables, 'resnet50d')
