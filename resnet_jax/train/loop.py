"""The training loop: build everything from a config, train, evaluate, checkpoint, log.

The step is compiled once over a Mesh of all devices with the batch sharded along 'data'
and the state replicated, so the same code runs on one CPU, N devices and multi-host pods.
"""

import collections
import contextlib
import functools
import json
import os
import signal
import tempfile
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.data import create_pipeline
from resnet_jax import run_dir
from resnet_jax.errors import Interrupted, NonFiniteLossError, UserError
from resnet_jax.train import checkpoints, config_schema, optim, workdir_lock
from resnet_jax.train.metrics import MetricWriter, Progress, log, progress_bar
from resnet_jax.train.state import TrainState, create_train_state, model_spec
from resnet_jax.train.step import eval_step, train_step

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh of every device of every process, along the data axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global arrays sharded along the data axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_batches(batches: Iterator[dict], sharding: NamedSharding,
                   ahead: int = 2) -> Iterator[dict]:
  """`global_batch` of each host batch, copied to the devices `ahead` batches before the
  step that takes it, so the copies overlap with the steps still running."""
  queue = collections.deque()
  for batch in batches:
    queue.append(global_batch(batch, sharding))
    if len(queue) > ahead:
      yield queue.popleft()
  yield from queue


def compile_steps(mesh: Mesh, normalization: Optional[str] = None,
                  skip_nonfinite: bool = False):
  """(train_step, eval_step) jitted over `mesh`; train_step donates the old state.

  Both normalize uint8 pixels with the `normalization` statistics (None: images go to the
  model as they are).
  """
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  step = functools.partial(train_step, normalization=normalization,
                           skip_nonfinite=skip_nonfinite)
  train = jax.jit(step, in_shardings=(replicated, sharded),
                  out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, normalization=normalization),
                     in_shardings=(replicated, sharded), out_shardings=replicated)
  return train, evaluate


