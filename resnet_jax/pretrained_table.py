"""Generates resnet_jax/pretrained_weights.json, the table of pretrained weights, from the
installed torchvision and timm (their own metadata; nothing is downloaded):

  python -m resnet_jax.pretrained_table            # rewrites the data file
  python -m resnet_jax.pretrained_table --readme   # prints the README's table

Rows: every torchvision ResNet-family weight (TORCHVISION_ARCHS, V1 and V2) as
`<arch>.tv_in1k` / `<arch>.tv2_in1k`, and every timm weight of its `resnet.py` module but
the test-only ones as `timm/<model>.<tag>`. Each row has the zoo architecture, where the
file comes from (a torchvision Weights member and its URL, whose name carries the sha256
prefix torch.hub checks, or a Hugging Face hub repo), the published top-1 (torchvision's
meta['_metrics']; the installed timm ships no results, so timm rows have none) and the
preprocessing the weights were evaluated with (`input_spec.InputSpec` fields: torchvision's
`weights.transforms()`, timm's pretrained_cfg input_size, crop_pct, interpolation, mean
and std; timm's test_input_size / test_crop_pct as 'test_input'). This is the one module
that imports torchvision and timm for the table; pretrained.py only reads the file.
"""

import argparse
import json
import math
import sys
from typing import Any, Dict, List

from resnet_jax import pretrained
from resnet_jax.models.zoo import PYTORCH_REFERENCE

# The zoo's models that mirror torchvision's: every ResNet-family model it has weights for.
TORCHVISION_ARCHS = tuple(arch for arch, library in PYTORCH_REFERENCE.items()
                          if library == 'torchvision')
TIMM_MODULE = 'resnet'
TV_TAGS = {'IMAGENET1K_V1': 'tv_in1k', 'IMAGENET1K_V2': 'tv2_in1k'}


def _class_names(categories, num_classes: int):
  """'imagenet-1k' when the weights' classes are ImageNet-1k's (the file we ship)."""
  from resnet_jax.input_spec import imagenet_class_names
  if categories is not None:
    return 'imagenet-1k' if list(categories) == imagenet_class_names() else None
  return 'imagenet-1k' if num_classes == 1000 else None


def torchvision_rows() -> Dict[str, Dict[str, Any]]:
  """The rows of torchvision's ResNet-family weights, from each Weights member."""
  import torchvision

  rows = {}
  for arch in TORCHVISION_ARCHS:
    for weights in torchvision.models.get_model_weights(arch):
      transforms = weights.transforms()
      url = weights.url
      categories = weights.meta['categories']
      rows[f'{arch}.{TV_TAGS[weights.name]}'] = {
          'arch': arch,
          'source': f'torchvision:{type(weights).__name__}.{weights.name}',
          'url': url,
          'sha256_prefix': url.rsplit('-', 1)[1].split('.')[0],
          'top1': weights.meta['_metrics']['ImageNet-1K']['acc@1'],
          'num_classes': len(categories),
          'input': {
              'crop_size': transforms.crop_size[0],
              'resize_size': transforms.resize_size[0],
              'interpolation': transforms.interpolation.value,
              'antialias': bool(transforms.antialias),
              'mean': list(transforms.mean), 'std': list(transforms.std),
              'class_names': _class_names(categories, len(categories)),
          },
      }
  return rows


def _timm_input(size, crop_pct: float, cfg: Dict[str, Any]) -> Dict[str, Any]:
  # timm's transforms_imagenet_eval, crop_mode 'center' with a square size: resize the
  # shorter side to floor(size / crop_pct), then center-crop size.
  return {'crop_size': size, 'resize_size': math.floor(size / crop_pct), 'crop_pct': crop_pct,
          'interpolation': cfg['interpolation'], 'antialias': True,
          'mean': list(cfg['mean']), 'std': list(cfg['std']),
          'class_names': _class_names(None, cfg.get('num_classes') or 0)}


def timm_names() -> List[str]:
  """timm's pretrained names of its resnet.py module, test-only models aside."""
  import timm
  from timm.models._registry import _model_to_module
  return [n for n in timm.list_pretrained()
          if _model_to_module.get(n.split('.')[0]) == TIMM_MODULE and not n.startswith('test_')]


def timm_rows() -> Dict[str, Dict[str, Any]]:
  """The rows of timm's resnet.py weights, from each pretrained_cfg."""
  from timm.models import get_pretrained_cfg

  rows = {}
  for name in timm_names():
    cfg = get_pretrained_cfg(name).to_dict()
    if cfg.get('crop_mode', 'center') != 'center' or cfg['input_size'][1] != cfg['input_size'][2]:
      raise ValueError(f'{name}: {cfg["crop_mode"]} crop of {cfg["input_size"]} is not '
                       f'what InputSpec expresses')
    row = {
        'arch': cfg['architecture'],
        'source': f'hf:{cfg["hf_hub_id"]}',
        'url': f'https://huggingface.co/{cfg["hf_hub_id"]}/resolve/main/{pretrained.HF_FILENAME}',
        'sha256_prefix': None,  # the hub checks its files itself
        'top1': None,  # the installed timm ships no results table
        'num_classes': cfg.get('num_classes') or None,
        'input': _timm_input(cfg['input_size'][1], cfg['crop_pct'], cfg),
    }
    if cfg.get('test_input_size') or cfg.get('test_crop_pct'):
      size = (cfg.get('test_input_size') or cfg['input_size'])[1]
      row['test_input'] = _timm_input(size, cfg.get('test_crop_pct') or cfg['crop_pct'], cfg)
    rows[f'timm/{name}'] = row
  return rows


def dumps(table: Dict[str, Dict[str, Any]]) -> str:
  """The data file's text: one name per line, so a regeneration's diff reads by name."""
  lines = [f' {json.dumps(name)}: {json.dumps(row)}' for name, row in table.items()]
  return '{\n' + ',\n'.join(lines) + '\n}\n'


def readme_table(table: Dict[str, Dict[str, Any]]) -> str:
  """The README's table of pretrained names: one line per name."""
  lines = ['| name | arch | top-1 | input (resize -> crop, interpolation) | mean / std |',
           '|---|---|---|---|---|']
  for name, row in table.items():
    spec = row['input']
    top1 = f'{row["top1"]:.2f}' if row['top1'] is not None else ''
    stats = 'ImageNet' if spec['mean'] == [0.485, 0.456, 0.406] else (
        f'{spec["mean"]} / {spec["std"]}')
    lines.append(f'| `{name}` | {row["arch"]} | {top1} | {spec["resize_size"]} -> '
                 f'{spec["crop_size"]}, {spec["interpolation"]} | {stats} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.pretrained_table',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--readme', action='store_true',
                      help="print the README's table of the committed data file instead")
  args = parser.parse_args(argv)
  if args.readme:
    sys.stdout.write(readme_table(pretrained.table()))
    return 0
  table = {**torchvision_rows(), **timm_rows()}
  pretrained.TABLE_FILE.write_text(dumps(table))
  print(f'wrote {len(table)} names to {pretrained.TABLE_FILE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
