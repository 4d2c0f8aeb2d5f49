"""Stop requests: SIGTERM and Ctrl-C become "save this step and exit"."""

import signal

import jax
import numpy as np


class StopRequest:
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
    """Whether to stop after this step; `sync` marks the steps where processes agree."""
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
