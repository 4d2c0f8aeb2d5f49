"""Orbax checkpoints of WORKDIR/checkpoints: the train state plus the data position.

Each step directory holds the item 'state' (StandardSave of a dict with 'params',
'batch_stats', 'opt_state', 'step', 'rng') and the item 'data' (JsonSave of
{'batches_consumed': ..., 'eval_top1': <top-1 if this step was evaluated, else null>}).
Restoring onto a target with new shardings places the arrays on however many devices the
restoring run has.

"Could not read" and "does not match this run" are different answers: an unreadable step
(truncated files, an incomplete save) is moved aside by the trainer and skipped by readers;
a step whose saved tree differs from the run's (another optimizer, another model) is a
UserError that names the difference.
"""

import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, List, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.errors import UserError
from resnet_jax.load import model_from_config
from resnet_jax.train.state import initial_variables

BEST_METRIC = 'eval_top1'
STATE, DATA = 'state', 'data'
DATA_FILE = 'metadata'  # the file JsonCheckpointHandler writes in the 'data' item
_UNKNOWN = object()  # a step whose score cannot be read: it is never deleted
# How often a reader lists the steps again when the ones it listed vanish under it (a
# running train.py rotates old steps away).
READ_ATTEMPTS = 8


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class LatestAndBest(policies.PreservationPolicy):
  """Keeps the newest `keep` steps, the best by eval top-1, and any step whose score it
  cannot read.

  Orbax remembers the metrics of steps saved by the current process only (it writes them
  to disk only for `best_fn`, whose policy in turn deletes steps without metrics), so a
  step saved by an earlier run reads its score back from its own 'data' item, which was
  committed with it. A step whose 'data' cannot be read, or that predates the score (no
  'eval_top1' key), is kept: no deletion depends on a metric that may be missing.
  """

  def __init__(self, directory: str, keep: int):
    self.directory, self.keep = directory, keep

  def should_preserve(self, checkpoints, *, context=None) -> List[bool]:
    del context
    scores = [self._score(info) for info in checkpoints]
    ranked = [(s, info.step) for s, info in zip(scores, checkpoints)
              if s is not _UNKNOWN and s is not None]
    best = max(ranked)[1] if ranked else None
    newest = set(sorted(info.step for info in checkpoints)[-self.keep:])
    return [info.step in newest or info.step == best or s is _UNKNOWN
            for s, info in zip(scores, checkpoints)]

  def _score(self, info):
    if info.metrics is not None and BEST_METRIC in info.metrics:
      return info.metrics[BEST_METRIC]  # saved by this process
    try:
      with open(os.path.join(self.directory, str(info.step), DATA, DATA_FILE)) as f:
        return json.load(f).get(BEST_METRIC, _UNKNOWN)
    except (OSError, ValueError, AttributeError):
      return _UNKNOWN


def create_manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints plus the best one by eval top-1 (`LatestAndBest`)."""
  directory = checkpoint_dir(workdir)
  # A reader neither creates the directory nor deletes old steps.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else LatestAndBest(directory, keep),
      create=not read_only, enable_async_checkpointing=not read_only)
  handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state_tree: Any, data_position: dict,
         eval_top1: Optional[float] = None, force: bool = False) -> bool:
  """Starts an asynchronous save; `eval_top1` (when this step was evaluated) ranks it."""
  score = None if eval_top1 is None else float(eval_top1)
  return manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state_tree),
      DATA: ocp.args.JsonSave({**data_position, BEST_METRIC: score})}),
      metrics={BEST_METRIC: score}, force=force)


def restore(manager: ocp.CheckpointManager, target_tree: Any, step: Optional[int] = None):
  """(state tree, data position) of `step` (default latest) laid out like `target_tree`.

  `target_tree` may hold arrays or `jax.ShapeDtypeStruct`s with shardings.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract), DATA: ocp.args.JsonRestore()}))
  return restored[STATE], restored[DATA]


def unreadable_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints_unreadable')


# --- comparing a saved tree with the run's ---------------------------------------------

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


