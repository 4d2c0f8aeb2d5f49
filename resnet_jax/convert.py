"""Convert ResNet weights between PyTorch (torchvision, timm) and resnet_jax.

The rule is the one our parameter names were chosen for: join the Flax path with '.'
and rename the leaf. Convolution kernels go HWIO <-> OIHW, dense kernels are transposed,
BatchNorm `scale` is torch's `weight` and `mean`/`var` are `running_mean`/`running_var`.
torch's `num_batches_tracked` has no Flax counterpart: it is dropped on import and
written as 0 on export.

  python -m resnet_jax.convert --arch resnet50 --input resnet50.pth --output ckpt/ --verify
  python -m resnet_jax.convert --input ckpt/ --output resnet50.safetensors

This is the only module that imports torch, and only inside the functions that need it.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

# Architectures with a PyTorch reference: the library that builds it, by the same name.
TORCH_ARCHS = {
    **{name: 'torchvision' for name in (
        'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
        'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d')},
    'resnet50d': 'timm',
    'resnet200': 'timm',
}
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
WEIGHT_SUFFIXES = TORCH_SUFFIXES + ('.safetensors',)
NUM_BATCHES_TRACKED = 'num_batches_tracked'
_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


class _Slot(NamedTuple):
  """Where one torch tensor lives in the Flax variables, and its shape in torch."""
  collection: str
  path: Tuple[str, ...]
  torch_shape: Tuple[int, ...]
  dtype: Any


# ---------------------------------------------------------------------------- layout


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv HWIO -> OIHW
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 2:  # dense (in, out) -> (out, in)
    return array.T
  return array


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


@functools.lru_cache(maxsize=None)
def torch_layout(arch: str, num_classes: int = 1000) -> Dict[str, _Slot]:
  """torch state_dict key -> its `_Slot` for a zoo model (num_batches_tracked excluded)."""
  import jax
  import jax.numpy as jnp
  from resnet_jax.models import create_model

  model = create_model(arch, num_classes=num_classes)
  size = model.total_stride
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, model.in_channels))))
  layout = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      names = tuple(k.key for k in path)
      key = '.'.join(names[:-1] + (_LEAF_NAMES[collection, names[-1]],))
      torch_shape = _to_torch_layout(np.broadcast_to(False, leaf.shape)).shape
      layout[key] = _Slot(collection, names, torch_shape, leaf.dtype)
  return dict(sorted(layout.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(key: str):
  """Orders 'layer3.10' after 'layer3.9', as torch's module order does."""
  return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in key.split('.')]


def _bn_prefixes(layout: Mapping[str, _Slot]) -> set:
  return {key.rsplit('.', 1)[0] for key, slot in layout.items()
          if slot.collection == 'batch_stats'}


def _num_classes(shapes: Mapping[str, Tuple[int, ...]]) -> int:
  return shapes['fc.weight'][0] if 'fc.weight' in shapes else 0


def _layout_problems(shapes: Mapping[str, Tuple[int, ...]],
                     layout: Mapping[str, _Slot]) -> Tuple[list, list, list]:
  """(missing keys, unexpected keys, wrong shapes) of torch `shapes` against a layout."""
  bn_counters = {f'{prefix}.{NUM_BATCHES_TRACKED}' for prefix in _bn_prefixes(layout)}
  missing = [key for key in layout if key not in shapes]
  unexpected = sorted((key for key in shapes if key not in layout and key not in bn_counters),
                      key=_natural_key)
  wrong = [(key, tuple(shapes[key]), layout[key].torch_shape) for key in layout
           if key in shapes and tuple(shapes[key]) != layout[key].torch_shape]
  return missing, unexpected, wrong


def _stage_sizes(keys) -> Tuple[int, ...]:
  blocks = {}
  for key in keys:
    parts = key.split('.')
    if parts[0].startswith('layer') and len(parts) > 1 and parts[1].isdigit():
      blocks[parts[0]] = max(blocks.get(parts[0], 0), int(parts[1]) + 1)
  return tuple(blocks[f'layer{i}'] for i in range(1, len(blocks) + 1) if f'layer{i}' in blocks)


