"""The trainer's checkpoints: what it saves, which steps it keeps, and how it restores.

What a step holds, and reading it, is `checkpoint_format`; the folders are `run_dir`'s.
The trainer's restore refuses a step whose recorded settings differ from its config, so a
lost or damaged config.json never lets another run's settings resume it. Restoring onto a
target with new shardings places the arrays on however many devices the restoring run
has.

"Could not read" and "does not match this run" are different answers: an unreadable step
(truncated files, an incomplete save) is moved aside by the trainer and skipped by readers;
a step whose saved tree differs from the run's (another optimizer, another model) is a
UserError that names the difference.
"""

import os
import shutil
import time
from typing import Any, List, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.errors import CheckpointSaveError, UserError, os_error_reason
from resnet_jax.train.checkpoint_format import (DATA_ITEM, STATE_ITEM, first_line,
                                               read_position, read_step, retired_keys,
                                               saved_state_tree, step_vanished,
                                               tree_differences)
from resnet_jax.train.run_dir import (CONFIG_JSON, changed_settings, checkpoint_dir, in_saved_layout,
                                      setting_differences, unreadable_dir)

BEST_METRIC = 'eval_top1'
_UNKNOWN = object()  # a step whose score cannot be read: it is never deleted


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
      return read_position(self.directory, info.step).get(BEST_METRIC, _UNKNOWN)
    except (OSError, ValueError, AttributeError):
      return _UNKNOWN


def create_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """The trainer's writer of WORKDIR/checkpoints: asynchronous saves, keeping the last
  `keep` checkpoints plus the best one by eval top-1 (`LatestAndBest`)."""
  directory = checkpoint_dir(workdir)
  options = ocp.CheckpointManagerOptions(preservation_policy=LatestAndBest(directory, keep),
                                         enable_async_checkpointing=True)
  handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state_tree: Any, data_position: dict,
         eval_top1: Optional[float] = None, force: bool = False) -> bool:
  """Starts an asynchronous save; `eval_top1` (when this step was evaluated) ranks it.

  A failure of this save or of the one before it (orbax reports a background failure at
  the next call) is a CheckpointSaveError."""
  score = None if eval_top1 is None else float(eval_top1)
  try:
    return manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state_tree),
        DATA_ITEM: ocp.args.JsonSave({**data_position, BEST_METRIC: score})}),
        metrics={BEST_METRIC: score}, force=force)
  except Exception as e:  # pylint: disable=broad-except  (any failure of the writer)
    raise _save_error(manager, e) from None


def wait_until_saved(manager: ocp.CheckpointManager):
  """Waits for the save in flight; its failure is a CheckpointSaveError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from None


def _save_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointSaveError:
  try:
    steps = sorted(int(n) for n in os.listdir(manager.directory) if n.isdigit())
  except OSError:
    steps = []
  return CheckpointSaveError(
      f'Saving a checkpoint to {manager.directory} failed ({_os_error(error)}). The '
      f'checkpoints saved before it are intact ({steps or "none yet"}): free disk space or '
      f'make the folder writable, then run the same command to resume.')


def _os_error(error: Exception) -> str:
  """The operating system's words for `error` (orbax and TensorStore wrap them)."""
  return os_error_reason(error) or first_line(error)


def _mismatch_error(workdir: str, step: int, differences: List[str], config) -> UserError:
  settings = changed_settings(workdir, config) if config is not None else []
  why = (f'settings changed since it was saved: {"; ".join(settings)}. Its tree differs: '
         if settings else 'its tree differs from this run\'s: ')
  return UserError(
      f'Checkpoint {step} in {checkpoint_dir(workdir)} does not fit this run (it reads '
      f'fine; nothing was moved): {why}{"; ".join(differences)}. Pass a new --workdir to '
      f'train with these settings, or resume with the settings the checkpoints were made '
      f'with (see {os.path.join(workdir, CONFIG_JSON)}).')


# --- the trainer's restore --------------------------------------------------------------

