"""Load a model and its variables from a checkpoint directory.

Two kinds of directory hold a model, both with `model.json` = {"name": <zoo name>,
"num_classes": N, ...other create_model overrides}:
  - a converted checkpoint (`python -m resnet_jax.convert`): `variables/`, an orbax
    StandardCheckpointer save of {'params', 'batch_stats'} in the unrolled layout;
  - a training workdir: `checkpoints/`, managed by orbax's CheckpointManager, each step
    with an item 'state' holding at least 'params' and 'batch_stats' (possibly in the
    `scan_blocks` layout). Other items are ignored; the newest step that reads is loaded
    (`resnet_jax.train.checkpoints.restore_variables`), also while train.py writes it.
"""

import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import jax
import jax.numpy as jnp

from resnet_jax.models import ResNet, create_model, scan_variables, unscan_variables

PathLike = Union[str, Path]
MODEL_CONFIG = 'model.json'
VARIABLES_DIR = 'variables'
CHECKPOINTS_DIR = 'checkpoints'


def _not_a_checkpoint(path: Path, reason: str) -> ValueError:
  return ValueError(f'{path} is not a resnet_jax checkpoint: {reason}. Expected a directory '
                    f'with {MODEL_CONFIG} and either {VARIABLES_DIR}/ (made by '
                    f'`python -m resnet_jax.convert`) or {CHECKPOINTS_DIR}/ (a training workdir).')


def read_model_config(path: PathLike) -> Dict[str, Any]:
  """The checkpoint's model.json: {'name': <zoo name>, 'num_classes': N, ...}."""
  path = Path(path)
  config_path = path / MODEL_CONFIG
  if not config_path.is_file():
    raise _not_a_checkpoint(path, f'it has no {MODEL_CONFIG}')
  config = json.loads(config_path.read_text())
  if not isinstance(config, dict) or 'name' not in config:
    raise ValueError(f'{config_path} must be a JSON object with a "name" key (a zoo model '
                     f'name); got {config!r}.')
  return config


def model_from_config(config: Dict[str, Any]) -> ResNet:
  """`create_model(**config)`, with JSON's dtype names and lists made dtypes and tuples."""
  kwargs = dict(config)
  name = kwargs.pop('name')
  for key, value in kwargs.items():
    if key in ('dtype', 'param_dtype') and isinstance(value, str):
      kwargs[key] = jnp.dtype(value)
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
  return create_model(name, **kwargs)


def _restore_converted(directory: Path) -> Dict[str, Any]:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory.absolute())


def load_variables(path: PathLike) -> Dict[str, Any]:
  """{'params', 'batch_stats'} (unrolled layout) from a converted checkpoint directory or
  the newest complete, readable step of a training workdir."""
  path = Path(path)
  if (path / VARIABLES_DIR).is_dir():
    state = _restore_converted(path / VARIABLES_DIR)
  elif (path / CHECKPOINTS_DIR).is_dir():
    from resnet_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
    state = checkpoints.restore_variables(str(path))  # the newest step that reads
  elif not path.exists():
    raise _not_a_checkpoint(path, 'it does not exist')
  else:
    raise _not_a_checkpoint(path, f'it has neither {VARIABLES_DIR}/ nor {CHECKPOINTS_DIR}/')
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return jax.tree.map(jnp.asarray, unscan_variables(variables))


def load_model(path: PathLike, **overrides: Any) -> Tuple[ResNet, Dict[str, Any]]:
  """(model, variables) from a checkpoint directory; `overrides` go to `create_model`
  (e.g. dtype=jnp.bfloat16). Variables come in the layout the model uses (scanned when
  it is built with scan_blocks=True)."""
  model = model_from_config({**read_model_config(path), **overrides})
  variables = load_variables(path)
  return model, scan_variables(variables) if model.scan_blocks else variables