def suggest_arch(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[str]:
  """The architecture whose keys and shapes fit torch `shapes`, or the one closest to it."""
  from resnet_jax.models.zoo import MODELS

  stage_sizes = _stage_sizes(shapes)
  candidates = [a for a in TORCH_ARCHS if tuple(MODELS[a]['stage_sizes']) == stage_sizes]
  best, best_count = None, None
  for arch in candidates or TORCH_ARCHS:
    count = sum(map(len, _layout_problems(shapes, torch_layout(arch, _num_classes(shapes)))))
    if best_count is None or count < best_count:
      best, best_count = arch, count
  return best


def _check_layout(shapes: Mapping[str, Tuple[int, ...]], arch: str) -> Dict[str, _Slot]:
  """The layout for `arch`, or one ValueError listing every mismatch and a likely arch."""
  from resnet_jax.models.zoo import MODELS

  if arch not in MODELS:
    from resnet_jax.models import create_model
    create_model(arch)  # raises the zoo's unknown-name message
  layout = torch_layout(arch, _num_classes(shapes))
  missing, unexpected, wrong = _layout_problems(shapes, layout)
  if not (missing or unexpected or wrong):
    return layout
  lines = [f'The weights do not fit {arch!r}:']
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('wrong shapes', [f'{k}: got {g}, {arch} needs {n}' for k, g, n in wrong])):
    if items:
      shown = ', '.join(items[:10]) + (f', ... ({len(items) - 10} more)' if len(items) > 10 else '')
      lines.append(f'  {title} ({len(items)}): {shown}')
  suggestion = suggest_arch(shapes)
  if suggestion and suggestion != arch:
    fits = not any(_layout_problems(shapes, torch_layout(suggestion, _num_classes(shapes))))
    lines.append(f'  These weights {"fit" if fits else "are closest to"} {suggestion!r}; '
                 f'try --arch {suggestion}.')
  raise ValueError('\n'.join(lines))


# ------------------------------------------------------------------------ conversion


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; numpy has no bfloat16, so widen it first
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype.itemsize < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = 'module.') -> Dict[str, Any]:
  """Drops a prefix (DistributedDataParallel's 'module.') when every key has it."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def torch_to_flax(state_dict: Mapping[str, Any], arch: str) -> Dict[str, Any]:
  """A torchvision/timm ResNet state_dict -> {'params', 'batch_stats'} of zoo model `arch`.

  Values may be numpy arrays or torch tensors. The number of classes follows the shape
  of `fc.weight`. Raises one ValueError naming missing keys, unexpected keys and wrong
  shapes, with the architecture the weights would fit.
  """
  arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  layout = _check_layout({k: v.shape for k, v in arrays.items()}, arch)
  variables = {'params': {}, 'batch_stats': {}}
  for key, slot in layout.items():
    node = variables[slot.collection]
    for name in slot.path[:-1]:
      node = node.setdefault(name, {})
    # A copy: torch's .numpy() shares memory with the module, which training mutates.
    node[slot.path[-1]] = np.array(_to_flax_layout(arrays[key]), dtype=slot.dtype, order='C')
  return variables


def flax_to_torch(variables: Mapping[str, Any], arch: str) -> Dict[str, np.ndarray]:
  """{'params', 'batch_stats'} of zoo model `arch` -> a torch state_dict of numpy arrays.

  The exact inverse of `torch_to_flax`, plus `num_batches_tracked` = 0 for every
  BatchNorm, so the result loads into torchvision/timm with `strict=True`. Variables
  in the `scan_blocks=True` layout are unrolled first.
  """
  import jax
  from resnet_jax.models import unscan_variables

  variables = unscan_variables({c: variables[c] for c in ('params', 'batch_stats')})
  state_dict = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      names = tuple(k.key for k in path)
      leaf_name = _LEAF_NAMES.get((collection, names[-1]), names[-1])
      key = '.'.join(names[:-1] + (leaf_name,))
      state_dict[key] = np.array(_to_torch_layout(np.asarray(leaf)), order='C')
  layout = _check_layout({k: v.shape for k, v in state_dict.items()}, arch)
  for prefix in _bn_prefixes(layout):
    state_dict[f'{prefix}.{NUM_BATCHES_TRACKED}'] = np.array(0, dtype=np.int64)
  return dict(sorted(state_dict.items(), key=lambda item: _natural_key(item[0])))


def torch_reference_model(arch: str, num_classes: int = 1000):
  """The torchvision (or timm) module that `arch` mirrors, randomly initialized."""
  if TORCH_ARCHS.get(arch) == 'torchvision':
    import torchvision
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
  if TORCH_ARCHS.get(arch) == 'timm':
    import timm
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)
  raise ValueError(f'{arch!r} has no PyTorch reference; choose one of {", ".join(TORCH_ARCHS)}.')


# ----------------------------------------------------------------------------- files


def read_torch_weights(path: Path) -> Dict[str, Any]:
  """A state_dict from a .pth/.pt/.bin (weights only, never running pickled code) or a
  .safetensors file. Unwraps {'state_dict': ...} / {'model': ...} and DDP's 'module.'."""
  import pickle

  import torch

  if path.suffix == '.safetensors':
    from safetensors.torch import load_file
    return strip_prefix(load_file(str(path)))
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f'Refusing to load {path}: it is not a plain tensor checkpoint and '
                     f'could run code when unpickled ({_unpickler_reason(e)}). Convert it '
                     f'to .safetensors in a trusted environment first.') from None
  except (RuntimeError, EOFError, OSError) as e:
    raise ValueError(f'Cannot read {path} as a PyTorch checkpoint: {e}') from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
      loaded = loaded[wrapper]
  if not isinstance(loaded, Mapping) or not all(hasattr(v, 'shape') for v in loaded.values()):
    raise ValueError(f'{path} holds no state_dict (a mapping from names to tensors, '
                     f'possibly under "state_dict" or "model").')
  return strip_prefix(loaded)


