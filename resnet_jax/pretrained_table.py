"""Generates resnet_jax/pretrained_weights.json, the table of pretrained weights, from the
installed torchvision and timm (their own metadata; nothing is downloaded) and timm's
results table (a file of its repository, not of its package):

  git -C pytorch-image-models show aa4b5850:results/results-imagenet.csv > results.csv
  python -m resnet_jax.pretrained_table --timm-results results.csv --timm-commit aa4b5850
  python -m resnet_jax.pretrained_table --readme   # prints the README's tables

Rows: every torchvision ResNet-family weight (TORCHVISION_ARCHS, V1 and V2) as
`<arch>.tv_in1k` / `<arch>.tv2_in1k`, and every timm weight of its `resnet.py` module but
the test-only ones as `timm/<model>.<tag>`. Each row has the zoo architecture, where the
file comes from (a torchvision Weights member and its URL, whose name carries the sha256
prefix torch.hub checks, or a Hugging Face hub repo), the published top-1 (torchvision's
meta['_metrics'], at its crop size; timm's from results/results-imagenet.csv of its repository
at the weight's own input size, its pretrained_cfg input_size, which is the 'input' spec
load_pretrained applies: 'top1_at' is that size, 'top1_source' where the figure comes from,
'test_top1' / 'test_top1_at' the figure at the test input size where there is one, and a weight without a row there, one that does not classify ImageNet-1k, has
'top1': None and a 'top1_note' saying why) and the
preprocessing the weights were evaluated with (`input_spec.InputSpec` fields: torchvision's
`weights.transforms()`, timm's pretrained_cfg input_size, crop_pct, interpolation, mean
and std; timm's test_input_size / test_crop_pct as 'test_input'). This is the one module
that imports torchvision and timm for the table; pretrained.py only reads the file.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from resnet_jax import pretrained
from resnet_jax.models.zoo import PYTORCH_REFERENCE

# The zoo's models that mirror torchvision's: every ResNet-family model it has weights for.
TORCHVISION_ARCHS = tuple(arch for arch, library in PYTORCH_REFERENCE.items()
                          if library == 'torchvision')
TIMM_MODULE = 'resnet'
TV_TAGS = {'IMAGENET1K_V1': 'tv_in1k', 'IMAGENET1K_V2': 'tv2_in1k'}
TV_TOP1_SOURCE = "torchvision weights.meta['_metrics']['ImageNet-1K']['acc@1']"
TIMM_RESULTS_FILE = 'results/results-imagenet.csv'
TimmResults = Mapping[Tuple[str, int], float]  # (timm name, image size) -> top-1


def read_timm_results(path: Path) -> Dict[Tuple[str, int], float]:
  """(name, img_size) -> top-1 of timm's results-imagenet.csv (columns model, img_size,
  top1, ...; a name has rows at several test sizes)."""
  with open(path, newline='') as f:
    return {(row['model'], int(row['img_size'])): float(row['top1'])
            for row in csv.DictReader(f)}


def _timm_top1(name: str, row: Dict[str, Any], results: TimmResults,
               source: str) -> Dict[str, Any]:
  """The top-1 fields of a timm row: the results' figure at the row's input size, and at
  its test input size where the weights declare one."""
  size = row['input']['crop_size']
  if (name, size) not in results:
    return {'top1': None, 'top1_note': f'no row at {size} in {source}: not an ImageNet-1k '
                                       f'classifier (num_classes {row["num_classes"]})'}
  fields = {'top1': results[(name, size)], 'top1_at': size, 'top1_source': source}
  test_size = row.get('test_input', {}).get('crop_size')
  if (name, test_size) in results:
    fields.update(test_top1=results[(name, test_size)], test_top1_at=test_size)
  return fields


def _class_names(categories, num_classes: int):
  """'imagenet-1k' when the weights' classes are ImageNet-1k's (the file we ship)."""
  from resnet_jax.input_spec import assumed_class_names, imagenet_class_names
  if categories is not None:
    return 'imagenet-1k' if list(categories) == imagenet_class_names() else None
  return assumed_class_names(num_classes)


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
          'top1_at': transforms.crop_size[0], 'top1_source': TV_TOP1_SOURCE,
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


def timm_rows(results: TimmResults, commit: str) -> Dict[str, Dict[str, Any]]:
  """The rows of timm's resnet.py weights, from each pretrained_cfg, with the top-1 of
  `results` (`read_timm_results` of TIMM_RESULTS_FILE at timm's `commit`)."""
  source = f'huggingface/pytorch-image-models@{commit}:{TIMM_RESULTS_FILE}'
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
        'num_classes': cfg.get('num_classes') or None,
        'input': _timm_input(cfg['input_size'][1], cfg['crop_pct'], cfg),
    }
    if cfg.get('test_input_size') or cfg.get('test_crop_pct'):
      size = (cfg.get('test_input_size') or cfg['input_size'])[1]
      row['test_input'] = _timm_input(size, cfg.get('test_crop_pct') or cfg['crop_pct'], cfg)
    row.update(_timm_top1(name, row, results, source))
    rows[f'timm/{name}'] = row
  return rows


