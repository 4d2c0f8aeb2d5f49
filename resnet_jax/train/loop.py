"""The training loop: set up a run from a config, restore it, train, evaluate, checkpoint."""

import contextlib
import sys
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from resnet_jax.data import create_pipeline
from resnet_jax.errors import Interrupted
from resnet_jax.train import (checkpoint_format, checkpoints, config_schema, divergence,
                              parallel, run_dir, workdir_lock)
from resnet_jax.train.build import RunParts, initialize_from
from resnet_jax.train.memory_saving import build_run_that_fits
from resnet_jax.train.evaluation import evaluate_split
from resnet_jax.train.metrics import (MetricWindow, MetricWriter, Progress, log, log_eval,
                                      log_train, progress_bar)
from resnet_jax.train.preemption import StopRequest
from resnet_jax.train.profiling import StepProfiler
from resnet_jax.train.state import TrainState
from resnet_jax.train.watchdog import StepWatchdog


class _Run(NamedTuple):
  mesh: Mesh
  pipeline: object
  parts: RunParts
  manager: ocp.CheckpointManager


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest good checkpoint; returns the
  final eval metrics.

  A workdir is resumed only by the same model and run-defining settings, and trained by
  one run at a time (WORKDIR/.lock); SIGTERM or Ctrl-C saves the current step and raises
  `Interrupted`; a non-finite step raises NonFiniteLossError (or is skipped with
  config.skip_nonfinite_steps) before any checkpoint could hold it.
  """
  with contextlib.ExitStack() as held:  # the workdir lock, once taken
    held.enter_context(checkpoint_format.quiet_save_errors())  # one message, not orbax's logs
    run = _set_up(config, workdir, held)
    state, start_step, window_rows = _restore(run, config, workdir)
    step, eval_results, stop_signal = _train(run, config, workdir, state, start_step,
                                             window_rows)
  if stop_signal:
    interrupted = Interrupted(stop_signal, step)
    log(str(interrupted))
    raise interrupted
  if jax.process_index() == 0:
    _plot(workdir)
  return eval_results


def _plot(workdir: str):
  """WORKDIR/curves.png; a run that trained to the end is not failed by its plot (a full
  disk is one warning line)."""
  from resnet_jax.plot import plot_runs  # pylint: disable=g-import-not-at-top
  try:
    plot_runs([workdir], run_dir.curves_path(workdir))
  except OSError as e:
    log(f'WARNING: could not write {run_dir.curves_path(workdir)} ({e.strerror or e}); '
        f'`python -m resnet_jax.plot {workdir}` draws it once there is space.')


def _set_up(config, workdir: str, held: contextlib.ExitStack) -> _Run:
  """Checks everything checkable, builds the run and takes the workdir."""
  mesh = parallel.create_mesh()
  config_schema.check_config(config, jax.device_count())
  pipeline = create_pipeline(config)
  config_schema.check_eval_batch_size(config, pipeline.split_size(config.eval_split),
                                      jax.device_count())
  pipeline.check_files((config.train_split, config.eval_split))  # before any step reads them
  if jax.process_index() == 0:  # every folder and file it will write
    run_dir.check_writable(workdir)
  # memory_saving='auto' is chosen here, by compiling the train step.
  parts = build_run_that_fits(config, mesh, pipeline.num_classes, pipeline.channels,
                              pipeline.steps_per_epoch, log)
  held.enter_context(workdir_lock.hold(workdir))  # before orbax lists or deletes a step
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
  if manager.all_steps():
    for change in run_dir.check_workdir_matches(workdir, config, parts.spec):
      log(f'Resuming with a changed execution setting: {change}')
  return _Run(mesh, pipeline, parts, manager)


def _restore(run: _Run, config, workdir: str):
  """(state, step, log-window rows) of the newest readable checkpoint, or a fresh state
  (from config.init_from when set) at step 0."""
  state = run.parts.init_state(jax.random.PRNGKey(config.seed))
  # Refuses (UserError) a checkpoint that does not fit this config, and a workdir whose
  # checkpoints are all unreadable; config.json is rewritten only once the run fits.
  restored = checkpoints.restore_latest_good(run.manager, state.to_checkpoint(), workdir,
                                             log, config)
  run_dir.write_run_files(workdir, config, run.parts.spec)
  if restored is None:
    if config.init_from:
      state = initialize_from(config, state, run.parts.spec, run.mesh)
    return state, 0, ()
  tree, position = restored
  log(f'Resumed from {run_dir.checkpoint_dir(workdir)} at step '
      f'{position["batches_consumed"]}.')
  return (state.from_checkpoint(tree), position['batches_consumed'],
          position.get('log_window', ()))


def _train(run: _Run, config, workdir: str, state: TrainState, start_step: int,
           window_rows) -> tuple:
  """Steps from `start_step` to the end or to a stop request; returns (the last step,
  its eval results, the signal that stopped it or None)."""
  total_steps, sharded = run.parts.total_steps, parallel.batch_sharding(run.mesh)
  if start_step >= total_steps:  # e.g. a finished job requeued, or fewer steps asked for
    done = 'has trained all' if start_step == total_steps else 'is past the config\'s'
    log(f'Nothing to train: the run in {workdir} is at step {start_step} and {done} '
        f'{total_steps} steps. Raise --config.num_train_steps (or num_epochs) to train on.')
    return start_step, {}, None
  writer, stop, window = MetricWriter(workdir), StopRequest(), MetricWindow(window_rows)
  progress = Progress(start_step, total_steps, config.batch_size)
  batches = parallel.device_batches(run.pipeline.train_batches(start_step), sharded)
  log(f'Training {config.model} on {config.dataset}: {total_steps} steps of '
      f'{config.batch_size} images ({run.pipeline.steps_per_epoch} per epoch) on '
      f'{jax.device_count()} device(s).')
  step, eval_results, stopping = start_step, {}, False
  bar = progress_bar(total_steps, start_step)
  watchdog = StepWatchdog(config.stall_factor, config.stall_exit, _log_any_process)
  profiler = StepProfiler(config.profile_steps, workdir)
  try:
    while step < total_steps and not stopping:
      profiler.before_step(step)
      state, metrics = run.parts.train_fn(state, next(batches))
      step += 1
      profiler.after_step(step, metrics)
      watchdog.dispatched(metrics)
      window.add(step, metrics)
      bar.update()
      if step == start_step + 1:  # leave compilation out of images/second and the ETA
        jax.block_until_ready(metrics)
        progress = Progress(step, total_steps, config.batch_size)
      log_due = _every(step, config.log_every_steps)
      stopping = stop.requested(step)
      last = step == total_steps or stopping
      if log_due or last:
        _read_window(window, config)
        log_train(writer, progress, step, total_steps, window,
                  float(run.parts.learning_rate_fn(step - 1)), config.skip_nonfinite_steps)
        if log_due or step == total_steps:  # a stop keeps its rows for the resumed run
          window = MetricWindow()
      top1 = None
      with watchdog.paused():  # evaluating and saving are not steps
        if _every(step, config.eval_every_steps) or step == total_steps:
          eval_results, top1 = _evaluate_and_log(run, config, workdir, step, state, window,
                                                 writer)
        if _every(step, config.checkpoint_every_steps) or last:
          _save(run, config, step, state, window, top1, force=last)
  finally:
    profiler.stop()
    watchdog.close()
    bar.close()
    stop.restore_handlers()
    try:
      if sys.exc_info()[0] is None:
        checkpoints.wait_until_saved(run.manager)
      else:  # the error on its way up says more than a failure of the same save
        with contextlib.suppress(Exception):
          run.manager.wait_until_finished()
    finally:
      writer.close()
  return step, eval_results, (stop.signal or 'SIGTERM') if step < total_steps else None


def _evaluate_and_log(run: _Run, config, workdir: str, step: int, state: TrainState,
                      window: MetricWindow, writer: MetricWriter):
  """(eval results, the top-1 of config.best_metric) of `step`, logged as eval/...
  and, with a weight EMA, of the EMA as eval_ema/... (returned as 'ema_' keys)."""
  results = _evaluate(run, config, workdir, step, state, window)
  log_eval(writer, step, results)
  if state.ema is None:
    return results, results['top1']
  ema_results = _evaluate(run, config, workdir, step, state.ema_state(), window, state)
  log_eval(writer, step, ema_results, prefix='eval_ema')
  best = ema_results if config.best_metric == 'eval_ema/top1' else results
  return {**results, **{f'ema_{k}': v for k, v in ema_results.items()}}, best['top1']


def _evaluate(run: _Run, config, workdir: str, step: int, state: TrainState,
              window: MetricWindow, saved_state: Optional[TrainState] = None) -> dict:
  """Eval results of `step`; if evaluating fails, the step is saved before the error
  propagates, so the steps trained are not lost."""
  try:
    return evaluate_split(run.parts.eval_fn, state, run.pipeline, config.eval_split,
                          config.eval_batch_size, parallel.batch_sharding(run.mesh))
  except Exception:
    _save(run, config, step, saved_state or state, window, force=True)
    log(f'Evaluation at step {step} failed; saved step {step} first, so the same command '
        f'does not train it again (`python -m resnet_jax.evaluate --workdir {workdir}` '
        f'evaluates it).')
    raise


def _read_window(window: MetricWindow, config):
  divergence.check_finite(window.read(), config.skip_nonfinite_steps)


def _save(run: _Run, config, step: int, state: TrainState, window: MetricWindow,
          top1: Optional[float] = None, force: bool = False):
  """Starts saving `step`; `top1` (when this step was evaluated) ranks it for keeping."""
  _read_window(window, config)  # raises before saving if a step since the last check was not finite
  epoch, batches_into_epoch = divmod(step, run.pipeline.steps_per_epoch)
  # epoch .. process_count say where the data stands in words a changed run can check;
  # the run-defining settings (batch_size among them) are checked on restore.
  position = {'batches_consumed': step, **run_dir.run_settings(config),
              'steps_per_epoch': run.pipeline.steps_per_epoch, 'epoch': epoch,
              'epoch_examples_consumed': batches_into_epoch * config.batch_size,
              'process_count': jax.process_count(), 'log_window': window.rows}
  checkpoints.save(run.manager, step, state.to_checkpoint(), position, top1, force=force)


def _log_any_process(message: str):
  print(message, flush=True)  # the stuck process may not be process 0


def _every(step: int, period: int) -> bool:
  """Whether a periodic action is due; a period <= 0 means only at the end."""
  return period > 0 and step % period == 0