def _unpickler_reason(error: Exception) -> str:
  """The line of torch's long weights-only error that names the refused object."""
  lines = [line.strip() for line in str(error).splitlines()]
  reason = next((line for line in lines if 'Unsupported' in line), lines[0] if lines else '')
  return reason.split('error: ', 1)[-1].split(' was not an allowed')[0] or type(error).__name__


def write_torch_weights(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
  if path.suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file(dict(state_dict), str(path))
  else:
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)


def save_checkpoint(variables: Mapping[str, Any], model_config: Mapping[str, Any],
                    directory: Path) -> None:
  """A converted checkpoint directory: model.json and variables/ (orbax)."""
  import orbax.checkpoint as ocp

  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'model.json').write_text(json.dumps(dict(model_config), indent=2) + '\n')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory.absolute() / 'variables', dict(variables))
    checkpointer.wait_until_finished()


def write_atomically(output: Path, write, overwrite: bool = False) -> None:
  """Calls write(tmp_path) on a temporary sibling of `output`, then renames it into place,
  so a failure leaves nothing behind (and an existing output untouched)."""
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{output.name}.', dir=output.parent))
  try:
    target = tmp / output.name
    write(target)
    if overwrite and output.is_dir():
      shutil.rmtree(output)
    elif overwrite and output.exists():
      output.unlink()
    os.replace(target, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------ verification


def max_logit_difference(state_dict: Mapping[str, Any], variables: Mapping[str, Any],
                         arch: str, batch_size: int = 2, image_size: int = 224,
                         seed: int = 0) -> float:
  """Runs the PyTorch reference with `state_dict` and our model with `variables` on the
  same random batch, in eval mode, and returns the largest absolute logit difference."""
  import jax
  import torch
  from resnet_jax.models import create_model

  num_classes = _num_classes({k: tuple(v.shape) for k, v in state_dict.items()})
  reference = torch_reference_model(arch, num_classes)
  tensors = {k: torch.as_tensor(_to_numpy(v)) for k, v in state_dict.items()}
  result = reference.load_state_dict(tensors, strict=False)
  missing = [k for k in result.missing_keys if not k.endswith(NUM_BATCHES_TRACKED)]
  if missing or result.unexpected_keys:
    raise ValueError(f'The {arch} reference model does not take these weights: missing '
                     f'{missing}, unexpected {result.unexpected_keys}.')
  images = np.random.default_rng(seed).standard_normal(
      (batch_size, 3, image_size, image_size)).astype(np.float32)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(images)).numpy()
  model = create_model(arch, num_classes=num_classes)
  got = jax.jit(functools.partial(model.apply, train=False))(
      dict(variables), images.transpose(0, 2, 3, 1))
  return float(np.max(np.abs(np.asarray(got) - expected)))


