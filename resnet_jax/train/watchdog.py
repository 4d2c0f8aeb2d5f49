"""The step watchdog: a stuck host (a hung filesystem, a wedged device) looks like a
step that never ends, on it and on every process waiting for it in a collective."""

import contextlib
import os
import queue
import statistics
import threading
import time
from typing import Callable, Optional

import jax

MIN_STEPS = 5  # steps timed before the watchdog judges (the first includes compilation)
WINDOW = 100  # the median is over the last WINDOW step times


class StepWatchdog:
  """Warns (or, with `exit_on_stall`, exits with status 1) when no step has finished for
  `factor` times the median step time; factor 0 turns it off.

  Steps are dispatched asynchronously, so a step counts as finished when its outputs are
  ready (a helper thread waits for them), not when the loop moves on. The check runs in
  its own thread, so it also fires when the main thread is blocked in a collective or a
  data read. `paused()` covers the work between steps that is not a step (evaluation,
  the blocking part of a save).
  """

  def __init__(self, factor: float, exit_on_stall: bool, log: Callable[[str], None],
               exit_fn: Callable[[int], None] = os._exit, poll_s: float = 0.2):
    self.factor, self.exit_on_stall, self.log, self.exit_fn = factor, exit_on_stall, log, exit_fn
    self._times, self._last, self._paused, self._warned = [], None, 0, False
    self._stop, self._dispatched = threading.Event(), queue.Queue()
    self._threads = []
    if factor > 0:
      self._threads = [threading.Thread(target=target, daemon=True, name=f'watchdog_{name}')
                       for name, target in (('wait', self._wait_for_steps),
                                            ('watch', lambda: self._watch(poll_s)))]
      for thread in self._threads:
        thread.start()

  def dispatched(self, outputs):
    """Records a dispatched step; it finishes when `outputs` are ready."""
    if self._threads:
      self._dispatched.put(outputs)

  def _wait_for_steps(self):
    while not self._stop.is_set():
      try:
        outputs = self._dispatched.get(timeout=0.2)
      except queue.Empty:
        continue
      try:
        jax.block_until_ready(outputs)
      except Exception:  # pylint: disable=broad-except  (the main thread reports it)
        return
      self._step_done()

  def _step_done(self):
    now = time.monotonic()
    if self._last is not None and not self._paused:
      self._times = (self._times + [now - self._last])[-WINDOW:]
    self._last, self._warned = now, False

  @contextlib.contextmanager
  def paused(self):
    self._paused += 1
    try:
      yield
    finally:
      self._paused -= 1
      self._last = time.monotonic()

  def stalled_for(self) -> Optional[float]:
    """Seconds since the last step, when that is over the limit; else None."""
    if self._paused or self._last is None or len(self._times) < MIN_STEPS:
      return None
    waited = time.monotonic() - self._last
    return waited if waited > self.factor * statistics.median(self._times) else None

  def _watch(self, poll_s: float):
    while not self._stop.wait(poll_s):
      waited = self.stalled_for()
      if waited is None or self._warned:
        continue
      self._warned = True
      median = statistics.median(self._times)
      message = (f'no step has finished on process {jax.process_index()} for {waited:.1f} s, '
                 f'{self.factor:g} times the median step time ({median:.3f} s): this host '
                 f'or another process is stuck (a data read, the filesystem, a device).')
      if not self.exit_on_stall:
        self.log(f'WARNING: {message} Still waiting (config.stall_exit=True exits instead).')
        continue
      self.log(f'Error: {message} Exiting (config.stall_exit); run the same command to '
               f'resume from the newest checkpoint.')
      self.exit_fn(1)

  def close(self):
    self._stop.set()
    for thread in self._threads:
      thread.join(timeout=1)  # a thread blocked on a lost collective is left behind