def dumps(table: Dict[str, Dict[str, Any]]) -> str:
  """The data file's text: one name per line, so a regeneration's diff reads by name."""
  lines = [f' {json.dumps(name)}: {json.dumps(row)}' for name, row in table.items()]
  return '{\n' + ',\n'.join(lines) + '\n}\n'


def readme_table(table: Dict[str, Dict[str, Any]]) -> str:
  """The README's table of pretrained names: one line per name."""
  lines = ['| name | arch | top-1 (at size) | input (resize -> crop, interpolation) | '
           'mean / std |', '|---|---|---|---|---|']
  for name, row in table.items():
    spec = row['input']
    top1 = '; '.join(f'{row[f"{p}top1"]:.2f} ({row[f"{p}top1_at"]})' for p in ('', 'test_')
                     if row.get(f'{p}top1') is not None)
    stats = 'ImageNet' if spec['mean'] == [0.485, 0.456, 0.406] else (
        f'{spec["mean"]} / {spec["std"]}')
    lines.append(f'| `{name}` | {row["arch"]} | {top1} | {spec["resize_size"]} -> '
                 f'{spec["crop_size"]}, {spec["interpolation"]} | {stats} |')
  return '\n'.join(lines) + '\n'


# --- the README's zoo tables ------------------------------------------------------------

README_SECTIONS = ('zoo', 'timm', 'pretrained')
README_SIZE = 224  # the image size the README's figures are at, unless they say  # <!-- NAME table begin/end --> in README.md


def model_figures(names) -> Dict[str, Tuple[int, float]]:
  """name -> (parameters, GFLOPs per image) of zoo models with their default head, at
  224x224 (32x32 for the CIFAR nets), by `resnet_jax.summary` (shape evaluation only; the
  deepest take tens of seconds each)."""
  from resnet_jax import summary
  return {name: summary.summarize(name, 32 if name.startswith('cifar') else 224)[1:]
          for name in names}


def _weights_of(arch: str, table: Mapping[str, Mapping[str, Any]]) -> str:
  """The pretrained names of `arch` with their top-1 at their input size (given where it is
  not 224), as '`.tv_in1k` 76.13; timm/: `.a1_in1k` 80.38, `.a3_in1k` 75.99 (160)' ('–'
  where there are none)."""
  groups = {'': [], 'timm/': []}
  for name, row in table.items():
    if row['arch'] == arch:
      prefix = 'timm/' if name.startswith('timm/') else ''
      top1 = '–' if row['top1'] is None else f'{row["top1"]:.2f}' + (
          f' ({row["top1_at"]})' if row['top1_at'] != README_SIZE else '')
      groups[prefix].append(f'`{name[len(prefix) + len(arch):]}` {top1}')
  parts = [f'{prefix}: ' * bool(prefix) + ', '.join(names)
           for prefix, names in groups.items() if names]
  return '; '.join(parts) or '–'


def _stem(spec: Mapping[str, Any]) -> str:
  stem = spec.get('stem', 'imagenet')
  return f'{stem} {spec["stem_width"]}' if 'stem_width' in spec else stem


def _attention(spec: Mapping[str, Any]) -> str:
  if not spec.get('attention'):
    return '–'
  ratio = spec.get('se_ratio')
  return spec['attention'] + (f' 1/{round(1 / ratio)}' if ratio else '')


