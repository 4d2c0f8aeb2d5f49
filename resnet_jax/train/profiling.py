"""A jax.profiler trace of chosen training steps (config.profile_steps), for TensorBoard.

`tensorboard --logdir WORKDIR/profile` shows it in the profile plugin (pip install
tensorboard-plugin-profile): the device time of each op, and the host's input pipeline
beside it. Process 0 traces, the others train on.
"""

import os
import shutil
from typing import Sequence

import jax

from resnet_jax.errors import os_error_reason
from resnet_jax.train.metrics import log

PROFILE_DIR = 'profile'  # below the workdir


class StepProfiler:
  """Traces the steps that take the step count from `start` to `end` (profile_steps)."""

  def __init__(self, profile_steps: Sequence[int], workdir: str):
    self.steps = tuple(profile_steps) if jax.process_index() == 0 else ()
    self.logdir = os.path.join(workdir, PROFILE_DIR)
    self.tracing = False
    self.earlier_traces = set()
    self.traced = [0, 0]  # the first and the last step traced

  def before_step(self, step: int):
    """Starts the trace if the step after `step` is the first one profiled (or, resumed
    inside the range, the first one this run trains)."""
    if self.steps and not self.tracing and self.steps[0] <= step < self.steps[1]:
      self.earlier_traces = set(self._traces())
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
      self.traced = [step + 1, step + 1]

  def after_step(self, step: int, metrics):
    """Stops the trace once step `end` has run on the device."""
    if self.tracing:
      self.traced[1] = step
      if step >= self.steps[1]:
        self.stop(metrics)

  def stop(self, metrics=None):
    if not self.tracing:
      return
    jax.block_until_ready(metrics)  # the trace holds the steps' device work, not its dispatch
    self.tracing = False
    steps = f'steps {self.traced[0]}-{self.traced[1]}'  # a run that ends first traces fewer
    try:
      jax.profiler.stop_trace()
    except Exception as error:  # pylint: disable=broad-except
      reason = os_error_reason(error)
      if reason is None:
        raise
      # A profile is a diagnostic: a full disk costs it, not the run (whose next save
      # says so, if the disk is still full). No half-written trace is left for TensorBoard.
      for trace in set(self._traces()) - self.earlier_traces:
        shutil.rmtree(trace, ignore_errors=True)
      log(f'WARNING: writing the profile of {steps} to {self.logdir} failed ({reason}); '
          'training goes on without it.')
      return
    log(f'Wrote a profile of {steps} to {self.logdir} (tensorboard --logdir {self.logdir}).')

  def _traces(self):
    """The folders of the traces written so far (TensorBoard's plugins/profile/<time>)."""
    folder = os.path.join(self.logdir, 'plugins', 'profile')
    if not os.path.isdir(folder):
      return []
    return [os.path.join(folder, name) for name in os.listdir(folder)]