# -------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m resnet_jax.convert',
      description='Convert ResNet weights: a PyTorch file (.pth/.pt/.bin/.safetensors) '
                  'becomes a resnet_jax checkpoint directory, and a checkpoint directory '
                  '(converted, or a training workdir) becomes a PyTorch file.')
  parser.add_argument('--arch', help='zoo name, e.g. resnet50 (needed for PyTorch input; '
                      'for a checkpoint directory it defaults to its model.json). '
                      f'With a PyTorch reference: {", ".join(TORCH_ARCHS)}.')
  parser.add_argument('--input', required=True, type=Path,
                      help='PyTorch weights file, or a checkpoint directory')
  parser.add_argument('--output', required=True, type=Path,
                      help='checkpoint directory, or a .pth/.pt/.bin/.safetensors file')
  parser.add_argument('--verify', action='store_true',
                      help='compare logits with the PyTorch reference model on a random batch')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest max-abs logit difference --verify accepts (default 1e-4)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  return parser


def _check_paths(parser, args) -> bool:
  """Validates --input/--output; returns True for PyTorch -> Flax."""
  if not args.input.exists():
    parser.error(f'--input {args.input} does not exist.')
  to_flax = args.input.is_file()
  if to_flax and args.input.suffix not in WEIGHT_SUFFIXES:
    parser.error(f'--input {args.input}: expected a {"/".join(WEIGHT_SUFFIXES)} file or '
                 f'a checkpoint directory.')
  if to_flax and not args.arch:
    parser.error('--arch is required to convert PyTorch weights, e.g. --arch resnet50.')
  if args.arch:
    from resnet_jax.models import create_model
    try:
      create_model(args.arch)
    except ValueError as e:
      parser.error(str(e))
  if not to_flax and args.output.suffix not in WEIGHT_SUFFIXES:
    parser.error(f'--output {args.output}: exporting a checkpoint directory needs a '
                 f'{"/".join(WEIGHT_SUFFIXES)} file name.')
  if args.output.exists() and not args.overwrite:
    parser.error(f'--output {args.output} already exists; remove it or pass --overwrite.')
  return to_flax


def _read_and_convert(args, to_flax: bool, progress):
  """(arch, torch state_dict, Flax variables, a function writing the output to a path)."""
  progress.set_description('reading')
  if to_flax:
    arch, state_dict = args.arch, read_torch_weights(args.input)
    progress.update()
    progress.set_description('converting')
    variables = torch_to_flax(state_dict, arch)
    config = {'name': arch, 'num_classes': _num_classes(
        {k: tuple(v.shape) for k, v in state_dict.items()})}
    return arch, state_dict, variables, lambda path: save_checkpoint(variables, config, path)
  from resnet_jax.load import load_variables, read_model_config
  arch = args.arch or read_model_config(args.input)['name']
  variables = load_variables(args.input)
  progress.update()
  progress.set_description('converting')
  state_dict = flax_to_torch(variables, arch)
  return arch, state_dict, variables, lambda path: write_torch_weights(state_dict, path)


def _convert(args, to_flax: bool, progress) -> Optional[float]:
  """Converts, verifies if asked, and writes unless verification failed; returns the
  max abs logit difference (None without --verify)."""
  arch, state_dict, variables, write = _read_and_convert(args, to_flax, progress)
  progress.update()
  difference = None
  if args.verify:
    progress.set_description('verifying')
    difference = max_logit_difference(state_dict, variables, arch)
  progress.update()
  if difference is None or difference <= args.tolerance:
    progress.set_description('writing')
    write_atomically(args.output, write, args.overwrite)
  progress.update()
  return difference


def main(argv=None) -> int:
  """Entry point of `python -m resnet_jax.convert` and `resnet-jax-convert`."""
  from tqdm import tqdm

  parser = _parser()
  args = parser.parse_args(argv)
  to_flax = _check_paths(parser, args)
  try:
    # disable=None: a progress bar on a terminal, silence in logs and pipes.
    with tqdm(total=4, disable=None, file=sys.stderr) as progress:
      difference = _convert(args, to_flax, progress)
  except (ValueError, OSError) as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  if difference is not None:
    ok = difference <= args.tolerance
    print(f'max abs logit difference vs PyTorch: {difference:.3g} '
          f'({"ok" if ok else "FAILED"}, tolerance {args.tolerance:g})')
    if not ok:
      parser.exit(1, f'{parser.prog}: error: verification failed; nothing was written.\n')
  print(f'wrote {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
