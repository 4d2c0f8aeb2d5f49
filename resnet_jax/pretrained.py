"""Pretrained ImageNet weights in one call: download, convert once, cache.

  model, variables = resnet_jax.load_pretrained('resnet50.tv2_in1k')

The names are `<arch>.tv_in1k` / `<arch>.tv2_in1k` for torchvision's IMAGENET1K_V1 / V2
weights (every ResNet-family one), and timm's Hugging Face hub ids for every weight of its
resnet.py (`timm/resnet50d.ra2_in1k`). The table (`table()`, the data file
pretrained_weights.json that `python -m resnet_jax.pretrained_table` generates from the
libraries' metadata) gives each name's architecture, source, published top-1 and its own
preprocessing (`input_spec(name)`: torchvision's `weights.transforms()`, timm's
pretrained_cfg), which the conversion writes beside the weights (input_spec.json) for
predict, export and evaluate. `list_pretrained()` lists and filters the names.

Files come through the libraries' own caches and checks: torchvision's weights through
torch.hub's download (under $TORCH_HOME/hub/checkpoints, sha256 prefix checked on
download, read with weights_only), timm's through `hf_hub_download` (under $HF_HOME/hub;
HF_HUB_OFFLINE=1 reads only that cache). The converted variables are kept as a converted
checkpoint directory (`checkpoint_format.save_converted`) under `cache_root()/pretrained/<name>/`,
so a second call converts nothing. cache_root() is $RESNET_JAX_CACHE, else
$XDG_CACHE_HOME/resnet_jax, else ~/.cache/resnet_jax.

Several processes may share the cache (the hosts of a pod with `init_from=<name>`): the
one that converts holds an flock on `.<name>.lock` beside the entry, writes into a
temporary sibling and renames it in; the others wait for the lock and read its result.
Damage heals: a cache entry that does not read whole is renamed to
`<name>.damaged-<UTC time>` and converted again; a downloaded file that does not read is
named in one message offline, and set aside (torchvision's) or replaced by
huggingface_hub (timm's) and downloaded again online. Nothing is deleted but our own
temporaries of a killed conversion.
"""

import contextlib
import fnmatch
import functools
import glob
import hashlib
import itertools
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from resnet_jax.train import checkpoint_format, run_dir
from resnet_jax.errors import UserError, describe_error, os_error_reason
from resnet_jax.models import scan_variables

HF_FILENAME = 'model.safetensors'
LOCK_TIMEOUT_S = 3600.0  # a download and conversion of the largest weights, with room
LOCK_POLL_S = 0.2

TABLE_FILE = Path(__file__).with_name('pretrained_weights.json')


@functools.lru_cache(maxsize=None)
def table() -> Dict[str, Dict[str, Any]]:
  """name -> {'arch', 'source', 'url', 'sha256_prefix', 'top1', 'num_classes', 'input'
  (the weights' own InputSpec fields), maybe 'test_input'}: the data file that
  `python -m resnet_jax.pretrained_table` generates from torchvision's and timm's metadata."""
  return json.loads(TABLE_FILE.read_text())


# name -> (zoo arch, where the weights come from: a torchvision Weights enum member, or a
# Hugging Face hub repo holding HF_FILENAME).
PRETRAINED = {name: (row['arch'], row['source']) for name, row in table().items()}


def list_pretrained(arch: str = '', pattern: str = '') -> List[str]:
  """The pretrained names: all, those of zoo model `arch`, and/or those matching the
  fnmatch `pattern` (e.g. '*in22k*', 'timm/resnet50*')."""
  return [name for name, (a, _) in PRETRAINED.items()
          if (not arch or a == arch) and (not pattern or fnmatch.fnmatchcase(name, pattern))]


def input_spec(name: str, test_size: bool = False):
  """The `InputSpec` the weights `name` were evaluated with (timm's larger test-time one
  with `test_size`, where the weights declare one)."""
  from resnet_jax.input_spec import InputSpec
  row = table()[_checked(name)]
  fields = row.get('test_input', row['input']) if test_size else row['input']
  return InputSpec.from_json(fields, f'the table entry of {name!r}')


