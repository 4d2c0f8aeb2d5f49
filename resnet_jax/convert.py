"""Convert ResNet weights between PyTorch (torchvision, timm) and resnet_jax.

The rule is the one our parameter names were chosen for: join the Flax path with '.'
and rename the leaf. Convolution kernels go HWIO <-> OIHW, dense kernels are transposed,
BatchNorm `scale` is torch's `weight` and `mean`/`var` are `running_mean`/`running_var`.
torch's `num_batches_tracked` has no Flax counterpart: it is dropped on import and
written as 0 on export.

  python -m resnet_jax.convert --arch resnet50 --input resnet50.pth --output ckpt/ --verify
  python -m resnet_jax.convert --input ckpt/ --output resnet50.safetensors

A checkpoint directory's model.json overrides (in_channels, stage_sizes, ...) shape the
exported layout, so a training workdir of any zoo model exports. Nothing is converted with
a silent loss: tensors that are not dense floats (complex, integer, bool, sparse; the
integer `num_batches_tracked` excepted) are refused, and so are NaN/inf values unless
--allow-nonfinite. The output is written next to its place and swapped in when complete;
--overwrite replaces only what convert writes (a directory of model.json and variables/,
or a weights file), never the current directory or one holding the input.

This is the only module that imports torch, and only inside the functions that need it.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from resnet_jax import run_dir
from resnet_jax.errors import UserError

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


# model.json keys that change neither the parameter names nor their shapes nor eval-mode
# outputs: the torch layout is the unrolled float32 one, whatever the run trained with.
_LAYOUT_NEUTRAL = ('name', 'num_classes', 'dtype', 'param_dtype', 'scan_blocks', 'remat',
                   'bn_momentum', 'bn_group_size', 'bn_axis_name', 'bn_unbiased_running_var',
                   'zero_init_residual')


def layout_overrides(model_config: Mapping[str, Any]) -> Dict[str, Any]:
  """The create_model overrides of a model.json that shape the torch layout (in_channels,
  stage_sizes, ...), with JSON lists made tuples so they can key a cache."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in model_config.items() if k not in _LAYOUT_NEUTRAL}


def torch_layout(arch: str, num_classes: int = 1000, **overrides: Any) -> Dict[str, _Slot]:
  """torch state_dict key -> its `_Slot` for zoo model `arch` built with `num_classes` and
  create_model `overrides` (e.g. in_channels=1); num_batches_tracked excluded."""
  return _torch_layout(arch, num_classes, tuple(sorted(layout_overrides(overrides).items())))


@functools.lru_cache(maxsize=None)
def _torch_layout(arch: str, num_classes: int, overrides: Tuple[Tuple[str, Any], ...]):
  import jax
  import jax.numpy as jnp

  model = run_dir.model_from_config({'name': arch, 'num_classes': num_classes,
                                     **dict(overrides)})
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


def suggest_arch(shapes: Mapping[str, Tuple[int, ...]], **overrides: Any) -> Optional[str]:
  """The architecture whose keys and shapes fit torch `shapes` (with create_model
  `overrides`, e.g. in_channels=1), or the one closest to it."""
  from resnet_jax.models.zoo import MODELS

  stage_sizes = _stage_sizes(shapes)
  candidates = [a for a in TORCH_ARCHS if tuple(MODELS[a]['stage_sizes']) == stage_sizes]
  best, best_count = None, None
  for arch in candidates or TORCH_ARCHS:
    try:
      layout = torch_layout(arch, _num_classes(shapes), **overrides)
    except (ValueError, TypeError):  # overrides that do not apply to this arch
      continue
    count = sum(map(len, _layout_problems(shapes, layout)))
    if best_count is None or count < best_count:
      best, best_count = arch, count
  return best


def _check_layout(shapes: Mapping[str, Tuple[int, ...]], arch: str,
                  **overrides: Any) -> Dict[str, _Slot]:
  """The layout for `arch` built with `overrides`, or one ValueError listing every
  mismatch and a likely arch."""
  from resnet_jax.models.zoo import MODELS

  if arch not in MODELS:
    from resnet_jax.models import create_model
    create_model(arch)  # raises the zoo's unknown-name message
  layout = torch_layout(arch, _num_classes(shapes), **overrides)
  missing, unexpected, wrong = _layout_problems(shapes, layout)
  if not (missing or unexpected or wrong):
    return layout
  built = ''.join(f', {k}={v!r}' for k, v in layout_overrides(overrides).items())
  lines = [f'The weights do not fit {arch!r}{built}:']
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('wrong shapes', [f'{k}: got {g}, {arch} needs {n}' for k, g, n in wrong])):
    if items:
      shown = ', '.join(items[:10]) + (f', ... ({len(items) - 10} more)' if len(items) > 10 else '')
      lines.append(f'  {title} ({len(items)}): {shown}')
  suggestion = suggest_arch(shapes, **overrides)
  if suggestion and suggestion != arch:
    fits = not any(_layout_problems(
        shapes, torch_layout(suggestion, _num_classes(shapes), **overrides)))
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


