"""Weight files: reading and writing PyTorch state_dicts; what convert may replace."""

import warnings
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np

from resnet_jax import outputs
from resnet_jax.train import checkpoint_format
from resnet_jax.convert.conversion import strip_prefix
from resnet_jax.errors import UserError, describe_error

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
WEIGHT_SUFFIXES = TORCH_SUFFIXES + ('.safetensors',)


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
    reason = _unpickler_reason(e)
    if 'global' not in reason.lower() and 'allowlist' not in reason:  # not code: damage
      raise _unreadable(path, reason) from None
    raise UserError(f'Refusing to load {path}: it is not a plain tensor checkpoint and '
                    f'could run code when unpickled ({reason}). Convert it to .safetensors '
                    f'in a trusted environment first.') from None
  except Exception as e:  # pylint: disable=broad-except
    # Damaged bytes fail torch's unpickler in many ways (EOFError, KeyError, ...).
    raise _unreadable(path, describe_error(e)) from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
      loaded = loaded[wrapper]
  if not isinstance(loaded, Mapping) or not all(hasattr(v, 'shape') for v in loaded.values()):
    raise UserError(f'{path} holds no state_dict (a mapping from names to tensors, '
                    f'possibly under "state_dict" or "model").')
  return strip_prefix(loaded)


def _unreadable(path: Path, reason: str) -> UserError:
  try:
    with open(path, 'rb') as f:
      web_page = f.read(64).lstrip().lower().startswith((b'<!doctype html', b'<html'))
  except OSError:  # the reason says why it cannot be read
    web_page = False
  hint = ('it is a web page, not the weights: download it again from the file\'s own link'
          if web_page else 'a damaged or truncated file?')
  return UserError(f'Cannot read {path} as a PyTorch checkpoint: {reason} ({hint})')


def _unpickler_reason(error: Exception) -> str:
  """The line of torch's long weights-only error that names the refused object."""
  lines = [line.strip() for line in str(error).splitlines()]
  reason = next((line for line in lines if 'Unsupported' in line), lines[0] if lines else '')
  return reason.split('error: ', 1)[-1].split(' was not an allowed')[0] or type(error).__name__


def write_torch_weights(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
  """PATH (.safetensors, else torch.save's format), written through Python's file, so that
  a full disk is an OSError (safetensors' and torch's own writers say less)."""
  with open(path, 'wb') as f:
    if path.suffix == '.safetensors':
      from safetensors.numpy import save
      f.write(save(dict(state_dict)))
    else:
      import torch
      torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, f)


def _is_converted_output(output: Path) -> bool:
  if output.is_dir():
    return checkpoint_format.is_converted_checkpoint(output)
  return output.is_file() and output.suffix in WEIGHT_SUFFIXES


# What convert writes, and so may replace with --overwrite.
CONVERTED = outputs.Kind(
    tool='convert', is_ours=_is_converted_output,
    description=f'a directory of only model.json and variables/, or a '
                f'{"/".join(WEIGHT_SUFFIXES)} file')


def check_output(output: Path, inputs=(), overwrite: bool = False) -> None:
  """One UserError unless convert may write `output` (resnet_jax.outputs' rule): never the
  current directory or an input; if it exists, only with `overwrite` and only a converted
  checkpoint directory or a weights file."""
  outputs.check_output(output, CONVERTED, inputs, overwrite)


def write_atomically(output: Path, write, overwrite: bool = False) -> None:
  """Calls write(tmp_path) beside `output` and swaps the result into place: an existing
  output (with `overwrite`, and only what convert writes) is deleted only once the new one
  is in place. See resnet_jax.outputs."""
  outputs.write_atomically(output, write, CONVERTED, overwrite)
