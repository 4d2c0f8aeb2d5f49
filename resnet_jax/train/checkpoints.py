"""Orbax checkpoints of WORKDIR/checkpoints: the train state plus the data position.

Each step directory holds the item 'state' (StandardSave of a dict with 'params',
'batch_stats', 'opt_state', 'step', 'rng') and the item 'data' (JsonSave of
{'batches_consumed': ...}). Restoring onto a target with new shardings places the arrays
on however many devices the restoring run has.
"""

import json
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.load import model_from_config
from resnet_jax.train.state import initial_variables

BEST_METRIC = 'eval_top1'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints plus the best one by eval top-1."""
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(keep),
      policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  # A reader neither creates the directory nor deletes old steps.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else preservation, create=not read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state_tree: Any, data_position: dict,
         eval_top1: Optional[float] = None, force: bool = False) -> bool:
  """Starts an asynchronous save; `eval_top1` (when this step was evaluated) ranks it."""
  metrics = None if eval_top1 is None else {BEST_METRIC: float(eval_top1)}
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state_tree), data=ocp.args.JsonSave(data_position)),
      metrics=metrics, force=force)


def restore(manager: ocp.CheckpointManager, target_tree: Any, step: Optional[int] = None):
  """(state tree, data position) of `step` (default latest) laid out like `target_tree`.

  `target_tree` may hold arrays or `jax.ShapeDtypeStruct`s with shardings.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def unreadable_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints_unreadable')


def restore_latest_good(manager: ocp.CheckpointManager, target_tree: Any, workdir: str,
                        log=print):
  """(state tree, data position) of the newest checkpoint that reads back, or None.

  A checkpoint that fails to restore (truncated or corrupt files, an interrupted save) is
  reported and moved to WORKDIR/checkpoints_unreadable/, never deleted, so that the run
  continues from the one before and later saves cannot collide with it.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, target_tree, step)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read: fall back)
      reason = (str(e).strip().splitlines() or [''])[0][:300]
      moved = os.path.join(unreadable_dir(workdir), f'{step}.{int(time.time())}')
      log(f'WARNING: checkpoint {step} in {checkpoint_dir(workdir)} is unreadable '
          f'({type(e).__name__}: {reason}); moving it to {moved} and falling back to '
          f'the previous one.')
      _move_aside(manager, step, moved)
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int, destination: str):
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.move(os.path.join(manager.directory, str(step)), destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'move_aside_{step}')
  manager.reload()


def restore_variables(workdir: str, target: Any, step: Optional[int] = None) -> dict:
  """{'params', 'batch_stats'} of a training run's checkpoint, laid out like `target`
  (arrays or ShapeDtypeStructs with shardings); the optimizer state is not read."""
  manager = create_manager(workdir, read_only=True)  # never creates or deletes
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)}; train first or '
                            f'pass another --workdir.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)))
  return {key: restored['state'][key] for key in ('params', 'batch_stats')}


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
  target = jax.jit(lambda: initial_variables(model, jax.random.PRNGKey(0),
                                             (1, size, size, model.in_channels)),
                   out_shardings=sharding)()
  return model, restore_variables(workdir, target, step)
