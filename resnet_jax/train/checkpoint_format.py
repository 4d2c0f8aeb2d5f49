"""What a checkpoint holds, and the one reader of a saved step.

A training workdir's checkpoints/ (`run_dir.CHECKPOINTS_DIR`) holds orbax's steps; each
step directory has the item 'state' (a StandardSave of a dict with 'params',
'batch_stats', 'opt_state', 'step', and 'ema' when the run keeps a weight EMA; before
2026-12 also an unused 'rng', which reading goes around) and the item 'data' (a JsonSave
of {'batches_consumed': ..., 'eval_top1': <top-1 if this step was evaluated, else null>,
the run-defining settings of `run_dir.RUN_DEFINING_KEYS` (before 2026-12 batch_size
only), ...}). The 'params' and 'batch_stats' may be in the `scan_blocks` layout.

A converted checkpoint's variables/ is an orbax StandardCheckpointer save of
{'params', 'batch_stats'} in the unrolled layout.

`read_state` is the one reader of a step's 'state' item: the trainer's restore
(`checkpoints.restore_latest_good`), `load_variables`/`load_model`/`restore_run`
(evaluate, predict, export, convert, init_from) and the tests read through it. Nothing
here creates, moves or deletes a checkpoint, so it is safe on a workdir that train.py is
writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError
from resnet_jax.models import ResNet, scan_variables, unscan_variables
from resnet_jax.train import run_dir
from resnet_jax.train.state import EMA_KEY

STATE_ITEM, DATA_ITEM = 'state', 'data'
DATA_FILE = 'metadata'  # the file orbax's JsonCheckpointHandler writes in the 'data' item
VARIABLES = ('params', 'batch_stats')
# Keys of the 'state' item that older versions saved and this one no longer has: reading
# goes around them (the train state's unused 'rng', until 2026-12).
RETIRED_KEYS = ('rng',)
# How often a reader lists the steps again when the ones it listed vanish under it (a
# running train.py rotates old steps away).
READ_ATTEMPTS = 8


# --- the steps of a workdir ---------------------------------------------------------------

def saved_steps(directory: str) -> List[int]:
  """The committed steps in DIRECTORY (a workdir's checkpoints/), oldest first."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return sorted(ocp.utils.checkpoint_steps(directory))


def step_vanished(directory: str, step: int) -> bool:
  return not os.path.isdir(os.path.join(directory, str(step)))


def saved_state_tree(directory: str, step: int):
  """The metadata tree (shapes and dtypes) of a step's 'state' item."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  metadata = ocp.PyTreeCheckpointHandler().metadata(_item(directory, step, STATE_ITEM))
  tree = getattr(metadata, 'tree', metadata)
  if tree is None:
    raise ValueError(f'no metadata for the {STATE_ITEM!r} item')
  return tree


def read_position(directory: str, step: int) -> dict:
  """A step's 'data' item (where the data stands, its score, the run's settings)."""
  with open(os.path.join(directory, str(step), DATA_ITEM, DATA_FILE)) as f:
    return json.load(f)


def read_state(directory: str, step: int, target_tree: Any = None, partial: bool = False):
  """A step's 'state' item, read by this process alone: no barrier with the others
  (CheckpointManager.restore has one), so a process that fails to read does not leave the
  others waiting.

  `target_tree` (arrays or ShapeDtypeStructs with shardings) says the layout, the
  `scan_blocks` one included: a step saved in the other layout (before a resumed run
  switched scan_blocks) is read as saved, then stacked or unstacked
  (`run_dir.in_saved_layout`). `partial` reads only the keys it has (orbax's standard
  restore insists on the whole saved tree). Without a target: the whole saved tree as
  numpy arrays on the host.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = _item(directory, step, STATE_ITEM)
  try:
    saved = saved_state_tree(directory, step)
    if target_tree is None:
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
      return ocp.PyTreeCheckpointHandler().restore(
          path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    target_tree, to_target_layout = run_dir.in_saved_layout(saved, target_tree)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
    if partial:
      return to_target_layout(ocp.PyTreeCheckpointHandler().restore(
          path, args=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True)))
    return to_target_layout(ocp.StandardCheckpointHandler().restore(
        path, args=ocp.args.StandardRestore(abstract)))
  except Exception:
    drop_closed_loop_reports()
    raise


def read_step(directory: str, step: int, target_tree: Any, partial: bool = False):
  """(state tree, data position) of `step` (`read_state`, then the 'data' item)."""
  return read_state(directory, step, target_tree, partial), read_position(directory, step)


def _item(directory: str, step: int, item: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.path.abspath(directory)) / str(step) / item


# --- comparing a saved tree with a run's ----------------------------------------------------

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


