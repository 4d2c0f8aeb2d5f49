"""Where metrics go (console lines, WORKDIR/metrics.jsonl, TensorBoard event files), and
the window of per-step metrics between two log lines.

Only process 0 writes. Each line of metrics.jsonl is {"step": s, "train/loss": ..., ...};
a resumed run appends, and readers keep the last value written for a step and skip a line
that a killed run left half-written.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from resnet_jax.errors import MetricWriteError, describe_error
from resnet_jax.train import run_dir


class MetricWriter:
  """Writes scalars for a step to the console, metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._file = self._tensorboard = None
    self._failed = False  # a write failed: close() does not warn again
    if self.enabled:
      self._file = open(run_dir.metrics_path(workdir), 'a')  # in the workdir the loop made
      if self._file.tell() and not _ends_with_newline(self._file.name):
        self._file.write('\n')  # close a line a killed run left half-written
      # Flax's writer, on the TensorFlow the input pipeline has loaded already (tensorboardX
      # loads PyTorch whenever it is installed: seconds at every start).
      from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
      self._tensorboard = tensorboard.SummaryWriter(workdir, auto_flush=False)

  def write(self, step: int, scalars: dict):
    """Appends `scalars` of `step`; a failed write (a full disk) is a MetricWriteError."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    try:
      self._file.write(json.dumps({'step': int(step), **scalars}) + '\n')
      self._file.flush()
      for key, value in scalars.items():
        self._tensorboard.scalar(key, value, step)
    except _write_errors() as e:
      self._failed = True
      raise MetricWriteError(
          f'Writing the metrics of step {step} to {self._file.name} failed ({describe_error(e)}): '
          'free disk space or make the folder writable, then run the same command to '
          'resume.') from None

  def close(self):
    """Closes the files; a failure to flush them (a full disk) is one warning line, so
    that it does not hide the error that ended the run."""
    if not self.enabled:
      return
    errors = []
    for output in (self._file, self._tensorboard):
      try:
        output.close()
      except _write_errors() as e:
        errors.append(e)
    if errors and not self._failed:
      log(f'WARNING: the last metrics may not be written to {self._file.name} '
          f'({describe_error(errors[0])}).')


def _write_errors() -> tuple:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (loaded by MetricWriter)
  return OSError, tf.errors.OpError


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def _records(path: str):
  """The complete JSON lines of `path` (a line cut short by a kill does not parse)."""
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and 'step' in record:
        yield record


def read_metrics(workdir: str) -> dict:
  """{key: ([steps], [values])} from WORKDIR/metrics.jsonl, last write per step winning."""
  rows = {}
  for record in _records(run_dir.metrics_path(workdir)):
    step = record.pop('step')
    for key, value in record.items():
      rows.setdefault(key, {})[step] = value
  return {key: tuple(zip(*sorted(values.items()))) for key, values in rows.items()}


def log(message: str):
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stdout)  # above any progress bar


def progress_bar(total: int, initial: int = 0, desc: str = 'train', unit: str = 'step'):
  """A tqdm bar with ETA on process 0, shown only when stderr is a terminal."""
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
              dynamic_ncols=True, disable=None if jax.process_index() == 0 else True)


class Progress:
  """Images/second and ETA between log lines."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self._step, self._time = start_step, time.perf_counter()
    self.rate = 0.0

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = step - self._step
    steps_per_sec = steps / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    if steps:
      self.rate = steps_per_sec
    return {'images_per_sec': self.rate * self.batch_size}

  def eta(self, step: int) -> str:
    if not self.rate:
      return '?'
    seconds = int((self.total_steps - step) / self.rate)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricWindow:
  """Host copies of the per-step metrics since the last log line.

  Metrics stay on the device until a log or a save reads them, so the host never waits on
  a step it has just dispatched. The rows go into the checkpoint, so a resumed run logs
  the same averages.
  """

  def __init__(self, rows=()):
    self.rows = [tuple(r) for r in rows]  # (step, loss, accuracy, finite)
    self._pending = []

  def add(self, step: int, metrics: dict):
    self._pending.append((step, metrics))

  def read(self) -> list:
    """Fetches the pending metrics to the host; returns their new rows."""
    host = jax.device_get([m for _, m in self._pending])
    new = [(step, float(m['loss']), float(m['accuracy']), bool(m['finite']))
           for (step, _), m in zip(self._pending, host)]
    self.rows += new
    self._pending = []
    return new

  def means(self):
    """(mean loss, mean accuracy) over the finite rows, and the number of other rows."""
    finite = [r for r in self.rows if r[3]] or self.rows
    loss = float(np.mean(np.asarray([r[1] for r in finite], np.float64)))
    accuracy = float(np.mean(np.asarray([r[2] for r in finite], np.float64)))
    return loss, accuracy, len(self.rows) - sum(r[3] for r in self.rows)


def log_train(writer: MetricWriter, progress: Progress, step: int, total_steps: int,
              window: MetricWindow, learning_rate: float, count_skipped: bool):
  """The train line of `step`: the window's means, the learning rate and the speed."""
  loss, accuracy, skipped = window.means()
  scalars = {'train/loss': loss, 'train/accuracy': accuracy,
             'train/learning_rate': learning_rate,
             **{f'train/{k}': v for k, v in progress.update(step).items()}}
  if count_skipped:
    scalars['train/skipped_steps'] = skipped
  writer.write(step, scalars)
  log(f'step {step}/{total_steps} | loss {loss:.4f} | acc {accuracy:.4f} | '
      f'lr {learning_rate:.4g} | {scalars["train/images_per_sec"]:,.0f} img/s | '
      f'ETA {progress.eta(step)}')


def log_eval(writer: MetricWriter, step: int, results: dict, prefix: str = 'eval'):
  """The eval line of `step` (`prefix` 'eval_ema' for the weight EMA's)."""
  writer.write(step, {f'{prefix}/{k}': v for k, v in results.items() if k != 'count'})
  log(f'{prefix} at step {step}: loss {results["loss"]:.4f} | top-1 {results["top1"]:.4f} | '
      f'top-5 {results["top5"]:.4f} ({int(results["count"])} images)')