def is_pretrained_name(value: Any) -> bool:
  return isinstance(value, str) and value in PRETRAINED


def cache_root() -> Path:
  """$RESNET_JAX_CACHE, else $XDG_CACHE_HOME/resnet_jax, else ~/.cache/resnet_jax."""
  if os.environ.get('RESNET_JAX_CACHE'):
    return Path(os.environ['RESNET_JAX_CACHE']).expanduser()
  xdg = os.environ.get('XDG_CACHE_HOME') or Path('~/.cache').expanduser()
  return Path(xdg) / 'resnet_jax'


def cache_dir(name: str) -> Path:
  """Where the converted checkpoint directory of pretrained `name` is kept."""
  return cache_root() / 'pretrained' / _checked(name)


def _checked(name: str) -> str:
  if name not in PRETRAINED:
    import difflib
    close = difflib.get_close_matches(name, PRETRAINED, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise UserError(f'Unknown pretrained weights {name!r}.{hint} Choose one of the '
                    f'{len(PRETRAINED)} names of resnet_jax.list_pretrained() (filter them '
                    f'with list_pretrained(arch) or list_pretrained(pattern=...)).')
  return name


def _checked_arch(name: str) -> str:
  """The zoo architecture of `name`, or a UserError when this version's zoo lacks it."""
  from resnet_jax.models.zoo import PYTORCH_REFERENCE
  arch = PRETRAINED[_checked(name)][0]
  if arch not in PYTORCH_REFERENCE:
    raise UserError(f'The pretrained weights {name!r} are for the architecture {arch!r}, '
                    f'which this version of resnet_jax does not build yet; choose weights '
                    f'of another architecture (resnet_jax.list_pretrained()).')
  return arch


def _offline() -> bool:
  """Whether HF_HUB_OFFLINE is on: then torchvision's weights are not downloaded either."""
  return os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')


def _warn(message: str) -> None:
  print(f'WARNING: {message}', file=sys.stderr, flush=True)


def _set_aside(path: Path) -> Path:
  """Renames a damaged `path` to the sibling `<name>.damaged-<UTC time>` (kept, never
  deleted: it may be the only copy of something) and returns the new path."""
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  for attempt in itertools.count():
    aside = path.with_name(f'{path.name}.damaged-{stamp}' + (f'-{attempt}' if attempt else ''))
    if not os.path.lexists(aside):
      os.rename(path, aside)
      return aside
  raise AssertionError('unreachable')


# --------------------------------------------------------------------------- sources


def _read_torch_weights(path: Path) -> Dict[str, Any]:
  from resnet_jax.convert import read_torch_weights
  return read_torch_weights(path)


def _torchvision_state_dict(name: str, enum_member: str) -> Dict[str, Any]:
  """The state_dict of a torchvision Weights member, from $TORCH_HOME or downloaded. A
  cached file that does not read and whose sha256 does not start with the prefix in its
  name is damaged: offline it is named in one message; online it is set aside
  (`_set_aside`) and downloaded again."""
  import torch

  del enum_member  # the table holds its URL, with torch.hub's sha256 prefix in the name
  url = table()[name]['url']
  cached = Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)
  if not cached.is_file():
    _download(name, url, cached)
  try:
    return _read_torch_weights(cached)
  except UserError:
    damage = _torch_file_damage(cached)
    if not damage:
      raise  # the file is the published one: its reading error is the whole story
  if _offline():
    raise UserError(f'Pretrained weights {name!r}: the downloaded file {cached} is damaged '
                    f'({damage}). Delete it and run again with network to download it '
                    f'again, or download {url} and put it there.')
  aside = _set_aside(cached)
  _warn(f'{cached} is damaged ({damage}); moved it to {aside} and downloading it again.')
  _download(name, url, cached, note=f' (The damaged file was moved to {aside}.)')
  return _read_torch_weights(cached)