def retired_keys(saved_tree, target_tree) -> List[str]:
  """The `RETIRED_KEYS` that a step saved and `target_tree` no longer has."""
  return [k for k in RETIRED_KEYS if k in saved_tree and k not in target_tree]


# --- orbax's reports of a failed read or save ----------------------------------------------

def first_line(e: Exception) -> str:
  return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}'


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


class QuietSaveErrors(logging.Filter):
  """Drops the error records (each with a traceback) that orbax's background threads log
  when a save or read fails, and asyncio's 'Event loop is closed' ones of its read loops:
  a failed save reaches the trainer as one CheckpointSaveError and convert as one
  UserError, a failed read as one warning (`checkpoints.restore_latest_good`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (f'{os.sep}orbax{os.sep}' in (record.pathname or '')
                or 'Event loop is closed' in str(error))


@contextlib.contextmanager
def quiet_save_errors():
  """`QuietSaveErrors` on absl's logger (orbax logs through absl) and asyncio's, and, for
  the rest of the process, no 'Event loop is closed' tracebacks from orbax's threads
  (`drop_closed_loop_reports`)."""
  quiet = QuietSaveErrors()
  drop_closed_loop_reports()  # what a failed save's threads print, from its first moment
  loggers = [logging.getLogger('absl'), logging.getLogger('asyncio')]
  for logger in loggers:
    logger.addFilter(quiet)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(quiet)


# --- converted checkpoints ------------------------------------------------------------------

def save_converted(variables: Mapping[str, Any], model_config: Mapping[str, Any],
                   directory: run_dir.PathLike,
                   input_spec: Optional[Mapping[str, Any]] = None) -> None:
  """A converted checkpoint directory: model.json, variables/ (orbax) and, when given,
  input_spec.json."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  Path(directory).mkdir(parents=True, exist_ok=True)
  run_dir.write_model_config(directory, model_config)
  if input_spec is not None:
    run_dir.write_input_spec(directory, input_spec)
  with quiet_save_errors(), ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(run_dir.variables_dir(directory), dict(variables))
    checkpointer.wait_until_finished()


def is_converted_checkpoint(path: run_dir.PathLike) -> bool:
  """Whether `path` is what `save_converted` writes: model.json and variables/, and
  maybe input_spec.json, no more."""
  path = Path(path)
  try:
    names = {p.name for p in path.iterdir()} - {run_dir.INPUT_SPEC_JSON}
    if names != {run_dir.MODEL_JSON, run_dir.VARIABLES_DIR}:
      return False
    run_dir.read_model_config(path)
  except (OSError, ValueError):
    return False
  return run_dir.is_converted_dir(path)


def _restore_converted(path: run_dir.PathLike) -> Dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(run_dir.variables_dir(path))
  except Exception:
    drop_closed_loop_reports()
    raise


# --- variables of a checkpoint directory ----------------------------------------------------

def load_variables(path: run_dir.PathLike, raw_weights: bool = False) -> Dict[str, Any]:
  """{'params', 'batch_stats'} (unrolled layout) from a converted checkpoint directory or
  the newest complete, readable step of a training workdir (its weight EMA when the run
  kept one, unless `raw_weights`; `restore_variables`)."""
  path = Path(path)
  if run_dir.is_converted_dir(path):
    state = _restore_converted(path)
  elif run_dir.is_training_workdir(path):
    state = restore_variables(path, raw_weights=raw_weights)  # the newest step that reads
  elif not path.exists():
    raise run_dir.not_a_checkpoint(path, 'it does not exist')
  else:
    raise run_dir.not_a_checkpoint(path, f'it has neither {run_dir.VARIABLES_DIR}/ nor '
                                         f'{run_dir.CHECKPOINTS_DIR}/')
  variables = {c: state[c] for c in VARIABLES}
  return jax.tree.map(jnp.asarray, unscan_variables(variables))


def load_model(path: run_dir.PathLike, raw_weights: bool = False,
               **overrides: Any) -> Tuple[ResNet, Dict[str, Any]]:
  """(model, variables) from a checkpoint directory; `overrides` go to `create_model`
  (e.g. dtype=jnp.bfloat16). Variables come in the layout the model uses (scanned when
  it is built with scan_blocks=True); a training run's weight EMA when it kept one,
  unless `raw_weights`."""
  model = run_dir.model_from_config({**run_dir.read_model_config(path), **overrides})
  variables = load_variables(path, raw_weights)
  return model, scan_variables(variables) if model.scan_blocks else variables


