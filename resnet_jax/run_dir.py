"""The run directory: its layout, model.json and config.json, and reading variables back.

Two kinds of directory hold a model, both with model.json = {"name": <zoo name>,
"num_classes": N, ...other create_model overrides}:
  - a converted checkpoint (`python -m resnet_jax.convert`, `load_pretrained`): variables/,
    an orbax StandardCheckpointer save of {'params', 'batch_stats'} in the unrolled layout;
  - a training workdir (train.py): config.json (the run's config), checkpoints/ (orbax's
    CheckpointManager; each step has the item 'state', with at least 'params' and
    'batch_stats', possibly in the `scan_blocks` layout, and the item 'data'), and beside
    them metrics.jsonl, TensorBoard files and curves.png.

Both may hold input_spec.json beside model.json: how images become the model's inputs
(`resnet_jax.input_spec`; the conversion of pretrained weights and train.py write it).

This module is the only one that reads or writes model.json, input_spec.json and
config.json and the only reader of variables (`load_variables`, `restore_variables`): it
never creates, moves or deletes a checkpoint, so it is safe on a workdir that train.py is
writing. The trainer's own saving and restoring of the whole train state is `resnet_jax.train.checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError
from resnet_jax.models import ResNet, create_model, scan_variables, unscan_variables
from resnet_jax.models.resnet import EXECUTION_FIELDS
from resnet_jax.models.scan import is_scanned, scan_tree, unscan_tree

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

PathLike = Union[str, Path]
MODEL_JSON = 'model.json'
INPUT_SPEC_JSON = 'input_spec.json'  # how images become inputs (resnet_jax.input_spec)
CONFIG_JSON = 'config.json'
VARIABLES_DIR = 'variables'
CHECKPOINTS_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'
STATE_ITEM, DATA_ITEM = 'state', 'data'
# How often a reader lists the steps again when the ones it listed vanish under it (a
# running train.py rotates old steps away).
READ_ATTEMPTS = 8


def checkpoint_dir(workdir: PathLike) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def unreadable_dir(workdir: PathLike) -> str:
  return os.path.join(os.path.abspath(workdir), UNREADABLE_DIR)


# --- model.json and config.json --------------------------------------------------------

def _not_a_checkpoint(path: Path, reason: str) -> UserError:
  return UserError(f'{path} is not a resnet_jax checkpoint: {reason}. Expected a directory '
                    f'with {MODEL_JSON} and either {VARIABLES_DIR}/ (made by '
                    f'`python -m resnet_jax.convert`) or {CHECKPOINTS_DIR}/ (a training workdir).')


def read_model_config(path: PathLike) -> Dict[str, Any]:
  """The checkpoint's model.json: {'name': <zoo name>, 'num_classes': N, ...}."""
  path = Path(path)
  config_path = path / MODEL_JSON
  if not config_path.is_file():
    raise _not_a_checkpoint(path, f'it has no {MODEL_JSON}')
  try:
    config = json.loads(config_path.read_text())
  except ValueError as e:
    raise UserError(f'{config_path} is not valid JSON ({e}).') from None
  if not isinstance(config, dict) or 'name' not in config:
    raise UserError(f'{config_path} must be a JSON object with a "name" key (a zoo model '
                     f'name); got {config!r}.')
  return config


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
  overrides = config.model_overrides
  overrides = overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides or {})
  spec.update({k: v for k, v in overrides.items() if v is not None})
  return spec


def _write_atomically(path: Path, text: str) -> None:
  """Writes `path` so that a reader, a kill or a full disk leaves the old file or the new
  one, never an empty or partial one: a temporary file beside it, synced, then renamed."""
  temporary = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  # 0o666 (less the umask) as open() would give, not mkstemp's owner-only 0o600.
  handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


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
  writes them)."""
  from resnet_jax import input_spec  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  write_model_config(workdir, spec)
  write_input_spec(workdir, input_spec.of_run(config, spec['num_classes']).to_json())
  _write_atomically(Path(workdir, CONFIG_JSON), config.to_json_best_effort(indent=2))


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
  map of what that restores back to `target_tree`'s layout): a run resumed with
  `scan_blocks` switched reads the checkpoint as saved, then stacks or unstacks it.
  The train state is replicated (`train.parallel`), so one sharding serves every leaf."""
  if is_scanned(saved_tree.get('params', {})) == is_scanned(target_tree['params']):
    return target_tree, lambda tree: tree
  to_saved, to_target = ((unscan_tree, scan_tree) if is_scanned(target_tree['params'])
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


def check_writable(workdir: str, files: Tuple[str, ...] = ()):
  """Creates `workdir` if needed and proves that each folder the run writes takes files
  (the workdir, and checkpoints/ and checkpoints_unreadable/ when present) and
  that each of `files` (names in the workdir) present can be appended to, or raises one
  UserError naming the path and why (a read-only mount or folder, a file or a dangling
  link in the way), before any work that would be lost."""
  _check_directory(workdir, 'pass a writable --workdir', 'workdir ')
  fix = 'make it writable or move it away, or pass another --workdir'
  for directory in (checkpoint_dir(workdir), unreadable_dir(workdir)):
    if os.path.lexists(directory):  # else made in the workdir, which takes files
      _check_directory(directory, fix)
  for name in files:
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue  # created in the workdir, which takes files
    try:
      if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, 'it is a directory')
      with open(path, 'a'):  # appending nothing changes nothing
        pass
    except OSError as e:
      raise UserError(f'Cannot write to {path!r} ({_why(e)}); {fix}.') from None


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
    raise UserError(f'Cannot write to {what}{directory!r} ({_why(e)}); {fix}.') from None


