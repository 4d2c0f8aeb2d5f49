"""resnet_jax.pretrained: names -> weights through torchvision's and the hub's caches, with
no network: random weights are written where the libraries look for them."""

import dataclasses
import fcntl
import json
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
from helpers import quick_sample

from resnet_jax import convert, pretrained
from resnet_jax.errors import UserError
from resnet_jax.models import zoo

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


def _put_torchvision_weights(dirs, arch: str, url_name: str, state_dict=None) -> dict:
  if state_dict is None:
    state_dict = _random_state_dict(convert.torch_reference_model(arch))
  path = dirs['torch'] / 'hub' / 'checkpoints' / url_name
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(state_dict, path)
  return state_dict


def _put_hub_weights(dirs, repo_id: str, arch: str, state_dict=None) -> dict:
  """The layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/<file>."""
  from safetensors.torch import save_file
  if state_dict is None:
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


def test_table_covers_the_torchvision_enums():
  import torchvision
  for name, (arch, source) in pretrained.PRETRAINED.items():
    kind, _, ref = source.partition(':')
    if kind == 'torchvision':
      assert torchvision.models.get_weight(ref) in torchvision.models.get_model_weights(arch)
  for arch, library in convert.TORCH_ARCHS.items():
    if library == 'torchvision':
      members = list(torchvision.models.get_model_weights(arch))
      assert len(pretrained.list_pretrained(arch, pattern='[!t]*.tv*')) == len(members), arch


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
  state = build.initialize_from(config, State(fresh['params'], fresh['batch_stats']),
                                {'name': 'resnet18'}, mesh)
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


def test_a_full_disk_while_converting_is_one_message_and_leaves_no_entry(fresh, monkeypatch):
  """The cache's write failing as orbax fails on a full disk (TensorStore's error, with
  the OS error code): one UserError, and neither an entry nor a temporary left."""
  from resnet_jax.train import checkpoint_format
  _put_torchvision_weights(fresh, 'resnet18', RESNET18_FILE)

  def full_disk(variables, spec, directory, input_spec=None):
    (directory / 'variables').mkdir(parents=True)  # what it wrote before the disk filled
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.fc.bias/0" in OCDBT '
                     "database: No space left on device [os_error_code='28']")
  monkeypatch.setattr(checkpoint_format, 'save_converted', full_disk)
  entry = fresh['ours'] / 'pretrained' / 'resnet18.tv_in1k'
  with pytest.raises(UserError, match=f"Cannot write .* 'resnet18.tv_in1k' to {entry} "
                     r'\(OSError: No space left on device\): free disk space, or set '
                     'RESNET_JAX_CACHE'):
    pretrained.load_pretrained('resnet18.tv_in1k')
  assert [p.name for p in entry.parent.iterdir()] == ['.resnet18.tv_in1k.lock']


@pytest.mark.parametrize('variable, folder', [
    ('RESNET_JAX_CACHE', 'pretrained'),  # where the entry is converted
    ('TORCH_HOME', 'hub/checkpoints'),  # where torchvision's file is downloaded
])
def test_a_cache_folder_that_cannot_be_made_is_one_message(fresh, monkeypatch, variable,
                                                           folder):
  """A file where the cache's folder goes (before: a NotADirectoryError traceback)."""
  in_the_way = fresh['ours'].parent / 'a_file'
  in_the_way.write_text('')
  monkeypatch.setenv(variable, str(in_the_way))
  monkeypatch.delenv('HF_HUB_OFFLINE')  # the download is tried (the network is closed)
  with pytest.raises(UserError, match=f'Cannot create the cache folder {in_the_way}/{folder} '
                     rf'\(NotADirectoryError: Not a directory\): set {variable} to a folder'):
    pretrained.load_pretrained('resnet18.tv_in1k')


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


# ------------------------------------------------------------ the table and its filters


def _recorded_timm_results(table):
  """(timm name, size) -> top-1, as the data file records timm's results table."""
  results = {}
  for name, row in table.items():
    for prefix in ('', 'test_'):
      if name.startswith('timm/') and row.get(f'{prefix}top1') is not None:
        results[(name[len('timm/'):], row[f'{prefix}top1_at'])] = row[f'{prefix}top1']
  return results


def _timm_commit(table):
  """The pytorch-image-models commit the table's timm figures are from."""
  sources = {row['top1_source'] for name, row in table.items()
             if name.startswith('timm/') and row['top1'] is not None}
  assert len(sources) == 1, sources
  return sources.pop().split('@')[1].split(':')[0]


