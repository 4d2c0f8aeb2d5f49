"""Converting weights: a torchvision/timm state_dict to our variables and back."""

from typing import Any, Dict, Mapping

import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.models import unscan_variables
from resnet_jax.models.torch_names import (LEAF_NAMES, NUM_BATCHES_TRACKED, bn_prefixes,
                                           check_layout, natural_key, to_flax_layout,
                                           to_torch_layout)


def to_numpy(value) -> np.ndarray:
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
  arrays = {k: to_numpy(v) for k, v in state_dict.items()}
  layout = check_layout({k: v.shape for k, v in arrays.items()}, arch, **overrides)
  if not allow_nonfinite:
    check_finite({k: arrays[k] for k in layout})
  variables = {'params': {}, 'batch_stats': {}}
  for key, slot in layout.items():
    node = variables[slot.collection]
    for name in slot.path[:-1]:
      node = node.setdefault(name, {})
    # A copy: torch's .numpy() shares memory with the module, which training mutates.
    node[slot.path[-1]] = np.array(to_flax_layout(arrays[key]), dtype=slot.dtype, order='C')
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
  import jax  # pylint: disable=g-import-not-at-top

  # GroupNorm nets (resnet50_gn) have no batch_stats.
  variables = unscan_variables({c: variables.get(c, {}) for c in ('params', 'batch_stats')})
  state_dict = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      names = tuple(k.key for k in path)
      leaf_name = LEAF_NAMES.get((collection, names[-1]), names[-1])
      key = '.'.join(names[:-1] + (leaf_name,))
      state_dict[key] = np.array(to_torch_layout(np.asarray(leaf)), order='C')
  layout = check_layout({k: v.shape for k, v in state_dict.items()}, arch, **overrides)
  if not allow_nonfinite:
    check_finite(state_dict)
  for prefix in bn_prefixes(layout):
    state_dict[f'{prefix}.{NUM_BATCHES_TRACKED}'] = np.array(0, dtype=np.int64)
  return dict(sorted(state_dict.items(), key=lambda item: natural_key(item[0])))
