"""The rule between our parameter names and torchvision's/timm's, and the layouts.

Join the Flax path with '.' and rename the leaf: BatchNorm `scale` is torch's `weight`,
`mean`/`var` are `running_mean`/`running_var`. Convolution kernels are HWIO here and OIHW
in torch (ECA's 1-D kernel WIO here, OIW there), dense kernels (in, out) here and (out, in)
there. torch's `num_batches_tracked`
has no counterpart here. `torch_layout` lists, for a zoo model, every torch key with where
it lives here and its torch shape; the other functions compare a state_dict's keys and
shapes with it. No torch needed: the layout comes from the model's own shapes.
"""

import functools
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.models.resnet import EXECUTION_FIELDS
from resnet_jax.models.zoo import MODELS, PYTORCH_REFERENCE, create_model

NUM_BATCHES_TRACKED = 'num_batches_tracked'
LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


class Slot(NamedTuple):
  """Where one torch tensor lives in the Flax variables, and its shape in torch."""
  collection: str
  path: Tuple[str, ...]
  torch_shape: Tuple[int, ...]
  dtype: Any


def to_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv HWIO -> OIHW
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 3:  # 1-D conv WIO -> OIW
    return array.transpose(2, 1, 0)
  if array.ndim == 2:  # dense (in, out) -> (out, in)
    return array.T
  return array


def to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 3:
    return array.transpose(2, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


# model.json keys that change neither the parameter names nor their shapes: the torch
# layout is the unrolled float32 one, whatever the run trained with (the execution
# settings, `EXECUTION_FIELDS`, change no variable at all).
LAYOUT_NEUTRAL = ('name', 'num_classes', 'param_dtype') + EXECUTION_FIELDS


def layout_overrides(model_config: Mapping[str, Any]) -> Dict[str, Any]:
  """The create_model overrides of a model.json that shape the torch layout (in_channels,
  stage_sizes, ...), with JSON lists made tuples so they can key a cache."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in model_config.items() if k not in LAYOUT_NEUTRAL}


def torch_layout(arch: str, num_classes: int = 1000, **overrides: Any) -> Dict[str, Slot]:
  """torch state_dict key -> its `Slot` for zoo model `arch` built with `num_classes` and
  create_model `overrides` (e.g. in_channels=1); num_batches_tracked excluded."""
  return _torch_layout(arch, num_classes, tuple(sorted(layout_overrides(overrides).items())))


@functools.lru_cache(maxsize=None)
def _torch_layout(arch: str, num_classes: int, overrides: Tuple[Tuple[str, Any], ...]):
  model = create_model(arch, num_classes=num_classes, **dict(overrides))
  size = model.total_stride
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, model.in_channels))))
  layout = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
      names = tuple(k.key for k in path)
      key = '.'.join(names[:-1] + (LEAF_NAMES[collection, names[-1]],))
      torch_shape = to_torch_layout(np.broadcast_to(False, leaf.shape)).shape
      layout[key] = Slot(collection, names, torch_shape, leaf.dtype)
  return dict(sorted(layout.items(), key=lambda item: natural_key(item[0])))


def natural_key(key: str):
  """Orders 'layer3.10' after 'layer3.9', as torch's module order does."""
  return [(0, int(part), '') if part.isdigit() else (1, 0, part) for part in key.split('.')]


def bn_prefixes(layout: Mapping[str, Slot]) -> set:
  return {key.rsplit('.', 1)[0] for key, slot in layout.items()
          if slot.collection == 'batch_stats'}


def num_classes_of(shapes: Mapping[str, Tuple[int, ...]]) -> int:
  return shapes['fc.weight'][0] if 'fc.weight' in shapes else 0


def layout_problems(shapes: Mapping[str, Tuple[int, ...]],
                     layout: Mapping[str, Slot]) -> Tuple[list, list, list]:
  """(missing keys, unexpected keys, wrong shapes) of torch `shapes` against a layout."""
  bn_counters = {f'{prefix}.{NUM_BATCHES_TRACKED}' for prefix in bn_prefixes(layout)}
  missing = [key for key in layout if key not in shapes]
  unexpected = sorted((key for key in shapes if key not in layout and key not in bn_counters),
                      key=natural_key)
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
  stage_sizes = _stage_sizes(shapes)
  candidates = [a for a in PYTORCH_REFERENCE
                if tuple(MODELS[a]['stage_sizes']) == stage_sizes]
  best, best_count = None, None
  for arch in candidates or PYTORCH_REFERENCE:
    try:
      layout = torch_layout(arch, num_classes_of(shapes), **overrides)
    except (ValueError, TypeError):  # overrides that do not apply to this arch
      continue
    count = sum(map(len, layout_problems(shapes, layout)))
    if best_count is None or count < best_count:
      best, best_count = arch, count
  return best


def check_layout(shapes: Mapping[str, Tuple[int, ...]], arch: str,
                  **overrides: Any) -> Dict[str, Slot]:
  """The layout for `arch` built with `overrides`, or one ValueError listing every
  mismatch and a likely arch."""
  if arch not in MODELS:
    create_model(arch)  # raises the zoo's unknown-name message
  layout = torch_layout(arch, num_classes_of(shapes), **overrides)
  missing, unexpected, wrong = layout_problems(shapes, layout)
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
    fits = not any(layout_problems(
        shapes, torch_layout(suggestion, num_classes_of(shapes), **overrides)))
    lines.append(f'  These weights {"fit" if fits else "are closest to"} {suggestion!r}; '
                 f'try --arch {suggestion}.')
  raise UserError('\n'.join(lines))