def test_the_data_file_is_what_the_generator_makes_of_the_installed_libraries():
  """The libraries' metadata, and the rule placing timm's figures (at the input size and
  the test input size; a note where there is none), give the committed file."""
  from resnet_jax import pretrained_table
  table = pretrained.table()
  generated = {**pretrained_table.torchvision_rows(),
               **pretrained_table.timm_rows(_recorded_timm_results(table), _timm_commit(table))}
  assert generated == table, 'regenerate it: python -m resnet_jax.pretrained_table'


def test_timm_figures_are_its_results_table():
  """With timm's results-imagenet.csv at hand ($TIMM_RESULTS_CSV, from git -C
  pytorch-image-models show <commit>:results/results-imagenet.csv), the generator makes
  the committed file exactly."""
  from resnet_jax import pretrained_table
  path = os.environ.get('TIMM_RESULTS_CSV')
  if not path:
    pytest.skip('set TIMM_RESULTS_CSV to timm\'s results/results-imagenet.csv')
  table = pretrained.table()
  results = pretrained_table.read_timm_results(pathlib.Path(path))
  assert pretrained_table.timm_rows(results, _timm_commit(table)) == {
      name: row for name, row in table.items() if name.startswith('timm/')}


def test_every_weight_has_a_top1_or_says_why():
  table = pretrained.table()
  for name, row in table.items():
    if row['num_classes'] == 1000:
      assert row['top1'] is not None and row['top1_at'] == row['input']['crop_size'], name
      assert 50 < row['top1'] < 90, name
    else:
      assert row['top1'] is None and 'not an ImageNet-1k classifier' in row['top1_note'], name
  assert sum(row['top1'] is None for row in table.values()) == 6  # the in12k and bamboo ones


def test_timms_figures_of_torchvisions_weights_are_torchvisions():
  """timm's results table evaluated torchvision's weights too: where it used torchvision's
  transform (same resize and crop), its top-1 is torchvision's published one within
  0.05 (decoding and resampling differ between the two evaluations)."""
  table = pretrained.table()
  compared = 0
  for name, row in table.items():
    ours = table.get(name[len('timm/'):])
    if not name.startswith('timm/') or ours is None:
      continue
    for prefix, spec in (('', row['input']), ('test_', row.get('test_input'))):
      same = spec and all(spec[k] == ours['input'][k] for k in ('crop_size', 'resize_size'))
      if same and row.get(f'{prefix}top1') is not None:
        assert abs(row[f'{prefix}top1'] - ours['top1']) < 0.05, (name, row, ours['top1'])
        compared += 1
  assert compared == 16  # all torchvision weights timm rehosts but resnext101_64x4d


def test_list_pretrained_counts_every_weight_and_filters():
  import timm
  import torchvision
  import resnet_jax
  from timm.models._registry import _model_to_module
  timm_names = [n for n in timm.list_pretrained() if not n.startswith('test_')
                and _model_to_module.get(n.split('.')[0]) == 'resnet']
  tv_names = [w for arch, library in convert.TORCH_ARCHS.items() if library == 'torchvision'
              for w in torchvision.models.get_model_weights(arch)]
  names = resnet_jax.list_pretrained()
  assert len(names) == len(timm_names) + len(tv_names) == 166
  assert {f'timm/{n}' for n in timm_names} <= set(names)
  resnet50 = resnet_jax.list_pretrained('resnet50')
  assert {'resnet50.tv_in1k', 'resnet50.tv2_in1k', 'timm/resnet50.a1_in1k'} <= set(resnet50)
  assert all(pretrained.PRETRAINED[n][0] == 'resnet50' for n in resnet50)
  in12k = resnet_jax.list_pretrained(pattern='*in12k*')
  assert in12k == [n for n in names if 'in12k' in n] and len(in12k) == 10
  assert resnet_jax.list_pretrained('resnetaa50d', pattern='*_ft_in1k') == [
      'timm/resnetaa50d.sw_in12k_ft_in1k']
  assert resnet_jax.list_pretrained(pattern='*in22k*') == []  # resnet.py has none


def test_a_name_whose_architecture_is_missing_says_so(fresh, monkeypatch):
  monkeypatch.delitem(zoo.PYTORCH_REFERENCE, 'seresnet50')
  with pytest.raises(UserError, match="architecture 'seresnet50', which this version of "
                                      "resnet_jax does not build yet"):
    pretrained.load_pretrained('timm/seresnet50.a1_in1k')