def _download(name: str, url: str, cached: Path, note: str = '') -> None:
  """torch.hub's download of `url` to `cached`, checking the sha256 prefix in its name."""
  import torch

  if _offline():
    raise _not_available(name, url, cached.parent, 'offline mode (HF_HUB_OFFLINE) is on', note)
  found = torch.hub.HASH_REGEX.search(cached.name)
  _make_folder(cached.parent, 'TORCH_HOME')
  print(f'Downloading {url} to {cached}', file=sys.stderr, flush=True)  # as torch.hub says
  try:
    torch.hub.download_url_to_file(url, str(cached), found.group(1) if found else None)
  except (OSError, RuntimeError) as e:  # no network (URLError), HTTP error, bad hash
    raise _not_available(name, url, cached.parent, e, note) from None


def _torch_file_damage(path: Path) -> str:
  """Why `path` is not the file torch.hub published ('' if its sha256 starts with the
  prefix in its name, as torch.hub checks on download, or the name has no prefix)."""
  import torch

  found = torch.hub.HASH_REGEX.search(path.name)
  size = path.stat().st_size
  if size == 0:
    return 'it is empty'
  if not found:
    return ''
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  if digest.hexdigest().startswith(found.group(1)):
    return ''
  return (f'{size} bytes whose sha256 begins {digest.hexdigest()[:len(found.group(1))]}, not '
          f'{found.group(1)} as its name says: truncated or overwritten')


def _hub_state_dict(name: str, repo_id: str) -> Dict[str, Any]:
  """The state_dict in a Hugging Face hub repo's HF_FILENAME, from $HF_HOME or downloaded.
  A cached file that does not read is named in one message offline, and downloaded again
  by huggingface_hub (force_download, which replaces it in its cache) online."""
  path = _hub_file(name, repo_id)
  try:
    return _read_torch_weights(path)
  except UserError as error:
    damage = error
  if _offline():
    from huggingface_hub import constants
    shown = f'{path} (a link to {path.resolve()})' if path.is_symlink() else str(path)
    folder = Path(constants.HF_HUB_CACHE) / f'models--{repo_id.replace("/", "--")}'
    raise UserError(f'Pretrained weights {name!r}: the cached file {shown} cannot be read: '
                    f'{damage} Delete {path.resolve()} and run again with network, or run '
                    f'`hf download {repo_id} {HF_FILENAME}` on a machine with network and '
                    f'copy its cache folder models--{repo_id.replace("/", "--")} to {folder}.')
  _warn(f'{path} cannot be read ({damage}); downloading it again.')
  path = _hub_file(name, repo_id, force_download=True,
                   note=f' (The cached file {path.resolve()} cannot be read: delete it.)')
  try:
    return _read_torch_weights(path)
  except UserError as e:
    raise UserError(f'Pretrained weights {name!r}: downloaded again, {e}') from None


def _hub_file(name: str, repo_id: str, force_download: bool = False, note: str = '') -> Path:
  from huggingface_hub import constants, hf_hub_download
  from huggingface_hub.errors import HfHubHTTPError

  try:
    return Path(hf_hub_download(repo_id, HF_FILENAME, force_download=force_download))
  except (OSError, HfHubHTTPError, ValueError) as e:
    # LocalEntryNotFoundError is an OSError; a failed force_download a ValueError whose
    # cause says why.
    reason = e.__cause__ if isinstance(e, ValueError) and e.__cause__ else e
    url = f'https://huggingface.co/{repo_id}/resolve/main/{HF_FILENAME}'
    folder = Path(constants.HF_HUB_CACHE) / f'models--{repo_id.replace("/", "--")}'
    raise _not_available(name, url, folder, reason, note, hub_repo=repo_id) from None