def changed_settings(workdir: str, config) -> List[str]:
  """'key: saved -> now' for each config key that differs from WORKDIR/config.json."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    now = json.loads(config.to_json_best_effort())
  except (OSError, ValueError, AttributeError):
    return []
  return [f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in sorted(set(saved) | set(now))
          if saved.get(k) != now.get(k)]


def _mismatch_error(workdir: str, step: int, differences: List[str], config) -> UserError:
  settings = changed_settings(workdir, config) if config is not None else []
  why = (f'settings changed since it was saved: {"; ".join(settings)}. Its tree differs: '
         if settings else 'its tree differs from this run\'s: ')
  return UserError(
      f'Checkpoint {step} in {checkpoint_dir(workdir)} does not fit this run (it reads '
      f'fine; nothing was moved): {why}{"; ".join(differences)}. Pass a new --workdir to '
      f'train with these settings, or resume with the settings the checkpoints were made '
      f'with (see {os.path.join(workdir, "config.json")}).')


def _saved_tree(manager: ocp.CheckpointManager, step: int):
  metadata = manager.item_metadata(step)[STATE]
  tree = getattr(metadata, 'tree', metadata)
  if tree is None:
    raise ValueError(f'no metadata for the {STATE!r} item')
  return tree


def _vanished(manager: ocp.CheckpointManager, step: int) -> bool:
  return not os.path.isdir(os.path.join(manager.directory, str(step)))


def _first_line(e: Exception) -> str:
  return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:300]}'


# --- the trainer's restore --------------------------------------------------------------

def restore_latest_good(manager: ocp.CheckpointManager, target_tree: Any, workdir: str,
                        log=print, config=None):
  """(state tree, data position) of the newest checkpoint that reads back, or None when
  the workdir has none.

  Only a checkpoint that cannot be read (truncated or corrupt files, an interrupted save)
  is reported and moved to WORKDIR/checkpoints_unreadable/, never deleted, and the one
  before is tried. One whose saved tree does not fit `target_tree` (e.g. another momentum
  setting changes the optimizer state) is a UserError naming the changed `config` keys.
  When no checkpoint reads but some were set aside, it refuses rather than start over.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      differences = tree_differences(_saved_tree(manager, step), target_tree)
      if differences:
        raise _mismatch_error(workdir, step, differences, config)
      return restore(manager, target_tree, step)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the tree fits: a read failure)
      if _vanished(manager, step):  # not ours to judge (another process removed it)
        raise
      moved = os.path.join(unreadable_dir(workdir), f'{step}.{int(time.time())}')
      log(f'WARNING: checkpoint {step} in {checkpoint_dir(workdir)} is unreadable '
          f'({_first_line(e)}); moving it to {moved} and falling back to the previous one.')
      _move_aside(manager, step, moved)
  aside = unreadable_dir(workdir)
  if os.path.isdir(aside) and os.listdir(aside):
    raise UserError(
        f'No readable checkpoint in {checkpoint_dir(workdir)}; the unreadable ones are in '
        f'{aside}: {", ".join(sorted(os.listdir(aside)))}. Nothing was deleted. To train '
        f'this workdir from step 0, move or remove {aside}; or pass a new --workdir.')
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int, destination: str):
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.move(os.path.join(manager.directory, str(step)), destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'move_aside_{step}')
  manager.reload()


# --- readers: evaluate, predict, convert, load_variables --------------------------------

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
  saved = _saved_tree(manager, step)
  missing = [c for c in ('params', 'batch_stats') if c not in saved]
  if missing:
    raise UserError(f'The {STATE!r} item of step {step} in {manager.directory} has no '
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
  restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)}))
  return restored[STATE]


class _ListAgain(Exception):
  """A step vanished while it was read: the writer rotated it away."""


class _NothingReadable(Exception):
  """Every listed step failed to read and the listing did not change."""


def _read_newest_readable(directory: str, target: Any, step: Optional[int], failures: dict,
                          log: Callable[[str], None]) -> dict:
  """One pass of `restore_variables` over the steps orbax lists now."""
  handlers = {STATE: ocp.PyTreeCheckpointHandler()}
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
        failures[candidate] = _first_line(e)
        if _vanished(manager, candidate):
          raise _ListAgain() from None
        log(f'WARNING: checkpoint {candidate} in {directory} is unreadable '
            f'({failures[candidate]}); reading the one before.')
  raise _NothingReadable()


def restore_variables(workdir: str, target: Any = None, step: Optional[int] = None,
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
  with open(os.path.join(workdir, 'model.json')) as f:
    model = model_from_config(json.load(f))
  if sharding is None:
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())
  size = model.total_stride
  target = jax.eval_shape(lambda: initial_variables(model, jax.random.PRNGKey(0),
                                                    (1, size, size, model.in_channels)))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        target)
  return model, restore_variables(workdir, target, step)