def _why(error: OSError) -> str:
  return f'{type(error).__name__}: {error.strerror or error}'


# --- converted checkpoints --------------------------------------------------------------

def save_converted(variables: Mapping[str, Any], model_config: Mapping[str, Any],
                   directory: PathLike, input_spec: Optional[Mapping[str, Any]] = None) -> None:
  """A converted checkpoint directory: model.json, variables/ (orbax) and, when given,
  input_spec.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_model_config(directory, model_config)
  if input_spec is not None:
    write_input_spec(directory, input_spec)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory.absolute() / VARIABLES_DIR, dict(variables))
    checkpointer.wait_until_finished()


def is_converted_checkpoint(path: PathLike) -> bool:
  """Whether `path` is what `save_converted` writes: model.json and variables/, and
  maybe input_spec.json, no more."""
  path = Path(path)
  try:
    if {p.name for p in path.iterdir()} - {INPUT_SPEC_JSON} != {MODEL_JSON, VARIABLES_DIR}:
      return False
    read_model_config(path)
  except (OSError, ValueError):
    return False
  return (path / VARIABLES_DIR).is_dir()


def _restore_converted(directory: Path) -> Dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(directory.absolute())
  except Exception:
    drop_closed_loop_reports()
    raise


def load_variables(path: PathLike) -> Dict[str, Any]:
  """{'params', 'batch_stats'} (unrolled layout) from a converted checkpoint directory or
  the newest complete, readable step of a training workdir."""
  path = Path(path)
  if (path / VARIABLES_DIR).is_dir():
    state = _restore_converted(path / VARIABLES_DIR)
  elif (path / CHECKPOINTS_DIR).is_dir():
    state = restore_variables(path)  # the newest step that reads
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


def merge_pretrained(state_variables: dict, loaded: dict, scan: bool) -> dict:
  """Loaded {'params', 'batch_stats'} over fresh ones; a head of another shape stays fresh."""
  loaded = scan_variables(loaded) if scan else loaded
  merged = {}
  for collection, fresh in state_variables.items():
    fresh_flat = traverse_util.flatten_dict(fresh, sep='/')
    loaded_flat = traverse_util.flatten_dict(loaded.get(collection, {}), sep='/')
    missing = sorted(set(fresh_flat) - set(loaded_flat))
    extra = sorted(set(loaded_flat) - set(fresh_flat))
    missing_body = [k for k in missing if not k.startswith('fc/')]
    if missing_body or [k for k in extra if not k.startswith('fc/')]:
      raise UserError(f'init_from checkpoint does not fit the model ({collection}): missing '
                      f'{missing_body[:10]}, unexpected {extra[:10]}. Check config.model.')
    out = {}
    for key, value in fresh_flat.items():
      old = loaded_flat.get(key)
      keep_fresh = old is None or (key.startswith('fc/') and np.shape(old) != value.shape)
      if not keep_fresh and np.shape(old) != value.shape:
        raise UserError(f'init_from: {collection}/{key} has shape {np.shape(old)}, the model '
                        f'expects {value.shape}.')
      out[key] = value if keep_fresh else np.asarray(old, value.dtype)
    merged[collection] = traverse_util.unflatten_dict(out, sep='/')
  return merged


# --- reading variables of a training run ------------------------------------------------

def _key_name(key) -> str:
  for attribute in ('key', 'idx', 'name'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaves(tree) -> dict:
  """{'opt_state/1/0/trace/fc/kernel': (shape, dtype)}: orbax saves named tuples as dicts
  and tuples as lists, so paths are compared by their key names and indices."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(map(_key_name, path)): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in flat}


def tree_differences(saved, target, limit: int = 6) -> List[str]:
  """Readable differences between a checkpoint's tree metadata and a target tree."""
  saved, target = _leaves(saved), _leaves(target)
  out = [f'{p} is in the checkpoint only' for p in sorted(set(saved) - set(target))]
  out += [f'{p} is new in this run' for p in sorted(set(target) - set(saved))]
  out += [f'{p} is {saved[p][1]}{list(saved[p][0])} in the checkpoint, '
          f'{target[p][1]}{list(target[p][0])} now'
          for p in sorted(set(saved) & set(target)) if saved[p] != target[p]]
  return out[:limit] + ([f'... {len(out) - limit} more'] if len(out) > limit else [])


def saved_state_tree(manager: ocp.CheckpointManager, step: int):
  metadata = manager.item_metadata(step)[STATE_ITEM]
  tree = getattr(metadata, 'tree', metadata)
  if tree is None:
    raise ValueError(f'no metadata for the {STATE_ITEM!r} item')
  return tree


