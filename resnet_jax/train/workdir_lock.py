"""One writer per workdir: an OS advisory lock on WORKDIR/.lock, held while training.

`fcntl.flock` is released by the kernel when the holder exits or is killed, so a crashed
run never blocks the next one. The file holds the holder's pid, host and start time for
the refusal message. Readers (evaluate, predict, convert, load_variables) take no lock.

Limits: flock is per host on most network filesystems; NFSv4 and Lustre honour it across
hosts, but some NFS setups and FUSE mounts of object stores (GCS, S3) ignore it, and
gs:// paths are not local files at all. There two runs must be kept apart by the user.
With several processes only process 0 takes the lock.
"""

import contextlib
import datetime
import fcntl
import os
import socket

import jax

from resnet_jax.errors import UserError

LOCK_FILE = '.lock'


@contextlib.contextmanager
def hold(workdir: str):
  """Holds WORKDIR/.lock for the block, or raises a UserError naming the holder."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode(errors='replace').strip() or 'another process'
      raise UserError(f'{os.path.abspath(workdir)} is being trained by {holder} (it holds '
                      f'{path}). Wait for that run to finish or stop it, or pass another '
                      f'--workdir.') from None
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'process {os.getpid()} on host {socket.gethostname()}, started '
                  f'{started}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
