"""One writer per workdir: an OS advisory lock on WORKDIR/.lock, held while training.

`fcntl.flock` is released by the kernel when the holder exits or is killed, so a crashed
run never blocks the next one. The file holds the holder's pid, host and start time for
the refusal message. It is opened without following a symbolic link, and rewritten only
when it is a regular file that is empty or holds such a line: anything else at
WORKDIR/.lock (a link, a directory, a fifo, a file of the user's) is refused, untouched.
Readers (evaluate, predict, convert, load_variables) take no lock.

Limits: flock is per host on most network filesystems; NFSv4 and Lustre honour it across
hosts, but some NFS setups and FUSE mounts of object stores (GCS, S3) ignore it, and
gs:// paths are not local files at all. There two runs must be kept apart by the user.
With several processes only process 0 takes the lock.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import re
import socket
import stat

import jax

from resnet_jax.errors import UserError
from resnet_jax.train import run_dir

# What hold() writes into the lock file; a file holding anything else is not ours.
_HOLDER = re.compile(r'process \d+ on host .*, started .*\n?')


@contextlib.contextmanager
def hold(workdir: str):
  """Holds WORKDIR/.lock for the block, or raises a UserError naming the holder (or saying
  why WORKDIR/.lock is not a lock file this module wrote)."""
  if jax.process_index() != 0:
    yield
    return
  path = run_dir.lock_path(workdir)  # in the workdir that `run_dir.check_writable` made
  fd = _open(path)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode(errors='replace').strip() or 'another process'
      raise UserError(f'{os.path.abspath(workdir)} is being trained by {holder} (it holds '
                      f'{path}). Wait for that run to finish or stop it, or pass another '
                      f'--workdir.') from None
    content = os.pread(fd, 1000, 0).decode(errors='replace')
    if content and not _HOLDER.fullmatch(content):
      raise _not_ours(path, 'a file holding something else')
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'process {os.getpid()} on host {socket.gethostname()}, started '
                  f'{started}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def _open(path: str) -> int:
  """A descriptor of the regular file `path` (created if absent), never following a
  symbolic link, nor blocking on a fifo; a UserError for anything else at `path`."""
  flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0)
  try:
    fd = os.open(path, flags, 0o644)
  except OSError as e:
    if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
      raise _not_ours(path, _what_is(path)) from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise _not_ours(path, _what_is(path))
  return fd


def _what_is(path: str) -> str:
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return 'not a regular file'
  kinds = ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISDIR, 'a directory'),
           (stat.S_ISFIFO, 'a fifo'), (stat.S_ISSOCK, 'a socket'))
  return next((name for test, name in kinds if test(mode)), 'not a regular file')


def _not_ours(path: str, what: str) -> UserError:
  return UserError(f'{path} is {what}, not a lock file train.py wrote; it is left as it '
                   f'is. Move it away (train.py then creates its own), or pass another '
                   f'--workdir.')
