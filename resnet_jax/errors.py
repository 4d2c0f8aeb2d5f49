"""The exceptions that the command-line tools turn into one message and an exit status."""

import errno
import os
import re
import signal
from typing import Optional


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


# The operating system's words for a failed write ('No space left on device', 'Not a
# directory' for a file where a folder goes, ...), which other libraries' errors carry in
# their text (TensorFlow's: 'PATH; No space left on device').
_WRITE_FAILURES = tuple(os.strerror(number) for number in (
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG,
    errno.ENOTDIR))


def os_error_reason(error: BaseException) -> Optional[str]:
  """The operating system's words for the failed write or read that `error` is or wraps
  ('OSError: No space left on device'), or None when it wraps none (a bug). Knows
  Python's OSError anywhere in the chain, TensorStore's (orbax's) `os_error_code` and
  the words of a failed write in another library's message (TensorFlow's)."""
  link = error
  while link is not None:
    if isinstance(link, OSError) and link.strerror:
      return f'{type(link).__name__}: {link.strerror}'
    link = link.__cause__ or link.__context__
  code = re.search(r"\[os_error_code='?(\d+)", str(error))
  if code:
    return f'OSError: {os.strerror(int(code[1]))}'
  words = write_failure_words(error)
  return f'{type(error).__name__}: {words}' if words else None


def describe_error(error: BaseException) -> str:
  """`os_error_reason(error)`, else 'Type: message': what a one-line message says of why a
  write or read failed."""
  return os_error_reason(error) or f'{type(error).__name__}: {error}'


def write_failure_words(error: BaseException) -> Optional[str]:
  """The words of a failed write ('No space left on device', 'Read-only file system', ...)
  that `error`'s message carries, or None."""
  return next((words for words in _WRITE_FAILURES if words in str(error)), None)