def _other(spec: Mapping[str, Any]) -> str:
  """The zoo fields that neither the stem, avg-down nor attention columns show."""
  other = []
  if 'block_widths' in spec:
    other.append('pruned widths')
  other += {'avg': ['anti-alias avg'], 'blur': ['blur pool']}.get(spec.get('anti_alias'), [])
  if spec.get('norm_layer') == 'group':
    other.append('GroupNorm')
  if spec.get('stem_pool') == 'conv':
    other.append('conv stem pool')
  if spec.get('reduce_first', 1) != 1:
    other.append('conv1 at half width')
  if spec.get('down_kernel_size', 1) != 1:
    other.append(f'{spec["down_kernel_size"]}x{spec["down_kernel_size"]} projections')
  return ', '.join(other) or '–'


def zoo_tables(table: Mapping[str, Mapping[str, Any]],
               figures: Mapping[str, Tuple[int, float]]) -> Dict[str, str]:
  """The README's 'zoo' table (the zoo's models but timm's variants) and 'timm' table
  (timm's variants with their stem, shortcut, attention and other fields), each row with
  the model's parameters and GFLOPs (`figures`) and its pretrained names with top-1."""
  from resnet_jax.models import zoo
  zoo_rows = ['| model | parameters | GFLOPs | pretrained (`load_pretrained`), top-1 % |',
              '|---|---:|---:|---|']
  timm_rows_ = ['| model | parameters | GFLOPs | stem | avg-down | attention | other | '
                'pretrained, top-1 % |', '|---|---:|---:|---|---|---|---|---|']
  for name, spec in zoo.MODELS.items():
    params, gflops = figures[name]
    cells = [f'`{name}`', f'{params:,}', f'{gflops:.3f}']
    if name in zoo.TIMM_MODELS:
      cells += [_stem(spec), 'yes' if spec.get('avg_down') else 'no', _attention(spec),
                _other(spec), _weights_of(name, table)]
      timm_rows_.append('| ' + ' | '.join(cells) + ' |')
    else:
      zoo_rows.append('| ' + ' | '.join(cells + [_weights_of(name, table)]) + ' |')
  return {'zoo': '\n'.join(zoo_rows) + '\n', 'timm': '\n'.join(timm_rows_) + '\n'}


def readme_tables(table: Mapping[str, Mapping[str, Any]],
                  figures: Mapping[str, Tuple[int, float]]) -> Dict[str, str]:
  """README_SECTIONS -> the markdown between that section's markers."""
  return {**zoo_tables(table, figures), 'pretrained': readme_table(table)}


def readme_sections(readme: str) -> Dict[str, str]:
  """README_SECTIONS -> the text between `<!-- NAME table begin -->` and its end marker."""
  return {name: readme.split(f'<!-- {name} table begin -->\n')[1].split(
      f'<!-- {name} table end')[0] for name in README_SECTIONS}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.pretrained_table',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--readme', action='store_true',
                      help="print the README's tables (the zoo's, timm's variants', the "
                           "committed data file's) instead; a few minutes")
  parser.add_argument('--timm-results', type=Path,
                      help=f'timm\'s {TIMM_RESULTS_FILE} (from its git repository)')
  parser.add_argument('--timm-commit', help='the commit of pytorch-image-models that file '
                      'is from (recorded with each figure)')
  args = parser.parse_args(argv)
  if args.readme:
    from resnet_jax.models import zoo
    tables = readme_tables(pretrained.table(), model_figures(zoo.MODELS))
    for name in README_SECTIONS:
      sys.stdout.write(f'<!-- {name} table begin -->\n{tables[name]}<!-- {name} table end -->\n\n')
    return 0
  if not (args.timm_results and args.timm_commit):
    parser.error(f'regenerating the table needs --timm-results (timm\'s {TIMM_RESULTS_FILE}, '
                 f'e.g. git -C pytorch-image-models show aa4b5850:{TIMM_RESULTS_FILE}) and '
                 f'--timm-commit (aa4b5850).')
  results = read_timm_results(args.timm_results)
  table = {**torchvision_rows(), **timm_rows(results, args.timm_commit)}
  pretrained.TABLE_FILE.write_text(dumps(table))
  print(f'wrote {len(table)} names to {pretrained.TABLE_FILE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
