"""The run directory: the name of every file and folder in it, and model.json and config.json.

Two kinds of directory hold a model, both with model.json = {"name": <zoo name>,
"num_classes": N, ...other create_model overrides}:
  - a converted checkpoint (`python -m resnet_jax.convert`, `load_pretrained`): variables/
    (`checkpoint_format.save_converted`);
  - a training workdir (train.py): config.json (the run's config), checkpoints/ (orbax's
    steps, `checkpoint_format`), checkpoints_unreadable/ (steps the trainer moved aside),
    metrics.jsonl, curves.png, .lock, and TensorBoard's event files.

Every other module asks this one for a path of the run directory and for its JSON files;
what a checkpoint holds is `resnet_jax.train.checkpoint_format`, the trainer's policy
(what to keep, fallbacks) `resnet_jax.train.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError, describe_error
from resnet_jax.outputs import replace_file
from resnet_jax.models import ResNet, create_model
from resnet_jax.models.resnet import EXECUTION_FIELDS
from resnet_jax.models.scan import holds_scanned, scan_tree, unscan_tree
from resnet_jax.train import config_schema

PathLike = Union[str, Path]
MODEL_JSON = 'model.json'
INPUT_SPEC_JSON = 'input_spec.json'  # how images become inputs (resnet_jax.input_spec)
CONFIG_JSON = 'config.json'
VARIABLES_DIR = 'variables'  # a converted checkpoint's orbax save
CHECKPOINTS_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'  # the run's plot, written at its end
LOCK_FILE = '.lock'  # `workdir_lock`


def checkpoint_dir(workdir: PathLike) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def unreadable_dir(workdir: PathLike) -> str:
  return os.path.join(os.path.abspath(workdir), UNREADABLE_DIR)


def metrics_path(workdir: PathLike) -> str:
  return os.path.join(workdir, METRICS_FILE)


def curves_path(workdir: PathLike) -> str:
  return os.path.join(workdir, CURVES_FILE)


def lock_path(workdir: PathLike) -> str:
  return os.path.join(workdir, LOCK_FILE)


def is_training_workdir(path: PathLike) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def is_converted_dir(path: PathLike) -> bool:
  return os.path.isdir(os.path.join(path, VARIABLES_DIR))


def variables_dir(path: PathLike) -> Path:
  return Path(path).absolute() / VARIABLES_DIR


# --- model.json and config.json --------------------------------------------------------

def not_a_checkpoint(path: Path, reason: str) -> UserError:
  return UserError(f'{path} is not a resnet_jax checkpoint: {reason}. Expected a directory '
                    f'with {MODEL_JSON} and either {VARIABLES_DIR}/ (made by '
                    f'`python -m resnet_jax.convert`) or {CHECKPOINTS_DIR}/ (a training workdir).')


def read_model_config(path: PathLike) -> Dict[str, Any]:
  """The checkpoint's model.json: {'name': <zoo name>, 'num_classes': N, ...}."""
  path = Path(path)
  config_path = path / MODEL_JSON
  if not config_path.is_file():
    raise not_a_checkpoint(path, f'it has no {MODEL_JSON}')
  try:
    config = json.loads(config_path.read_text())
  except ValueError as e:
    raise UserError(f'{config_path} is not valid JSON ({e}).') from None
  if not isinstance(config, dict) or 'name' not in config:
    raise UserError(f'{config_path} must be a JSON object with a "name" key (a zoo model '
                     f'name); got {config!r}.')
  return config


def _write_atomically(path: Path, text: str) -> None:
  """Writes `path` so that a reader, a kill or a full disk leaves the old file or the new
  one, never an empty or partial one."""
  replace_file(path, lambda f: f.write(text.encode()))


def write_model_config(directory: PathLike, spec: Dict[str, Any]) -> None:
  """Writes DIRECTORY/model.json (atomically)."""
  _write_atomically(Path(directory, MODEL_JSON), json.dumps(dict(spec), indent=2) + '\n')


def read_input_spec(directory: PathLike) -> Optional[Dict[str, Any]]:
  """DIRECTORY/input_spec.json as a dict, or None when there is none (a checkpoint of an
  older version); a UserError when it does not parse."""
  path = Path(directory, INPUT_SPEC_JSON)
  if not path.is_file():
    return None
  try:
    spec = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f'{path} is not valid JSON ({e}); delete it to use the default '
                    f'ImageNet transform.') from None
  if not isinstance(spec, dict):
    raise UserError(f'{path} must be a JSON object; got {spec!r}.')
  return spec


def write_input_spec(directory: PathLike, spec: Mapping[str, Any]) -> None:
  """Writes DIRECTORY/input_spec.json (atomically)."""
  _write_atomically(Path(directory, INPUT_SPEC_JSON), json.dumps(dict(spec), indent=2) + '\n')