def _is_floating(value) -> bool:
  if hasattr(value, 'is_floating_point'):  # torch
    return value.is_floating_point()
  import jax.numpy as jnp  # knows ml_dtypes' bfloat16, which numpy calls a void type
  return jnp.issubdtype(np.asarray(value).dtype, jnp.floating)


def _shown(items, limit: int = 5) -> str:
  items = list(items)
  more = f', ... ({len(items) - limit} more)' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def check_convertible(state_dict: Mapping[Any, Any]) -> None:
  """One UserError for what cannot become Flax weights without a silent loss: non-string
  keys, sparse tensors, and dtypes that are not floating point (a float copy drops the
  imaginary part of complex values and invents fractions for integers and bools). The
  BatchNorm counters (num_batches_tracked, integers) are the exception: they are dropped."""
  keys = [k for k in state_dict if not isinstance(k, str)]
  if keys:
    raise UserError(f'The state_dict has keys that are not strings: '
                    f'{_shown(map(repr, keys))}. A state_dict maps parameter names to tensors.')
  sparse = [f'{k} ({v.layout})' for k, v in state_dict.items()
            if str(getattr(v, 'layout', 'torch.strided')) != 'torch.strided']
  if sparse:
    raise UserError(f'Sparse tensors cannot be converted: {_shown(sparse)}. Save them dense '
                    f'(tensor.to_dense()) first.')
  bad = [f'{k} ({getattr(v, "dtype", np.asarray(v).dtype)})' for k, v in state_dict.items()
         if not k.endswith(NUM_BATCHES_TRACKED) and not _is_floating(v)]
  if bad:
    raise UserError(f'Refusing to convert tensors that are not floating point: {_shown(bad)}. '
                    f'ResNet weights are floats; a float copy would drop imaginary parts or '
                    f'turn integer/bool data into weights. Fix the checkpoint that made them.')


def check_finite(arrays: Mapping[str, np.ndarray]) -> None:
  """One UserError naming the tensors that hold NaN or inf: a model with them predicts
  nothing meaningful (typically a diverged run or a damaged file)."""
  bad = []
  for key, array in arrays.items():
    array = np.asarray(array)
    if array.dtype.kind in 'biu':
      continue
    finite = np.isfinite(array)
    if not finite.all():
      nan = int(np.isnan(array).sum())
      bad.append(f'{key} ({nan} NaN, {array.size - int(finite.sum()) - nan} inf '
                 f'of {array.size})')
  if bad:
    raise UserError(f'{len(bad)} tensor(s) hold NaN or infinite values: {_shown(bad)}. A '
                    f'model with them gives meaningless outputs; convert weights from before '
                    f'the run diverged, or pass --allow-nonfinite to convert them anyway.')


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = 'module.') -> Dict[str, Any]:
  """Drops a prefix (DistributedDataParallel's 'module.') when every key has it."""
  if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def torch_to_flax(state_dict: Mapping[str, Any], arch: str, allow_nonfinite: bool = False,
                  **overrides: Any) -> Dict[str, Any]:
  """A torchvision/timm ResNet state_dict -> {'params', 'batch_stats'} of zoo model `arch`
  built with create_model `overrides` (e.g. in_channels=1).

  Values may be numpy arrays or torch tensors. The number of classes follows the shape
  of `fc.weight`. Raises one ValueError naming missing keys, unexpected keys and wrong
  shapes, with the architecture the weights would fit; one for tensors that are not dense
  floats (`check_convertible`); one for NaN/inf values unless `allow_nonfinite`.
  """
  check_convertible(state_dict)
  arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  layout = _check_layout({k: v.shape for k, v in arrays.items()}, arch, **overrides)
  if not allow_nonfinite:
    check_finite({k: arrays[k] for k in layout})
  variables = {'params': {}, 'batch_stats': {}}
  for key, slot in layout.items():
    node = variables[slot.collection]
    for name in slot.path[:-1]:
      node = node.setdefault(name, {})
    # A copy: torch's .numpy() shares memory with the module, which training mutates.
    node[slot.path[-1]] = np.array(_to_flax_layout(arrays[key]), dtype=slot.dtype, order='C')
  return variables