# ------------------------------------------------ each weight's own preprocessing


PHOTOS = sorted((pathlib.Path(__import__('sklearn.datasets').datasets.__file__).parent
                 / 'images').glob('*.jpg'))  # load_sample_images()'s two JPEG photographs
SAMPLES = (
    'resnet18.tv_in1k',  # torchvision V1: resize 256 bilinear, crop 224
    'resnet50.tv2_in1k',  # torchvision V2: resize 232
    'timm/resnet18.a1_in1k',  # bicubic, crop_pct 0.95
    'timm/resnet50d.ra4_e3600_r224_in1k',  # mean = std = 0.5
    'timm/seresnext26d_32x4d.bt_in1k',  # SE
    'timm/ecaresnet26t.ra2_in1k',  # ECA, at 256 (resize 292)
)


def _library_transform(name):
  """The weights' preprocessing as their library builds it."""
  source = pretrained.PRETRAINED[name][1]
  if name.startswith('timm/'):
    import timm.data
    from timm.models import get_pretrained_cfg
    config = timm.data.resolve_data_config(
        pretrained_cfg=get_pretrained_cfg(name[len('timm/'):]).to_dict())
    return timm.data.create_transform(**config)
  import torchvision
  return torchvision.models.get_weight(source.split(':', 1)[1]).transforms()


def _library_model(name):
  """The library's model of `name` with random weights: BN statistics randomized and the
  classifier scaled to logits of standard deviation 3 on a photograph, so the top
  probabilities stand apart (neither all alike nor one near 1 and the rest near 0)."""
  from PIL import Image
  if name.startswith('timm/'):
    import timm
    model = timm.create_model(name[len('timm/'):], pretrained=False)
  else:
    import torchvision
    model = torchvision.models.get_model(pretrained.PRETRAINED[name][0])
  torch.manual_seed(0)
  _random_state_dict(model)  # randomizes the statistics in place
  model.eval()
  with Image.open(PHOTOS[0]) as image, torch.no_grad():
    scale = 3.0 / model(_library_transform(name)(image.convert('RGB'))[None]).std()
    model.fc.weight.mul_(scale)
    model.fc.bias.mul_(scale)
  return model


def _put(dirs, name, state_dict):
  row = pretrained.table()[name]
  if row['source'].startswith('hf:'):
    _put_hub_weights(dirs, row['source'][3:], row['arch'], state_dict)
  else:
    _put_torchvision_weights(dirs, row['arch'], row['url'].rsplit('/', 1)[1], state_dict)


def _distinct_specs():
  """One name for each distinct preprocessing in the table, and every sample."""
  seen = {}
  for name, row in pretrained.table().items():
    seen.setdefault(json.dumps(row['input'], sort_keys=True), name)
  return sorted(set(seen.values()) | set(SAMPLES))


@pytest.mark.parametrize('name', _distinct_specs())
def test_predicts_transform_is_the_libraries_own(name):
  from PIL import Image
  transform = pretrained.input_spec(name).transform(3)
  reference = _library_transform(name)
  for photo in PHOTOS:
    with Image.open(photo) as image:
      expected = reference(image.convert('RGB')).numpy().transpose(1, 2, 0)
      np.testing.assert_allclose(transform(image), expected, rtol=0, atol=2e-6,
                                 err_msg=f'{name} {photo.name}')


def test_resnet50_tv2_resizes_to_232_bilinear_and_crops_224():
  spec = pretrained.input_spec('resnet50.tv2_in1k')
  assert (spec.resize_size, spec.crop_size, spec.interpolation, spec.antialias) == (
      232, 224, 'bilinear', True)


@pytest.mark.parametrize('name', quick_sample(SAMPLES, {'resnet50.tv2_in1k', 'timm/resnet50d.ra4_e3600_r224_in1k'}))
def test_predict_gives_the_libraries_top5_on_photographs(fresh, name, capsys):
  from PIL import Image
  from resnet_jax import predict
  model = _library_model(name)
  _put(fresh, name, model.state_dict())
  transform = _library_transform(name)
  assert predict.main(['--pretrained', name] + [str(p) for p in PHOTOS]) == 0
  lines = capsys.readouterr().out.splitlines()
  for photo in PHOTOS:
    with Image.open(photo) as image, torch.no_grad():
      expected = torch.softmax(model(transform(image.convert('RGB'))[None]), -1)[0].numpy()
    at = lines.index(str(photo))
    got = [line.split() for line in lines[at + 1:at + 6]]
    top5 = np.argsort(-expected)[:5]
    assert [int(g[2]) for g in got] == list(top5), (name, photo.name)
    np.testing.assert_allclose([float(g[1]) for g in got], expected[top5], atol=1e-3)
    assert all(len(g) > 3 for g in got)  # ImageNet-1k's class names, not indices
  entry = pretrained.cache_dir(name)
  assert json.loads((entry / 'input_spec.json').read_text()) == pretrained.table()[name]['input']