def _not_available(name: str, url: str, folder: Path, reason, note: str = '',
                   hub_repo: str = '') -> UserError:
  if hub_repo:
    where = (f'On a machine with network run `hf download {hub_repo} {HF_FILENAME}` and '
             f'copy its cache folder models--{hub_repo.replace("/", "--")} to {folder}')
  else:
    where = f'Download {url} and put it at {folder / os.path.basename(url)}'
  return UserError(f'Pretrained weights {name!r} are not cached and could not be downloaded '
                   f'({reason}). {where}; then run again.{note}')


def _state_dict(name: str) -> Dict[str, Any]:
  source = PRETRAINED[name][1]
  kind, _, ref = source.partition(':')
  return (_torchvision_state_dict if kind == 'torchvision' else _hub_state_dict)(name, ref)


# ---------------------------------------------------------------------------- cache


class _Damaged(Exception):
  """A cache entry that exists but cannot be read whole; the message says why, `identity`
  tells that entry from one another process renamed in since."""

  def __init__(self, reason: str, identity: Tuple[int, int]):
    super().__init__(reason)
    self.identity = identity


def _identity(path: Path) -> Tuple[int, int]:
  try:
    info = os.stat(path, follow_symlinks=False)
  except OSError:
    return (0, 0)
  return info.st_dev, info.st_ino