def read_run_config(workdir: PathLike) -> Optional[Dict[str, Any]]:
  """A training workdir's config.json as a dict, or None when it has none (a converted
  checkpoint) or it does not parse."""
  try:
    config = json.loads(Path(workdir, CONFIG_JSON).read_text())
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def write_run_files(workdir: PathLike, config, spec: Dict[str, Any]) -> None:
  """WORKDIR/model.json, input_spec.json and config.json of a training run (process 0
  writes them into the workdir that `check_writable` made); a failed write (a full disk)
  is a UserError that leaves the old files whole."""
  from resnet_jax import input_spec  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  try:
    write_model_config(workdir, spec)
    write_input_spec(workdir, input_spec.of_run(config, spec['num_classes']).to_json())
    _write_atomically(Path(workdir, CONFIG_JSON), config.to_json_best_effort(indent=2))
  except OSError as e:  # a full disk: the old files are whole (written beside, renamed)
    raise UserError(f'Writing the run files into {workdir} failed ({describe_error(e)}): free disk '
                    'space or make the folder writable, then run the same command.') from None


# Config keys that fix what a checkpoint holds or which batches it has consumed: a workdir
# whose checkpoints were made with other values is refused rather than mixed. Each
# checkpoint's 'data' item records them too (`run_settings`), so a workdir whose
# config.json is lost or damaged is still checked.
RUN_DEFINING_KEYS = ('dataset', 'train_split', 'batch_size', 'image_size', 'preprocess', 'seed',
                     'train_image_size', 'repeated_augmentation')


def run_settings(config) -> Dict[str, Any]:
  """The run-defining settings of `config`, as JSON values (what a checkpoint records)."""
  return {key: json.loads(json.dumps(config[key])) for key in RUN_DEFINING_KEYS}


def setting_differences(saved: Mapping[str, Any], config) -> List[Tuple[str, Any, Any]]:
  """(key, saved value, value now) of each run-defining setting that `saved` (config.json
  or a checkpoint's record) holds with another value than `config`; settings `saved` lacks
  (older checkpoints record only batch_size) are not compared."""
  now = run_settings(config)
  return [(key, saved[key], now[key]) for key in RUN_DEFINING_KEYS
          if saved.get(key) is not None and saved[key] != now[key]]


# --- the model of a run, and the trainer's checks that a workdir is this run's ------

def model_from_config(config: Dict[str, Any]) -> ResNet:
  """`create_model(**config)`, with JSON's dtype names and lists made dtypes and tuples;
  a UserError when it names no model or option of this version."""
  kwargs = dict(config)
  name = kwargs.pop('name')
  for key, value in kwargs.items():
    if key in ('dtype', 'param_dtype') and isinstance(value, str):
      kwargs[key] = jnp.dtype(value)
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
  try:
    return create_model(name, **kwargs)
  except (ValueError, TypeError) as e:  # create_model's checks of names and options
    raise UserError(f'Cannot build the model {config}: {e}') from None


def model_config_of_run(config, num_classes: int, in_channels: int) -> Dict[str, Any]:
  """The `create_model` arguments of a run, as written to WORKDIR/model.json: the
  config's model keys, then config.model_overrides that are set (None: not overridden)."""
  spec = {'name': config.model, 'num_classes': num_classes, 'in_channels': in_channels}
  if config.dtype != 'float32':
    spec['dtype'] = config.dtype
  if config.bn_group_size:
    spec['bn_group_size'] = config.bn_group_size
  if config.drop_path_rate:
    spec['drop_path_rate'] = config.drop_path_rate
  spec.update(config_schema.model_overrides_of(config))
  return spec


def check_workdir_matches(workdir: str, config, spec: dict) -> List[str]:
  """Refuses to resume a workdir holding checkpoints of another model or run (as its
  model.json and config.json say; the checkpoints' own records are checked on restore).
  Only the architecture must match: returns 'key: saved -> now' for each execution
  setting (`models.resnet.EXECUTION_FIELDS`) that changed, for the run's log."""
  try:
    saved_spec = json.loads(Path(workdir, MODEL_JSON).read_text())
  except (OSError, ValueError):
    saved_spec = None
  fix = (f'Pass a new --workdir, or the same model and settings to resume the run in '
         f'{workdir}.')
  changed = [] if saved_spec is None else model_differences(saved_spec, spec)
  architecture = [(k, saved, now) for k, saved, now in changed if k not in EXECUTION_FIELDS]
  if architecture:
    raise UserError(f'{workdir} holds checkpoints of another model: '
                    + '; '.join(f'{k}={saved!r} there, {k}={now!r} now'
                                for k, saved, now in architecture)
                    + f' (only execution settings, {", ".join(EXECUTION_FIELDS)}, may '
                    f'change on resume). {fix}')
  differences = setting_differences(read_run_config(workdir) or {}, config)
  if differences:
    key, saved, now = differences[0]
    raise UserError(f'{workdir} holds checkpoints of a run with {key}={saved!r}; '
                    f'this config has {key}={now!r}. {fix}')
  return [f'{k}: {saved!r} -> {now!r}' for k, saved, now in changed]


