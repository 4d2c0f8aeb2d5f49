"""Pretrained ImageNet weights in one call: download, convert once, cache.

  model, variables = resnet_jax.load_pretrained('resnet50.tv2_in1k')

The names are `<arch>.tv_in1k` / `<arch>.tv2_in1k` for torchvision's IMAGENET1K_V1 / V2
weights, and timm's Hugging Face hub ids (`timm/resnet50d.ra2_in1k`). `PRETRAINED` is
the table; `list_pretrained()` its names.

Files come through the libraries' own caches and checks: torchvision's weights through
`torch.hub.load_state_dict_from_url` (under $TORCH_HOME/hub/checkpoints, sha256 prefix
checked on download, read with weights_only), timm's through `hf_hub_download` (under
$HF_HOME/hub; HF_HUB_OFFLINE=1 reads only that cache). The converted variables are kept
as a converted checkpoint directory (`run_dir.save_converted`) under
`cache_root()/pretrained/<name>/`, written to a temporary sibling and renamed into place,
so a second call converts nothing and an interrupted one leaves nothing half-written.
cache_root() is $RESNET_JAX_CACHE, else $XDG_CACHE_HOME/resnet_jax, else
~/.cache/resnet_jax.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from resnet_jax import run_dir
from resnet_jax.errors import UserError

HF_FILENAME = 'model.safetensors'

# name -> (zoo arch, where the weights come from: a torchvision Weights enum member, or a
# Hugging Face hub repo holding HF_FILENAME). All take ImageNet-normalized 224px images.
# Left out: timm's resnet50d.ra4_e3600_r224_in1k (it normalizes with mean = std = 0.5,
# which predict and export cannot be told yet); timm has no hub weights for resnet200.
PRETRAINED = {
    'resnet18.tv_in1k': ('resnet18', 'torchvision:ResNet18_Weights.IMAGENET1K_V1'),
    'resnet34.tv_in1k': ('resnet34', 'torchvision:ResNet34_Weights.IMAGENET1K_V1'),
    'resnet50.tv_in1k': ('resnet50', 'torchvision:ResNet50_Weights.IMAGENET1K_V1'),
    'resnet50.tv2_in1k': ('resnet50', 'torchvision:ResNet50_Weights.IMAGENET1K_V2'),
    'resnet101.tv_in1k': ('resnet101', 'torchvision:ResNet101_Weights.IMAGENET1K_V1'),
    'resnet101.tv2_in1k': ('resnet101', 'torchvision:ResNet101_Weights.IMAGENET1K_V2'),
    'resnet152.tv_in1k': ('resnet152', 'torchvision:ResNet152_Weights.IMAGENET1K_V1'),
    'resnet152.tv2_in1k': ('resnet152', 'torchvision:ResNet152_Weights.IMAGENET1K_V2'),
    'wide_resnet50_2.tv_in1k': ('wide_resnet50_2',
                                'torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1'),
    'wide_resnet50_2.tv2_in1k': ('wide_resnet50_2',
                                 'torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V2'),
    'wide_resnet101_2.tv_in1k': ('wide_resnet101_2',
                                 'torchvision:Wide_ResNet101_2_Weights.IMAGENET1K_V1'),
    'wide_resnet101_2.tv2_in1k': ('wide_resnet101_2',
                                  'torchvision:Wide_ResNet101_2_Weights.IMAGENET1K_V2'),
    'resnext50_32x4d.tv_in1k': ('resnext50_32x4d',
                                'torchvision:ResNeXt50_32X4D_Weights.IMAGENET1K_V1'),
    'resnext50_32x4d.tv2_in1k': ('resnext50_32x4d',
                                 'torchvision:ResNeXt50_32X4D_Weights.IMAGENET1K_V2'),
    'resnext101_32x8d.tv_in1k': ('resnext101_32x8d',
                                 'torchvision:ResNeXt101_32X8D_Weights.IMAGENET1K_V1'),
    'resnext101_32x8d.tv2_in1k': ('resnext101_32x8d',
                                  'torchvision:ResNeXt101_32X8D_Weights.IMAGENET1K_V2'),
    # torchvision has one enum member for it, trained with the V2 recipe.
    'resnext101_64x4d.tv_in1k': ('resnext101_64x4d',
                                 'torchvision:ResNeXt101_64X4D_Weights.IMAGENET1K_V1'),
    'timm/resnet50d.ra2_in1k': ('resnet50d', 'hf:timm/resnet50d.ra2_in1k'),
    'timm/resnet50d.a1_in1k': ('resnet50d', 'hf:timm/resnet50d.a1_in1k'),
    'timm/resnet50d.a2_in1k': ('resnet50d', 'hf:timm/resnet50d.a2_in1k'),
    'timm/resnet50d.a3_in1k': ('resnet50d', 'hf:timm/resnet50d.a3_in1k'),
    'timm/resnet50d.gluon_in1k': ('resnet50d', 'hf:timm/resnet50d.gluon_in1k'),
}


def list_pretrained(arch: str = '') -> List[str]:
  """The pretrained names, all or those of zoo model `arch`."""
  return [name for name, (a, _) in PRETRAINED.items() if not arch or a == arch]


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
    raise UserError(f'Unknown pretrained weights {name!r}.{hint} Choose one of '
                    f'resnet_jax.list_pretrained(): {", ".join(PRETRAINED)}.')
  return name


def _offline() -> bool:
  """Whether HF_HUB_OFFLINE is on: then torchvision's weights are not downloaded either."""
  return os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')