def _read_entry(name: str, directory: Path):
  """(model.json, variables) of the cache entry, None if there is none, or _Damaged."""
  if not os.path.lexists(directory):
    return None
  identity = _identity(directory)
  try:
    config = run_dir.read_model_config(directory)
    if not checkpoint_format.is_converted_checkpoint(directory):
      raise _Damaged(f'it holds {sorted(p.name for p in directory.iterdir())}, not exactly '
                     f'{run_dir.MODEL_JSON} and {run_dir.VARIABLES_DIR}/', identity)
    if config['name'] != PRETRAINED[name][0]:
      raise _Damaged(f'its {run_dir.MODEL_JSON} names model {config["name"]!r}', identity)
    return config, checkpoint_format.load_variables(directory)
  except (_Damaged, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Anything that stops our own entry from reading (orbax, tensorstore, JSON, missing
    # files) means it is damaged; the entry is then set aside, not deleted.
    raise _Damaged(checkpoint_format.first_line(e), identity) from None


def _make_folder(folder: Path, variable: str) -> None:
  """Creates a cache folder (and its parents), or one UserError saying what to set."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file in the way, no permission, a read-only or full disk
    raise UserError(f'Cannot create the cache folder {folder} ({describe_error(e)}): set '
                    f'{variable} to a folder you can write, or move what is in the way.') from None


@contextlib.contextmanager
def _lock(name: str, directory: Path):
  """Holds an flock on the hidden file `.<name>.lock` beside the entry, so one process
  converts while the others wait (up to LOCK_TIMEOUT_S) and then read its result. Yields
  whether the lock is held (False on a filesystem without locks, where the atomic rename
  of the entry still keeps readers from a half-written one)."""
  _make_folder(directory.parent, 'RESNET_JAX_CACHE')
  path = directory.with_name(f'.{directory.name}.lock')
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
  except OSError as e:  # a symlink (ELOOP), a directory (EISDIR), no permission
    raise UserError(f'Cannot open the lock file {path} of the pretrained cache ({e}); it '
                    f'must be a plain file: move it away and run again.') from None
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise UserError(f'The lock file {path} of the pretrained cache is not a plain file; '
                      f'move it away and run again.')
    yield _acquire(fd, name, path)
  finally:
    os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def _acquire(fd: int, name: str, path: Path) -> bool:
  import fcntl  # POSIX only, as the workdir lock

  deadline = time.monotonic() + LOCK_TIMEOUT_S
  waiting = False
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      pass
    except OSError:  # ENOLCK, EOPNOTSUPP: this filesystem has no locks
      return False
    if time.monotonic() > deadline:
      raise UserError(f'Waited {LOCK_TIMEOUT_S:.0f} s for another process to convert the '
                      f'pretrained weights {name!r} (it holds {path}). Let it finish or stop '
                      f'it, then run again.')
    if not waiting:
      _warn(f'another process is converting the pretrained weights {name!r} (it holds '
            f'{path}); waiting for it.')
      waiting = True
    time.sleep(LOCK_POLL_S)


def _convert(name: str, directory: Path) -> None:
  """Converts `name` into a temporary sibling of `directory` and renames it in, so that
  no reader ever sees a half-written entry."""
  from resnet_jax import convert

  arch = _checked_arch(name)
  state_dict = _state_dict(name)
  variables = convert.torch_to_flax(state_dict, arch)
  spec = {'name': arch, 'num_classes': int(state_dict['fc.weight'].shape[0])}
  tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(directory), dir=directory.parent))
  try:
    checkpoint_format.save_converted(variables, spec, tmp / directory.name,
                                     input_spec(name).to_json())
    os.rename(tmp / directory.name, directory)
  except Exception as e:  # pylint: disable=broad-except  (a full disk, whoever wrote)
    if isinstance(e, OSError) and os.path.lexists(directory):
      return  # published first by a process that could not lock
    reason = os_error_reason(e)
    if reason is None:
      raise  # a bug keeps its traceback
    raise UserError(f'Cannot write the converted pretrained weights {name!r} to '
                    f'{directory} ({reason}): free disk space, or set RESNET_JAX_CACHE to '
                    'a folder with room.') from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _temporary_prefix(directory: Path) -> str:
  return f'.{directory.name}.tmp-'


def _remove_stale_temporaries(directory: Path) -> None:
  """Removes what a killed conversion left: our own `.<name>.tmp-*` siblings. Called with
  the lock held, when no other process is writing them."""
  for stale in directory.parent.glob(glob.escape(_temporary_prefix(directory)) + '*'):
    shutil.rmtree(stale, ignore_errors=True)


def _try_read(name: str, directory: Path):
  """(entry, None), (None, None) when there is none, or (None, _Damaged)."""
  try:
    return _read_entry(name, directory), None
  except _Damaged as damaged:
    return None, damaged


def _cached(name: str):
  """(model.json, variables) of `name`'s cache entry, converting it first when it is
  absent, and setting it aside and converting it again when it is damaged."""
  directory = cache_dir(name)
  _checked_arch(name)
  entry, damaged = _try_read(name, directory)
  if entry is not None:
    return entry
  with _lock(name, directory) as held:
    if damaged is None or damaged.identity != _identity(directory):
      # Another process may have converted it, or healed it, while this one waited.
      entry, damaged = _try_read(name, directory)
      if entry is not None:
        return entry
    if damaged is not None:
      aside = _set_aside(directory)
      _warn(f'the cached conversion {directory} of the pretrained weights {name!r} cannot '
            f'be read ({damaged}); moved it to {aside} (delete it when you like) and '
            f'converting again.')
    if held:
      _remove_stale_temporaries(directory)
    _convert(name, directory)
    entry, damaged = _try_read(name, directory)
  if damaged is not None:
    raise UserError(f'The pretrained weights {name!r} were converted to {directory} but do '
                    f'not read back ({damaged}).')
  return entry


def ensure_cached(name: str) -> Path:
  """The converted checkpoint directory of `name`, read whole once to check it, converting
  (and downloading) it if absent or damaged."""
  _cached(name)
  return cache_dir(name)


def load_pretrained(name: str, **overrides: Any) -> Tuple[Any, Dict[str, Any]]:
  """(model, variables) with pretrained weights `name` (see `list_pretrained()`);
  `overrides` go to `create_model` (e.g. dtype=jnp.bfloat16). The images they take are
  `input_spec(name)`'s, the weights' own preprocessing."""
  config, variables = _cached(name)
  model = run_dir.model_from_config({**config, **overrides})
  return model, scan_variables(variables) if model.scan_blocks else variables