def flax_to_torch(variables: Mapping[str, Any], arch: str, allow_nonfinite: bool = False,
                  **overrides: Any) -> Dict[str, np.ndarray]:
  """{'params', 'batch_stats'} of zoo model `arch` built with create_model `overrides`
  (a model.json's, e.g. in_channels=1) -> a torch state_dict of numpy arrays.

  The exact inverse of `torch_to_flax`, plus `num_batches_tracked` = 0 for every
  BatchNorm, so the result loads into torchvision/timm with `strict=True`. Variables
  in the `scan_blocks=True` layout are unrolled first. NaN/inf values are refused unless
  `allow_nonfinite`.
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
  layout = _check_layout({k: v.shape for k, v in state_dict.items()}, arch, **overrides)
  if not allow_nonfinite:
    check_finite(state_dict)
  for prefix in _bn_prefixes(layout):
    state_dict[f'{prefix}.{NUM_BATCHES_TRACKED}'] = np.array(0, dtype=np.int64)
  return dict(sorted(state_dict.items(), key=lambda item: _natural_key(item[0])))


def torch_reference_model(arch: str, num_classes: int = 1000, in_channels: int = 3):
  """The torchvision (or timm) module that `arch` mirrors, randomly initialized; for
  in_channels != 3 torchvision's first conv is swapped for one of that many inputs."""
  if TORCH_ARCHS.get(arch) == 'torchvision':
    import torch
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
      model.conv1 = torch.nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=7,
                                    stride=2, padding=3, bias=False)
    return model
  if TORCH_ARCHS.get(arch) == 'timm':
    import timm
    return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels)
  raise ValueError(f'{arch!r} has no PyTorch reference; choose one of {", ".join(TORCH_ARCHS)}.')


# ----------------------------------------------------------------------------- files