def restore_latest_good(manager: ocp.CheckpointManager, target_tree: Any, workdir: str,
                        log=print, config=None):
  """(state tree, data position) of the newest checkpoint that reads back on every
  process, or None when the workdir has none.

  Only a checkpoint that cannot be read (truncated or corrupt files, an interrupted save)
  is reported and moved to WORKDIR/checkpoints_unreadable/, never deleted, and the one
  before is tried. One whose saved tree does not fit `target_tree` (e.g. another momentum
  setting changes the optimizer state) is a UserError naming the changed `config` keys.
  When no checkpoint reads but some were set aside, it refuses rather than start over.

  With several processes there is one decision: the steps tried are process 0's list,
  and a step is used only if every process read it (an all-gather of each process's
  verdict); otherwise every process falls back to the same older step.
  """
  for step in _steps_of_process_0(manager):
    tree, error = _read_here(manager, step, target_tree, workdir, config)
    if error is not None and step_vanished(manager.directory, step):  # not ours to judge
      raise error  # (checked before any process could move it aside)
    if error is not None and jax.process_count() > 1:  # only process 0 logs
      print(f'Process {jax.process_index()} cannot read checkpoint {step}: '
            f'{first_line(error)}', flush=True)
    failed = _processes_that_failed(error is not None)
    if not failed:
      return tree
    moved = os.path.join(unreadable_dir(workdir), f'{step}.{int(time.time())}')
    where = ('' if jax.process_count() == 1 else
             f' on process(es) {failed} of {jax.process_count()}')
    why = f' ({first_line(error)})' if error is not None else ''
    log(f'WARNING: checkpoint {step} in {checkpoint_dir(workdir)} is unreadable{where}'
        f'{why}; moving it to {moved} and falling back to the previous one.')
    _move_aside(manager, step, moved)
  aside = unreadable_dir(workdir)
  if os.path.isdir(aside) and os.listdir(aside):
    raise UserError(
        f'No readable checkpoint in {checkpoint_dir(workdir)}; the unreadable ones are in '
        f'{aside}: {", ".join(sorted(os.listdir(aside)))}. Nothing was deleted. To train '
        f'this workdir from step 0, move or remove {aside}; or pass a new --workdir.')
  return None


def _steps_of_process_0(manager: ocp.CheckpointManager) -> List[int]:
  """The saved steps, newest first, as process 0 lists them (one list for all)."""
  steps = sorted(manager.all_steps(), reverse=True)
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
  padded = np.zeros(count, np.int64)
  padded[:min(count, len(steps))] = steps[:count]
  return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def _read_here(manager, step, target_tree, workdir, config):
  """(the step's (state tree, data position), None) or (None, the read error) on this
  process; a step that does not fit the run raises UserError."""
  try:
    saved = saved_state_tree(manager.directory, step)
  except Exception as e:  # pylint: disable=broad-except  (unreadable metadata)
    return None, e
  retired = retired_keys(saved, target_tree)
  # Compared in the saved layout: read_step stacks or unstacks a step saved before
  # scan_blocks was switched.
  differences = tree_differences({k: v for k, v in saved.items() if k not in retired},
                                 in_saved_layout(saved, target_tree)[0])
  if differences:
    raise _mismatch_error(workdir, step, differences, config)
  try:
    state, data = read_step(manager.directory, step, target_tree, partial=bool(retired))
  except Exception as e:  # pylint: disable=broad-except  (the tree fits: a read failure)
    return None, e
  if config is not None:
    _check_recorded_settings(workdir, step, data, config)
  return (state, data), None


def _check_recorded_settings(workdir: str, step: int, data: dict, config):
  """Refuses a step whose 'data' item records other run-defining settings than `config`
  (it holds another run's batches), whatever config.json says or whether it exists."""
  differences = setting_differences(data if isinstance(data, dict) else {}, config)
  if differences:
    settings = '; '.join(f'{key}={saved!r} (this config: {now!r})'
                         for key, saved, now in differences)
    raise UserError(
        f'Checkpoint {step} in {checkpoint_dir(workdir)} was made by a run with {settings} '
        f'(it reads fine; nothing was moved). Pass a new --workdir to train with these '
        f'settings, or resume with the settings the checkpoint was made with.')


def _processes_that_failed(failed_here: bool) -> List[int]:
  if jax.process_count() == 1:
    return [0] if failed_here else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array(failed_here))
  return [i for i, failed in enumerate(np.asarray(flags).reshape(-1)) if failed]


def _move_aside(manager: ocp.CheckpointManager, step: int, destination: str):
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.move(os.path.join(manager.directory, str(step)), destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'move_aside_{step}')
  manager.reload()
