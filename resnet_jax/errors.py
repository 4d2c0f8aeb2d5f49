"""The exceptions that the command-line tools turn into one message and an exit status."""

import signal


class UserError(Exception):
  """A mistake in the config, the data or the workdir, with the fix in its message.

  The command-line tools print it as one line. It is no ValueError on purpose: a tool that
  catches it never mistakes a bug (a ValueError deep in the code) for a user's mistake, so
  the bug shows its traceback.
  """


class NonFiniteLossError(UserError, FloatingPointError):
  """Training diverged: a step had a non-finite loss or gradients (no checkpoint holds it)."""


class CheckpointSaveError(UserError):
  """Saving a checkpoint failed (a full disk, a folder that turned unwritable); the steps
  saved before it are intact. train.py ends the process at once on it: the background
  threads of orbax's failed save can wait minutes for signals that never come."""


class MetricWriteError(UserError):
  """Writing a metrics line (WORKDIR/metrics.jsonl, TensorBoard events) failed: a full disk,
  a folder that turned unwritable. The run stops there, as a killed one would: the same
  command resumes from the last checkpoint and logs the steps after it again."""


class Interrupted(Exception):
  """Training stopped at a stop request (SIGTERM, Ctrl-C) after saving its current step.

  `exit_status` is the shell's convention for a process ended by that signal (143 for
  SIGTERM, 130 for Ctrl-C): not 0, so a scheduler requeues the job instead of marking it
  complete; running the same command resumes it.
  """

  def __init__(self, signal_name: str, step: int):
    self.signal_name, self.step = signal_name, step
    self.exit_status = 128 + signal.Signals[signal_name].value
    super().__init__(f'{signal_name}: saved step {step}; run the same command to continue.')