def read_torch_weights(path: Path) -> Dict[str, Any]:
  """A state_dict from a .pth/.pt/.bin (weights only, never running pickled code) or a
  .safetensors file. Unwraps {'state_dict': ...} / {'model': ...} and DDP's 'module.'.
  Raises one UserError for an empty, damaged or hostile file."""
  import pickle

  import torch

  if path.stat().st_size == 0:
    raise UserError(f'{path} is empty (0 bytes): the file is truncated or was never '
                    f'written. Download or save it again.')
  if path.suffix == '.safetensors':
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
      return strip_prefix(load_file(str(path)))
    except SafetensorError as e:
      raise UserError(f'Cannot read {path} as a safetensors file ({e}); it is damaged, '
                      f'truncated or not a safetensors file.') from None
  try:
    with warnings.catch_warnings():  # sparse tensors are refused below, with one message
      warnings.filterwarnings('ignore', message='Validating sparse tensor invariants')
      loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UserError(f'Refusing to load {path}: it is not a plain tensor checkpoint and '
                    f'could run code when unpickled ({_unpickler_reason(e)}). Convert it '
                    f'to .safetensors in a trusted environment first.') from None
  except (RuntimeError, EOFError, OSError) as e:
    raise UserError(f'Cannot read {path} as a PyTorch checkpoint: '
                    f'{str(e).strip() or type(e).__name__} (a damaged or truncated file?)'
                    ) from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
      loaded = loaded[wrapper]
  if not isinstance(loaded, Mapping) or not all(hasattr(v, 'shape') for v in loaded.values()):
    raise UserError(f'{path} holds no state_dict (a mapping from names to tensors, '
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


def check_output(output: Path, inputs=(), overwrite: bool = False) -> None:
  """One UserError unless `output` may be written: it must not be (or contain) the current
  directory or an input, and if it exists, `overwrite` must be set and it must be
  something convert writes (a converted checkpoint directory, or a weights file)."""
  cwd = Path.cwd().resolve()
  for out in {Path(os.path.abspath(output)), output.resolve()}:
    if out == cwd or out in cwd.parents:
      raise UserError(f'--output {output} is the current directory or contains it; '
                      f'name a new directory or file, e.g. --output {output / "converted"}.')
    for source in inputs:
      source = Path(source).resolve()
      if out == source or out in source.parents:
        raise UserError(f'--output {output} is or contains the input {source}; '
                        f'choose an output elsewhere.')
  if not os.path.lexists(output):
    return
  if not overwrite:
    raise UserError(f'--output {output} already exists; remove it or pass --overwrite.')
  weights_file = output.is_file() and output.suffix in WEIGHT_SUFFIXES
  if not (weights_file or (output.is_dir() and run_dir.is_converted_checkpoint(output))):
    raise UserError(f'--output {output} exists and is not something convert writes (a '
                    f'directory of only model.json and variables/, or a '
                    f'{"/".join(WEIGHT_SUFFIXES)} file); refusing to replace it. Choose '
                    f'another --output, or move it away yourself.')


def write_atomically(output: Path, write, overwrite: bool = False) -> None:
  """Calls write(tmp_path) on a temporary sibling of `output`, then swaps it into place:
  an existing output (with `overwrite`, and only one `check_output` recognises) is renamed
  aside, the new one renamed in, and only then the old one deleted. A failure before the
  swap leaves the old output untouched and no temporaries behind."""
  check_output(output, overwrite=overwrite)
  output = Path(os.path.abspath(output))
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{output.name}.', dir=output.parent))
  try:
    target = tmp / output.name
    write(target)
    if os.path.lexists(output):
      check_output(output, overwrite=overwrite)  # still the output checked before writing
      aside = tmp / 'replaced'
      os.rename(output, aside)
      try:
        os.rename(target, output)
      except OSError:
        os.rename(aside, output)
        raise
    else:
      os.rename(target, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # the temporary, and the replaced output


# ------------------------------------------------------------------------ verification


def max_logit_difference(state_dict: Mapping[str, Any], variables: Mapping[str, Any],
                         arch: str, batch_size: int = 2, image_size: int = 224,
                         seed: int = 0, **overrides: Any) -> float:
  """Runs the PyTorch reference with `state_dict` and our model (with create_model
  `overrides`; of those the reference mirrors only in_channels) with `variables` on the
  same random batch, in eval mode, and returns the largest absolute logit difference."""
  import jax
  import torch

  overrides = layout_overrides(overrides)
  in_channels = overrides.pop('in_channels', 3)
  if overrides:
    raise UserError(f'--verify compares with the PyTorch {arch}, which has no counterpart '
                    f'for {overrides}; convert without --verify.')
  num_classes = _num_classes({k: tuple(v.shape) for k, v in state_dict.items()})
  reference = torch_reference_model(arch, num_classes, in_channels)
  tensors = {k: torch.as_tensor(_to_numpy(v)) for k, v in state_dict.items()}
  result = reference.load_state_dict(tensors, strict=False)
  missing = [k for k in result.missing_keys if not k.endswith(NUM_BATCHES_TRACKED)]
  if missing or result.unexpected_keys:
    raise ValueError(f'The {arch} reference model does not take these weights: missing '
                     f'{missing}, unexpected {result.unexpected_keys}.')
  images = np.random.default_rng(seed).standard_normal(
      (batch_size, in_channels, image_size, image_size)).astype(np.float32)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(images)).numpy()
  model = run_dir.model_from_config({'name': arch, 'num_classes': num_classes,
                             'in_channels': in_channels})
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
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing output, only if it is one convert writes (a '
                           'directory of model.json and variables/, or a weights file); it '
                           'is swapped out once the new output is complete')
  parser.add_argument('--allow-nonfinite', action='store_true',
                      help='convert weights holding NaN or inf (refused by default: they '
                           'come from a diverged run or a damaged file). Tensors that are '
                           'not floating point (complex, integer, bool) are always refused')
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
  try:
    check_output(args.output, [args.input], args.overwrite)
  except UserError as e:
    parser.error(str(e))
  return to_flax


def _read_and_convert(args, to_flax: bool, progress):
  """(arch, create_model overrides, torch state_dict, Flax variables, a function writing
  the output to a path)."""
  progress.set_description('reading')
  if to_flax:
    arch, state_dict = args.arch, read_torch_weights(args.input)
    progress.update()
    progress.set_description('converting')
    variables = torch_to_flax(state_dict, arch, args.allow_nonfinite)
    config = {'name': arch, 'num_classes': _num_classes(
        {k: tuple(v.shape) for k, v in state_dict.items()})}
    write = lambda path: run_dir.save_converted(variables, config, path)
    return arch, {}, state_dict, variables, write
  model_config = run_dir.read_model_config(args.input)
  arch, overrides = args.arch or model_config['name'], layout_overrides(model_config)
  variables = run_dir.load_variables(args.input)
  progress.update()
  progress.set_description('converting')
  state_dict = flax_to_torch(variables, arch, args.allow_nonfinite, **overrides)
  return arch, overrides, state_dict, variables, lambda path: write_torch_weights(state_dict,
                                                                                  path)


def _convert(args, to_flax: bool, progress) -> Optional[float]:
  """Converts, verifies if asked, and writes unless verification failed; returns the
  max abs logit difference (None without --verify)."""
  arch, overrides, state_dict, variables, write = _read_and_convert(args, to_flax, progress)
  progress.update()
  difference = None
  if args.verify:
    progress.set_description('verifying')
    difference = max_logit_difference(state_dict, variables, arch, **overrides)
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