def step_vanished(manager: ocp.CheckpointManager, step: int) -> bool:
  return not os.path.isdir(os.path.join(manager.directory, str(step)))


def first_line(e: Exception) -> str:
  return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}'


@contextlib.contextmanager
def _quiet_absl():
  """Silences orbax's warning for every item we deliberately leave unread ('data')."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _warn(message: str):
  print(message, flush=True)


def _read_variables(manager: ocp.CheckpointManager, step: int, target: Any) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  saved = saved_state_tree(manager, step)
  missing = [c for c in ('params', 'batch_stats') if c not in saved]
  if missing:
    raise UserError(f'The {STATE_ITEM!r} item of step {step} in {manager.directory} has no '
                    f'{" or ".join(missing)}; it holds {sorted(saved)}.')
  saved = {c: saved[c] for c in ('params', 'batch_stats')}
  if target is None:
    # An explicit single-device target: without one orbax would rebuild the saving run's
    # shardings, which fails ('Topology mismatch') when it had more devices than this one.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
  else:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    differences = tree_differences(saved, target)
    if differences:
      raise UserError(f'Checkpoint {step} in {manager.directory} does not fit the model of '
                      f'model.json: {"; ".join(differences)}.')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)}))
  except Exception:
    drop_closed_loop_reports()
    raise
  return restored[STATE_ITEM]


def _is_closed_loop_error(error) -> bool:
  return isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)


def drop_closed_loop_reports():
  """After a failed read or save, orbax's threads may still schedule work on the event
  loop it closed, and each RuntimeError('Event loop is closed') they meet is printed as a
  traceback, later (tensorstore's callbacks print through sys.excepthook, garbage
  collection through sys.unraisablehook). The caller reports the failure in one line;
  this drops exactly those reports, for the rest of the process."""
  if getattr(sys.excepthook, 'drops_closed_loop_reports', False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(kind, error, traceback):
    if not _is_closed_loop_error(error):
      excepthook(kind, error, traceback)

  def on_unraisable(unraisable):
    if not _is_closed_loop_error(unraisable.exc_value):
      unraisablehook(unraisable)

  on_exception.drops_closed_loop_reports = True
  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


class _ListAgain(Exception):
  """A step vanished while it was read: the writer rotated it away."""


class _NothingReadable(Exception):
  """Every listed step failed to read and the listing did not change."""


def _read_newest_readable(directory: str, target: Any, step: Optional[int], failures: dict,
                          log: Callable[[str], None]) -> dict:
  """One pass of `restore_variables` over the steps orbax lists now."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  with _quiet_absl(), ocp.CheckpointManager(directory, options=options,
                                            item_handlers=handlers) as manager:
    listed = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in listed:
      raise UserError(f'{directory} has no step {step}; it has {sorted(listed)}.')
    for candidate in [step] if step is not None else listed:
      try:
        return _read_variables(manager, candidate, target)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (fall back, never move)
        failures[candidate] = first_line(e)
        if step_vanished(manager, candidate):
          raise _ListAgain() from None
        log(f'WARNING: checkpoint {candidate} in {directory} is unreadable '
            f'({failures[candidate]}); reading the one before.')
  raise _NothingReadable()


def restore_variables(workdir: PathLike, target: Any = None, step: Optional[int] = None,
                      log: Callable[[str], None] = _warn) -> dict:
  """{'params', 'batch_stats'} of a training run's newest complete checkpoint that reads
  (or of `step`), laid out like `target` (arrays or ShapeDtypeStructs with shardings;
  default: as saved, on one device). The optimizer state is not read.

  The one reader of workdir checkpoints, safe while a train.py writes the workdir: orbax
  lists only committed steps; a step that vanishes while read (rotated away by the writer)
  makes it list again; an unreadable one is reported and the one before is read. It never
  creates, moves or deletes anything.
  """
  directory = checkpoint_dir(workdir)
  failures = {}
  for _ in range(READ_ATTEMPTS):
    try:
      return _read_newest_readable(directory, target, step, failures, log)
    except (FileNotFoundError, _ListAgain):  # the writer rotated a step away: list again
      continue
    except _NothingReadable:
      break
  if not failures:
    raise UserError(f'{directory} holds no saved step; train first or pass another '
                    f'workdir.')
  raise UserError(f'No readable checkpoint in {directory}: '
                  + '; '.join(f'step {s}: {why}' for s, why in sorted(failures.items())))


def restore_run(workdir: str, step: Optional[int] = None, sharding=None):
  """(model, {'params', 'batch_stats'}) of a training run, on any number of devices.

  The model is rebuilt from WORKDIR/model.json; the variables (in the model's own layout,
  scanned if it scans) are placed with `sharding`, by default replicated on all devices.
  """
  model = model_from_config(read_model_config(workdir))
  if sharding is None:
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())
  size = model.total_stride
  target = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, model.in_channels)), train=False))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        target)
  return model, restore_variables(workdir, target, step)
