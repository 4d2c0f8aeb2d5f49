"""A jax.profiler trace of chosen training steps (config.profile_steps), for TensorBoard.

`tensorboard --logdir WORKDIR/profile` shows it in the profile plugin (pip install
tensorboard-plugin-profile): the device time of each op, and the host's input pipeline
beside it. Process 0 traces, the others train on.
"""

import os
from typing import Sequence

import jax

from resnet_jax.train.metrics import log

PROFILE_DIR = 'profile'  # below the workdir


class StepProfiler:
  """Traces the steps that take the step count from `start` to `end` (profile_steps)."""

  def __init__(self, profile_steps: Sequence[int], workdir: str):
    self.steps = tuple(profile_steps) if jax.process_index() == 0 else ()
    self.logdir = os.path.join(workdir, PROFILE_DIR)
    self.tracing = False

  def before_step(self, step: int):
    """Starts the trace if the step after `step` is the first one profiled (or, resumed
    inside the range, the first one this run trains)."""
    if self.steps and not self.tracing and self.steps[0] <= step < self.steps[1]:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True

  def after_step(self, step: int, metrics):
    """Stops the trace once step `end` has run on the device."""
    if self.tracing and step >= self.steps[1]:
      self.stop(metrics)

  def stop(self, metrics=None):
    if not self.tracing:
      return
    jax.block_until_ready(metrics)  # the trace holds the steps' device work, not its dispatch
    jax.profiler.stop_trace()
    self.tracing = False
    log(f'Wrote a profile of steps {self.steps[0] + 1}-{self.steps[1]} to {self.logdir} '
        f'(tensorboard --logdir {self.logdir}).')