def restore_run(workdir: str, step: Optional[int] = None, sharding=None,
                raw_weights: bool = False):
  """(model, {'params', 'batch_stats'}) of a training run, on any number of devices.

  The model is rebuilt from WORKDIR/model.json; the variables (in the model's own layout,
  scanned if it scans) are placed with `sharding`, by default replicated on all devices;
  they are the run's weight EMA when it kept one, unless `raw_weights`.
  """
  model = run_dir.model_from_config(run_dir.read_model_config(workdir))
  if sharding is None:
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())
  size = model.total_stride
  target = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, model.in_channels)), train=False))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        target)
  return model, restore_variables(workdir, target, step, raw_weights=raw_weights)


def _warn(message: str):
  print(message, flush=True)


def restore_variables(workdir: run_dir.PathLike, target: Any = None,
                      step: Optional[int] = None, log: Callable[[str], None] = _warn,
                      raw_weights: bool = False) -> dict:
  """{'params', 'batch_stats'} of a training run's newest complete checkpoint that reads
  (or of `step`), laid out like `target` (arrays or ShapeDtypeStructs with shardings;
  default: as saved, on one device). The optimizer state is not read.

  When the run kept a weight EMA (config.ema_decay > 0) these are the EMA's, as its
  evaluation reports them (eval_ema/...), and `log` says so in one line; `raw_weights`
  reads the trained ones.

  Safe while a train.py writes the workdir: orbax lists only committed steps; a step that
  vanishes while read (rotated away by the writer) makes it list again; an unreadable one
  is reported and the one before is read. It never creates, moves or deletes anything.
  """
  directory = run_dir.checkpoint_dir(workdir)
  failures = {}
  for attempt in range(READ_ATTEMPTS):
    # The last pass reads on past vanished steps, to an older one the writer keeps (its
    # best): a writer that saves faster than one read takes would otherwise win every pass.
    relist = attempt < READ_ATTEMPTS - 1
    try:
      return _read_newest_readable(directory, target, step, failures, log, raw_weights,
                                   relist)
    except (FileNotFoundError, _ListAgain):  # the writer rotated a step away: list again
      continue
    except _NothingReadable:
      break
  if not failures:
    raise UserError(f'{directory} holds no saved step; train first or pass another '
                    f'workdir.')
  raise UserError(f'No readable checkpoint in {directory}: '
                  + '; '.join(f'step {s}: {why}' for s, why in sorted(failures.items())))


class _ListAgain(Exception):
  """A step vanished while it was read: the writer rotated it away."""


class _NothingReadable(Exception):
  """Every listed step failed to read and the listing did not change."""


def _read_newest_readable(directory: str, target: Any, step: Optional[int], failures: dict,
                          log: Callable[[str], None], raw_weights: bool,
                          relist: bool = True) -> dict:
  """One pass of `restore_variables` over the steps orbax lists now; a step that vanishes
  while read ends the pass (`relist`) or is passed over."""
  listed = saved_steps(directory)
  if step is not None and step not in listed:
    raise UserError(f'{directory} has no step {step}; it has {listed}.')
  for candidate in [step] if step is not None else reversed(listed):
    try:
      return _read_variables(directory, candidate, target, raw_weights, log)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (fall back, never move)
      failures[candidate] = first_line(e)
      if step_vanished(directory, candidate):
        if relist:
          raise _ListAgain() from None
        continue
      log(f'WARNING: checkpoint {candidate} in {directory} is unreadable '
          f'({failures[candidate]}); reading the one before.')
  raise _NothingReadable()


def _read_variables(directory: str, step: int, target: Any, raw_weights: bool,
                    log: Callable[[str], None]) -> dict:
  saved = saved_state_tree(directory, step)
  missing = [c for c in VARIABLES if c not in saved]
  if missing:
    raise UserError(f'The {STATE_ITEM!r} item of step {step} in {directory} has no '
                    f'{" or ".join(missing)}; it holds {sorted(saved)}.')
  ema = EMA_KEY in saved and not raw_weights
  saved = {c: (saved[EMA_KEY] if ema else saved)[c] for c in VARIABLES}
  if target is None:
    # An explicit single-device target: without one orbax would rebuild the saving run's
    # shardings, which fails ('Topology mismatch') when it had more devices than this one.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
  else:
    differences = tree_differences(saved, run_dir.in_saved_layout(saved, target)[0])
    if differences:
      raise UserError(f'Checkpoint {step} in {directory} does not fit the model of '
                      f'model.json: {"; ".join(differences)}.')
  if not ema:
    return read_state(directory, step, target, partial=True)
  variables = read_state(directory, step, {EMA_KEY: target}, partial=True)[EMA_KEY]
  log(f'Using the weight EMA of checkpoint {step} in {directory} (--raw_weights or '
      f'raw_weights=True reads the trained weights).')
  return variables