def in_saved_layout(saved_tree: Any, target_tree: Any) -> Tuple[Any, Callable[[Any], Any]]:
  """(a target of `target_tree`'s shapes in the layout of a checkpoint's `saved_tree`, the
  map of what that restores back to `target_tree`'s layout): a step saved before
  `scan_blocks` was switched is read as saved, then stacked or unstacked. Any tree that
  holds variables works (a train state, {'params', 'batch_stats'}, {'ema': ...}). The
  target is replicated or on one device, so one sharding serves every leaf."""
  if target_tree is None or holds_scanned(saved_tree) == holds_scanned(target_tree):
    return target_tree, lambda tree: tree
  to_saved, to_target = ((unscan_tree, scan_tree) if holds_scanned(target_tree)
                         else (scan_tree, unscan_tree))
  sharding = getattr(jax.tree.leaves(target_tree)[0], 'sharding', None)
  shardings = jax.tree.map(lambda leaf: getattr(leaf, 'sharding', None), target_tree)
  saved_layout = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      jax.eval_shape(to_saved, target_tree))
  return saved_layout, jax.jit(to_target, out_shardings=shardings)


def model_differences(saved: Mapping[str, Any], now: Mapping[str, Any]
                      ) -> List[Tuple[str, Any, Any]]:
  """(field, saved value, value now) of each model field that two model.json specs set
  differently, defaults filled in (a spec omits what it leaves at the zoo's value)."""
  saved_fields, now_fields = _model_fields(saved), _model_fields(now)
  return [(k, saved_fields.get(k), now_fields.get(k))
          for k in sorted(set(saved_fields) | set(now_fields))
          if saved_fields.get(k) != now_fields.get(k)]


def _model_fields(spec: Mapping[str, Any]) -> Dict[str, Any]:
  """Every field of the model a spec builds, as JSON values; the spec itself when it
  builds none (an old or damaged model.json)."""
  if not isinstance(spec, Mapping):
    return {MODEL_JSON: spec}
  spec = json.loads(json.dumps(dict(spec), default=str))
  try:
    model = model_from_config(spec)
  except (UserError, KeyError):
    return spec
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ('parent', 'name')}
  for key in ('dtype', 'param_dtype'):
    fields[key] = jnp.dtype(fields[key]).name
  return {'name': spec['name'], **json.loads(json.dumps(fields, default=str))}


def changed_settings(workdir: str, config) -> List[str]:
  """'key: saved -> now' for each config key that differs from WORKDIR/config.json."""
  saved = read_run_config(workdir)
  try:
    now = json.loads(config.to_json_best_effort())
  except (ValueError, AttributeError):
    return []
  if saved is None:
    return []
  return [f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in sorted(set(saved) | set(now))
          if saved.get(k) != now.get(k)]



# --- a workdir the run can write ---------------------------------------------------

def check_writable(workdir: str):
  """Creates `workdir` if needed (the one place that does) and proves that each folder the
  run writes takes files (the workdir, and checkpoints/ and checkpoints_unreadable/ when
  present) and that metrics.jsonl and curves.png, when present, can be appended to, or
  raises one UserError naming the path and why (a read-only mount or folder, a file or a
  dangling link in the way), before any work that would be lost."""
  _check_directory(workdir, 'pass a writable --workdir', 'workdir ')
  fix = 'make it writable or move it away, or pass another --workdir'
  for directory in (checkpoint_dir(workdir), unreadable_dir(workdir)):
    if os.path.lexists(directory):  # else made in the workdir, which takes files
      _check_directory(directory, fix)
  for name in (METRICS_FILE, CURVES_FILE):  # the others are replaced whole
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue  # created in the workdir, which takes files
    try:
      if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, 'it is a directory')
      with open(path, 'a'):  # appending nothing changes nothing
        pass
    except OSError as e:
      raise UserError(f'Cannot write to {path!r} ({describe_error(e)}); {fix}.') from None


def _check_directory(directory: str, fix: str, what: str = ''):
  try:
    if os.path.lexists(directory) and not os.path.isdir(directory):
      raise NotADirectoryError(errno.ENOTDIR, 'it exists and is not a directory'
                               + (' (a dangling link)' if not os.path.exists(directory)
                                  else ''))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix='.write_test.'):
      pass
  except OSError as e:
    raise UserError(f'Cannot write to {what}{directory!r} ({describe_error(e)}); {fix}.') from None