# --------------------------------------------------------------------------- sources


def _torchvision_state_dict(name: str, enum_member: str) -> Dict[str, Any]:
  """The state_dict of a torchvision Weights member, from $TORCH_HOME or downloaded."""
  import torch
  import torchvision

  url = torchvision.models.get_weight(enum_member).url
  cached = Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)
  if not cached.is_file() and _offline():
    raise _not_available(name, url, cached.parent, 'offline mode (HF_HUB_OFFLINE) is on')
  try:
    return torch.hub.load_state_dict_from_url(url, map_location='cpu', check_hash=True,
                                              weights_only=True)
  except (OSError, RuntimeError) as e:  # no network (URLError), HTTP error, bad hash
    raise _not_available(name, url, cached.parent, e) from None


def _hub_state_dict(name: str, repo_id: str) -> Dict[str, Any]:
  """The state_dict in a Hugging Face hub repo's HF_FILENAME, from $HF_HOME or downloaded."""
  from huggingface_hub import constants, hf_hub_download
  from huggingface_hub.errors import HfHubHTTPError

  from resnet_jax.convert import read_torch_weights

  try:
    path = hf_hub_download(repo_id, HF_FILENAME)
  except (OSError, HfHubHTTPError) as e:  # LocalEntryNotFoundError is an OSError
    url = f'https://huggingface.co/{repo_id}/resolve/main/{HF_FILENAME}'
    folder = Path(constants.HF_HUB_CACHE) / f'models--{repo_id.replace("/", "--")}'
    raise _not_available(name, url, folder, e, hub_repo=repo_id) from None
  return read_torch_weights(Path(path))


def _not_available(name: str, url: str, folder: Path, reason, hub_repo: str = '') -> UserError:
  if hub_repo:
    where = (f'On a machine with network run `hf download {hub_repo} {HF_FILENAME}` and '
             f'copy its cache folder models--{hub_repo.replace("/", "--")} to {folder}')
  else:
    where = f'Download {url} and put it at {folder / os.path.basename(url)}'
  return UserError(f'Pretrained weights {name!r} are not cached and could not be downloaded '
                   f'({reason}). {where}; then run again.')


def _state_dict(name: str) -> Dict[str, Any]:
  source = PRETRAINED[name][1]
  kind, _, ref = source.partition(':')
  return (_torchvision_state_dict if kind == 'torchvision' else _hub_state_dict)(name, ref)


# ---------------------------------------------------------------------------- cache


def ensure_cached(name: str) -> Path:
  """The converted checkpoint directory of `name`, converting (and downloading) if absent."""
  directory = cache_dir(name)
  if run_dir.is_converted_checkpoint(directory):
    return directory
  from resnet_jax import convert

  arch = PRETRAINED[name][0]
  state_dict = _state_dict(name)
  variables = convert.torch_to_flax(state_dict, arch)
  num_classes = int(state_dict['fc.weight'].shape[0])
  try:
    convert.write_atomically(directory, lambda path: run_dir.save_converted(
        variables, {'name': arch, 'num_classes': num_classes}, path))
  except OSError:
    if not run_dir.is_converted_checkpoint(directory):  # not another process finishing first
      raise
  return directory


def load_pretrained(name: str, **overrides: Any) -> Tuple[Any, Dict[str, Any]]:
  """(model, variables) with pretrained weights `name` (see `list_pretrained()`);
  `overrides` go to `create_model` (e.g. dtype=jnp.bfloat16)."""
  return run_dir.load_model(ensure_cached(name), **overrides)
