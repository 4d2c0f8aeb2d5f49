"""Stop requests: SIGTERM and Ctrl-C become "save this step and exit"."""

import os
import signal

import jax


class StopRequest:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a request to save and exit after a step.

  One process: the request stops after the current step. Several processes: JAX's
  preemption service (started by jax.distributed.initialize) catches SIGTERM on any
  process and, through the coordination service, makes every process agree on the step
  to stop at (`reached_preemption_sync_point`, a local check on each step: no per-step
  communication). Ctrl-C is forwarded to it as a SIGTERM to this process.
  """

  def __init__(self):
    self.signal = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    # With several processes, SIGTERM belongs to JAX's notifier: a Python handler
    # would replace it.
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
    self.signal = signal.Signals(signum).name  # no printing here: it may interrupt a print
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # tells the preemption service

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (called after every step)."""
    if not self._multi:
      return self.signal is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal = 'SIGTERM'  # whichever process was signalled: all exit alike (143)
      return True
    return False

  def restore_handlers(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
