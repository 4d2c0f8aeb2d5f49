"""Weight files: reading and writing PyTorch state_dicts, and replacing an output safely."""

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np

from resnet_jax import run_dir
from resnet_jax.convert.conversion import strip_prefix
from resnet_jax.errors import UserError

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
