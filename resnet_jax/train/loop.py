"""The training loop: build everything from a config, train, evaluate, checkpoint, log.

The step is compiled once over a Mesh of all devices with the batch sharded along 'data'
and the state replicated, so the same code runs on one CPU, N devices and multi-host pods.
"""

import functools
import json
import math
import os
import signal
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.data import create_pipeline
from resnet_jax.train import checkpoints, optim
from resnet_jax.train.metrics import MetricWriter, Progress, log
from resnet_jax.train.state import (TrainState, create_model_from_spec, create_train_state,
                                    model_spec)
from resnet_jax.train.step import eval_step, train_step

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh of every device of every process, along the data axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global arrays sharded along the data axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def compile_steps(mesh: Mesh):
  """(train_step, eval_step) jitted over `mesh`; train_step donates the old state."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  train = jax.jit(train_step, in_shardings=(replicated, sharded),
                  out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated)
  return train, evaluate


def evaluate_split(eval_fn: Callable, state: TrainState, pipeline, split: str,
                   batch_size: int, sharding: NamedSharding) -> dict:
  """Loss, top-1 and top-5 over every example of `split` (padding masked out)."""
  _, batches = pipeline.eval_batches(split, batch_size)
  totals = None
  for batch in batches():
    sums = eval_fn(state, global_batch(batch, sharding))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': count}


def check_config(config, num_devices: int):
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ValueError(f'config.{key}={config[key]} must be a multiple of the number of '
                       f'devices ({num_devices}).')


def merge_pretrained(state_variables: dict, loaded: dict, scan: bool) -> dict:
  """Loaded {'params', 'batch_stats'} over fresh ones; a head of another shape stays fresh."""
  from resnet_jax.models import scan_variables  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  loaded = scan_variables(loaded) if scan else loaded
  merged = {}
  for collection, fresh in state_variables.items():
    fresh_flat = traverse_util.flatten_dict(fresh, sep='/')
    loaded_flat = traverse_util.flatten_dict(loaded.get(collection, {}), sep='/')
    missing = sorted(set(fresh_flat) - set(loaded_flat))
    extra = sorted(set(loaded_flat) - set(fresh_flat))
    missing_body = [k for k in missing if not k.startswith('fc/')]
    if missing_body or [k for k in extra if not k.startswith('fc/')]:
      raise ValueError(f'init_from checkpoint does not fit the model ({collection}): missing '
                       f'{missing_body[:10]}, unexpected {extra[:10]}. Check config.model.')
    out = {}
    for key, value in fresh_flat.items():
      old = loaded_flat.get(key)
      keep_fresh = old is None or (key.startswith('fc/') and np.shape(old) != value.shape)
      if not keep_fresh and np.shape(old) != value.shape:
        raise ValueError(f'init_from: {collection}/{key} has shape {np.shape(old)}, the model '
                         f'expects {value.shape}.')
      out[key] = value if keep_fresh else np.asarray(old, value.dtype)
    merged[collection] = traverse_util.unflatten_dict(out, sep='/')
  return merged


def _write_run_files(workdir: str, config, spec: dict):
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'model.json'), 'w') as f:
    json.dump(spec, f, indent=2)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


class _StopRequest:
  """Turns SIGTERM into a request to save and exit at the next step."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the
  final eval metrics."""
  mesh = create_mesh()
  check_config(config, jax.device_count())
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  pipeline = create_pipeline(config)
  spec = model_spec(config, pipeline.num_classes, pipeline.channels)
  _write_run_files(workdir, config, spec)
  model = create_model_from_spec(spec)

  steps_per_epoch = pipeline.steps_per_epoch
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
  tx = optim.create_optimizer(config, learning_rate_fn)
  input_shape = (1, config.image_size, config.image_size, pipeline.channels)
  init = functools.partial(create_train_state, model, tx, input_shape=input_shape,
                           label_smoothing=config.label_smoothing)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))

  manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    tree, data_position = checkpoints.restore(manager, state.to_checkpoint())
    state, start_step = state.from_checkpoint(tree), data_position['batches_consumed']
    log(f'Resumed from {checkpoints.checkpoint_dir(workdir)} at step {start_step}.')
  elif config.init_from:
    from resnet_jax import load_variables  # pylint: disable=g-import-not-at-top
    merged = merge_pretrained({'params': state.params, 'batch_stats': state.batch_stats},
                              load_variables(config.init_from), spec.get('scan_blocks', False))
    merged = jax.device_put(merged, replicated)
    state = state.replace(params=merged['params'], batch_stats=merged['batch_stats'])
    log(f'Initialized from {config.init_from}.')

  train_fn, eval_fn = compile_steps(mesh)
  writer = MetricWriter(workdir)
  progress = Progress(start_step, total_steps, config.batch_size)
  stop = _StopRequest()
  batches = pipeline.train_batches(start_step)
  pending, eval_results = [], {}
  log(f'Training {config.model} on {config.dataset}: {total_steps} steps of '
      f'{config.batch_size} images ({steps_per_epoch} per epoch) on {jax.device_count()} '
      f'device(s).')
  step = start_step
  while step < total_steps:
    state, metrics = train_fn(state, global_batch(next(batches), sharded))
    pending.append(metrics)
    step += 1
    if step == start_step + 1:  # leave compilation out of images/second and the ETA
      jax.block_until_ready(metrics)
      progress = Progress(step, total_steps, config.batch_size)
    last = step == total_steps or stop.requested
    if _every(step, config.log_every_steps) or last:
      _log_train(writer, progress, step, total_steps, pending, learning_rate_fn)
      pending = []
    top1 = None
    if _every(step, config.eval_every_steps) or last:
      eval_results = evaluate_split(eval_fn, state, pipeline, config.eval_split,
                                    config.eval_batch_size, sharded)
      _log_eval(writer, step, eval_results)
      top1 = eval_results['top1']
    if _every(step, config.checkpoint_every_steps) or last:
      position = {'batches_consumed': step, 'batch_size': config.batch_size,
                  'steps_per_epoch': steps_per_epoch}
      checkpoints.save(manager, step, state.to_checkpoint(), position, top1, force=last)
    if stop.requested:
      log(f'SIGTERM: saved step {step}, exiting.')
      break
  manager.wait_until_finished()
  writer.close()
  if jax.process_index() == 0 and step == total_steps:
    from resnet_jax.plot import plot_runs  # pylint: disable=g-import-not-at-top
    plot_runs([workdir], os.path.join(workdir, 'curves.png'))
  return eval_results


def _every(step: int, period: int) -> bool:
  """Whether a periodic action is due; a period <= 0 means only at the end."""
  return period > 0 and step % period == 0


def _log_train(writer, progress, step, total_steps, pending, learning_rate_fn):
  host = jax.device_get(pending)
  loss = float(np.mean([m['loss'] for m in host]))
  accuracy = float(np.mean([m['accuracy'] for m in host]))
  if not math.isfinite(loss):
    raise FloatingPointError(f'Loss is {loss} at step {step}; stopping. Lower the learning '
                             f'rate or check the data.')
  scalars = {'train/loss': loss, 'train/accuracy': accuracy,
             'train/learning_rate': float(learning_rate_fn(step - 1)),
             **{f'train/{k}': v for k, v in progress.update(step).items()}}
  writer.write(step, scalars)
  log(f'step {step}/{total_steps} | loss {loss:.4f} | acc {accuracy:.4f} | '
      f'lr {scalars["train/learning_rate"]:.4g} | '
      f'{scalars["train/images_per_sec"]:,.0f} img/s | ETA {progress.eta(step)}')


def _log_eval(writer, step, results):
  writer.write(step, {f'eval/{k}': v for k, v in results.items() if k != 'count'})
  log(f'eval at step {step}: loss {results["loss"]:.4f} | top-1 {results["top1"]:.4f} | '
      f'top-5 {results["top5"]:.4f} ({int(results["count"])} images)')