def evaluate_split(eval_fn: Callable, state: TrainState, pipeline, split: str,
                   batch_size: int, sharding: NamedSharding) -> dict:
  """Loss, top-1 and top-5 over every example of `split` (padding masked out)."""
  num_batches, batches = pipeline.eval_batches(split, batch_size)
  totals = None
  with progress_bar(num_batches, desc=f'eval {split}', unit='batch') as bar:
    for batch in device_batches(batches(), sharding):
      sums = eval_fn(state, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      bar.update()
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': count}


def create_model_checked(spec: dict, image_size: int):
  """The model of `spec`, or a UserError naming the valid choices."""
  try:
    model = run_dir.model_from_config(spec)
  except (ValueError, TypeError) as e:
    raise UserError(f'config.model={spec["name"]!r} with {spec}: {e}') from None
  if image_size < model.total_stride:
    raise UserError(f'config.image_size={image_size} is too small for {spec["name"]}, '
                           f'which downsamples by {model.total_stride}: use image_size >= '
                           f'{model.total_stride}.')
  return model


class _StopRequest:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a request to save and exit after this step.

  With several processes the request is shared at log steps only (an all-gather of a
  flag), so every process saves the same step and none waits forever on the others.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None
    self._previous = {}
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
    self.signal = signal.Signals(signum).name  # no printing here: it may interrupt a print

  def requested(self, sync: bool) -> bool:
    if jax.process_count() == 1:
      return self.signal is not None
    if not sync:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array(self.signal is not None))
    return bool(np.any(flags))

  def restore_handlers(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class _Window:
  """Host copies of the per-step metrics since the last log line.

  Metrics stay on the device until a log or a save reads them, so the host never waits on
  a step it has just dispatched. Every row is checked for a non-finite loss when read,
  and a save reads them all first: no checkpoint is written after a non-finite step.
  The rows go into the checkpoint, so a resumed run logs the same averages.
  """

  def __init__(self, skip_nonfinite: bool, rows=()):
    self.skip_nonfinite = skip_nonfinite
    self.rows = [tuple(r) for r in rows]  # (step, loss, accuracy, finite)
    self._pending = []

  def add(self, step: int, metrics: dict):
    self._pending.append((step, metrics))

  def read(self):
    """Fetches the pending metrics; raises at the first non-finite step unless skipping."""
    host = jax.device_get([m for _, m in self._pending])
    for (step, _), m in zip(self._pending, host):
      finite = bool(m['finite'])
      if not finite and not self.skip_nonfinite:
        raise NonFiniteLossError(
            f'Non-finite loss ({float(m["loss"])}) or gradients at step {step}; stopping '
            f'before any checkpoint holds them (the last one is from an earlier step). Lower '
            f'config.learning_rate, check the data, or set config.skip_nonfinite_steps=True '
            f'to skip such steps.')
      if not finite:
        log(f'WARNING: step {step} had a non-finite loss or gradients; skipped it.')
      self.rows.append((step, float(m['loss']), float(m['accuracy']), finite))
    self._pending = []

  def means(self):
    finite = [r for r in self.rows if r[3]] or self.rows
    loss = float(np.mean(np.asarray([r[1] for r in finite], np.float64)))
    accuracy = float(np.mean(np.asarray([r[2] for r in finite], np.float64)))
    return loss, accuracy, len(self.rows) - sum(r[3] for r in self.rows)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest good checkpoint; returns the
  final eval metrics.

  A workdir is resumed only by the same model and run-defining settings, and trained by
  one run at a time (WORKDIR/.lock); SIGTERM or Ctrl-C saves the current step and raises
  `Interrupted`; a non-finite step raises NonFiniteLossError (or is skipped with
  config.skip_nonfinite_steps) before any checkpoint could hold it.
  """
  with contextlib.ExitStack() as held:  # the workdir lock, once taken
    return _train_and_evaluate(config, workdir, held)


def _train_and_evaluate(config, workdir: str, held: contextlib.ExitStack) -> dict:
  mesh = create_mesh()
  config_schema.check_config(config, jax.device_count())
  if jax.process_index() == 0:
    run_dir.check_writable(workdir)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  pipeline = create_pipeline(config)
  pipeline.check_files((config.train_split, config.eval_split))  # before any step reads them
  spec = model_spec(config, pipeline.num_classes, pipeline.channels)
  model = create_model_checked(spec, config.image_size)
  held.enter_context(workdir_lock.hold(workdir))  # before orbax lists or deletes a step
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
  if manager.all_steps():
    run_dir.check_workdir_matches(workdir, config, spec)

  steps_per_epoch = pipeline.steps_per_epoch
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
  tx = optim.create_optimizer(config, learning_rate_fn)
  input_shape = (1, config.image_size, config.image_size, pipeline.channels)
  init = functools.partial(create_train_state, model, tx, input_shape=input_shape,
                           label_smoothing=config.label_smoothing)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))

  start_step, window_rows = 0, ()
  # Refuses (UserError) a checkpoint that does not fit this config, and a workdir whose
  # checkpoints are all unreadable; config.json is rewritten only once the run fits.
  restored = checkpoints.restore_latest_good(manager, state.to_checkpoint(), workdir, log,
                                             config)
  run_dir.write_run_files(workdir, config, spec)
  if restored is not None:
    tree, data_position = restored
    state, start_step = state.from_checkpoint(tree), data_position['batches_consumed']
    window_rows = data_position.get('log_window', ())
    log(f'Resumed from {run_dir.checkpoint_dir(workdir)} at step {start_step}.')
  if restored is None and config.init_from:
    state = _init_from(config, state, spec, replicated)

  skip_nonfinite = config.skip_nonfinite_steps
  train_fn, eval_fn = compile_steps(mesh, pipeline.normalization, skip_nonfinite)
  writer = MetricWriter(workdir)
  progress = Progress(start_step, total_steps, config.batch_size)
  stop = _StopRequest()
  batches = device_batches(pipeline.train_batches(start_step), sharded)
  window, eval_results = _Window(skip_nonfinite, window_rows), {}
  log(f'Training {config.model} on {config.dataset}: {total_steps} steps of '
      f'{config.batch_size} images ({steps_per_epoch} per epoch) on {jax.device_count()} '
      f'device(s).')
  step = start_step
  bar = progress_bar(total_steps, start_step)
  try:
    while step < total_steps:
      state, metrics = train_fn(state, next(batches))
      window.add(step + 1, metrics)
      step += 1
      bar.update()
      if step == start_step + 1:  # leave compilation out of images/second and the ETA
        jax.block_until_ready(metrics)
        progress = Progress(step, total_steps, config.batch_size)
      log_due = _every(step, config.log_every_steps)
      stopping = stop.requested(sync=log_due or step == total_steps)
      last = step == total_steps or stopping
      if log_due or last:
        window.read()
        _log_train(writer, progress, step, total_steps, window, learning_rate_fn)
        if log_due or step == total_steps:  # a stop keeps its rows for the resumed run
          window = _Window(skip_nonfinite)
      top1 = None
      if _every(step, config.eval_every_steps) or step == total_steps:
        try:
          eval_results = evaluate_split(eval_fn, state, pipeline, config.eval_split,
                                        config.eval_batch_size, sharded)
        except Exception:  # an evaluation failure must not cost the steps trained
          _save(manager, step, state, window, config, steps_per_epoch, force=True)
          log(f'Evaluation at step {step} failed; saved step {step} first, so the same '
              f'command does not train it again (`python -m resnet_jax.evaluate --workdir '
              f'{workdir}` evaluates it).')
          raise
        _log_eval(writer, step, eval_results)
        top1 = eval_results['top1']
      if _every(step, config.checkpoint_every_steps) or last:
        _save(manager, step, state, window, config, steps_per_epoch, top1, force=last)
      if stopping:
        break
  finally:
    bar.close()
    stop.restore_handlers()
    manager.wait_until_finished()
    writer.close()
  if step < total_steps:
    interrupted = Interrupted(stop.signal or 'SIGTERM', step)
    log(str(interrupted))
    raise interrupted
  if jax.process_index() == 0:
    from resnet_jax.plot import plot_runs  # pylint: disable=g-import-not-at-top
    plot_runs([workdir], os.path.join(workdir, 'curves.png'))
  return eval_results


def _save(manager, step, state, window, config, steps_per_epoch, top1=None, force=False):
  """Starts saving `step`; `top1` (when this step was evaluated) ranks it for keeping."""
  window.read()  # raises before saving if a step since the last check was not finite
  position = {'batches_consumed': step, 'batch_size': config.batch_size,
              'steps_per_epoch': steps_per_epoch, 'log_window': window.rows}
  checkpoints.save(manager, step, state.to_checkpoint(), position, top1, force=force)


def _init_from(config, state, spec, replicated):
  from resnet_jax import load_variables  # pylint: disable=g-import-not-at-top
  try:
    from resnet_jax import pretrained  # pylint: disable=g-import-not-at-top
    loaded = (pretrained.load_pretrained(config.init_from)[1]
              if pretrained.is_pretrained_name(config.init_from)
              else load_variables(config.init_from))
  except (ValueError, OSError) as e:
    raise UserError(f'config.init_from={config.init_from!r}: {e}') from None
  merged = run_dir.merge_pretrained({'params': state.params, 'batch_stats': state.batch_stats},
                            loaded, spec.get('scan_blocks', False))
  merged = jax.device_put(merged, replicated)
  log(f'Initialized from {config.init_from}.')
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


def _every(step: int, period: int) -> bool:
  """Whether a periodic action is due; a period <= 0 means only at the end."""
  return period > 0 and step % period == 0


def _log_train(writer, progress, step, total_steps, window, learning_rate_fn):
  loss, accuracy, skipped = window.means()
  scalars = {'train/loss': loss, 'train/accuracy': accuracy,
             'train/learning_rate': float(learning_rate_fn(step - 1)),
             **{f'train/{k}': v for k, v in progress.update(step).items()}}
  if window.skip_nonfinite:
    scalars['train/skipped_steps'] = skipped
  writer.write(step, scalars)
  log(f'step {step}/{total_steps} | loss {loss:.4f} | acc {accuracy:.4f} | '
      f'lr {scalars["train/learning_rate"]:.4g} | '
      f'{scalars["train/images_per_sec"]:,.0f} img/s | ETA {progress.eta(step)}')


def _log_eval(writer, step, results):
  writer.write(step, {f'eval/{k}': v for k, v in results.items() if k != 'count'})
  log(f'eval at step {step}: loss {results["loss"]:.4f} | top-1 {results["top1"]:.4f} | '
      f'top-5 {results["top5"]:.4f} ({int(results["count"])} images)')