EXPORT_LOADER = """
import sys
import jax
import numpy as np
artifact, inputs, outputs = sys.argv[1:]
exported = jax.export.deserialize(open(artifact, 'rb').read())
np.save(outputs, np.asarray(exported.call(np.load(inputs))))
assert 'resnet_jax' not in sys.modules and 'flax' not in sys.modules, 'not jax alone'
"""


@pytest.mark.cli
def test_export_of_a_pretrained_name_embeds_its_normalization(fresh, tmp_path):
  from resnet_jax import export
  from resnet_jax.data.normalization import normalize_with
  name = 'timm/resnet50d.ra4_e3600_r224_in1k'  # mean = std = 0.5
  _put(fresh, name, _library_model(name).state_dict())
  artifact = tmp_path / 'model.jaxexport'
  assert export.main(['--pretrained', name, '--output', str(artifact),
                      '--platforms', 'cpu']) == 0
  contract = json.loads(pathlib.Path(str(artifact) + '.json').read_text())
  assert contract['normalization']['mean'] == contract['normalization']['std'] == [.5] * 3
  assert contract['normalization']['name'] == 'centered'
  assert {k: contract['preprocessing'][k] for k in ('resize_size', 'crop_size',
                                                    'interpolation')} == {
      'resize_size': 235, 'crop_size': 224, 'interpolation': 'bicubic'}
  pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)
  np.save(tmp_path / 'pixels.npy', pixels)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
  env.pop('PYTHONPATH', None)  # the loader must not need resnet_jax
  result = subprocess.run([sys.executable, '-c', EXPORT_LOADER, str(artifact),
                           str(tmp_path / 'pixels.npy'), str(tmp_path / 'logits.npy')],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  model, variables = pretrained.load_pretrained(name)
  expected = model.apply(variables, normalize_with(pixels, [.5] * 3, [.5] * 3), train=False)
  imagenet = model.apply(variables, normalize_with(pixels, [.485, .456, .406],
                                                   [.229, .224, .225]), train=False)
  got = np.load(tmp_path / 'logits.npy')
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(got - np.asarray(imagenet)).max() > 1e-2  # the normalization matters


def _readme_tables():
  from resnet_jax import pretrained_table
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  return pretrained_table.readme_sections(readme)


def _figures_shown(section):
  """model -> (parameters, GFLOPs) as a README zoo table shows them."""
  figures = {}
  for line in section.splitlines()[2:]:
    cells = [cell.strip() for cell in line.strip('|').split('|')]
    figures[cells[0].strip('`')] = (int(cells[1].replace(',', '')), float(cells[2]))
  return figures


def test_the_readmes_tables_are_the_zoo_and_the_data_files():
  """Every zoo model in its table, with its fields, pretrained names and top-1 from the
  data file; the pretrained table from the data file (figures: the next tests)."""
  from resnet_jax import pretrained_table
  shown = _readme_tables()
  figures = {**_figures_shown(shown['zoo']), **_figures_shown(shown['timm'])}
  assert shown == pretrained_table.readme_tables(pretrained.table(), figures), (
      'update them: python -m resnet_jax.pretrained_table --readme')


# Small ones of several kinds (basic, CIFAR, tiered stem, SE-ResNeXt, pruned ECA), a few
# seconds of shape evaluation each, are the quick tier's; the full suite checks every model
# (one test each, so that pytest-xdist spreads them over its workers).
FIGURES_SAMPLE = ('resnet18', 'cifar_resnet20', 'resnet10t', 'seresnext26t_32x4d',
                  'ecaresnet50d_pruned')


@pytest.mark.parametrize('name', quick_sample(list(zoo.MODELS), FIGURES_SAMPLE))
def test_the_readmes_parameters_and_gflops_are_the_models(name):
  from resnet_jax import pretrained_table
  shown = _readme_tables()
  shown = {**_figures_shown(shown['zoo']), **_figures_shown(shown['timm'])}
  [(params, gflops)] = pretrained_table.model_figures([name]).values()
  assert shown[name] == (params, round(gflops, 3))
