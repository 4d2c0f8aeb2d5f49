"""WORKDIR/.lock: only a regular file the lock wrote is ever rewritten; anything else at
that path is refused with one message and left as it was. (Two writers and a killed
holder: tests/test_checkpoints.py.)"""

import os

import pytest

from resnet_jax.errors import UserError
from resnet_jax.train import workdir_lock


def _refused(workdir, what):
  with pytest.raises(UserError) as info:
    with workdir_lock.hold(str(workdir)):
      pytest.fail('the lock was taken')
  message = str(info.value)
  assert message.startswith(f'{workdir / ".lock"} is {what}') and '--workdir' in message
  assert '\n' not in message


def test_a_symbolic_link_is_never_followed(tmp_path):
  mine = tmp_path / 'thesis.txt'
  mine.write_text('my thesis')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / '.lock').symlink_to(mine)
  _refused(tmp_path / 'run', 'a symbolic link')
  assert mine.read_text() == 'my thesis'
  (tmp_path / 'run' / '.lock').unlink()
  (tmp_path / 'run' / '.lock').symlink_to(tmp_path / 'nowhere')  # dangling: not created
  _refused(tmp_path / 'run', 'a symbolic link')
  assert not (tmp_path / 'nowhere').exists()


def test_a_directory_or_fifo_is_refused(tmp_path):
  (tmp_path / '.lock').mkdir()
  (tmp_path / '.lock' / 'kept').write_text('x')
  _refused(tmp_path, 'a directory')
  assert (tmp_path / '.lock' / 'kept').read_text() == 'x'
  os.mkfifo(tmp_path / 'fifo_run.lock')
  (tmp_path / 'fifo_run').mkdir()
  os.rename(tmp_path / 'fifo_run.lock', tmp_path / 'fifo_run' / '.lock')
  _refused(tmp_path / 'fifo_run', 'a fifo')


def test_only_a_file_the_lock_wrote_is_rewritten(tmp_path):
  (tmp_path / '.lock').write_text('my notes\n')
  _refused(tmp_path, 'a file holding something else')
  assert (tmp_path / '.lock').read_text() == 'my notes\n'
  # What a killed holder left (or an empty file) is the lock's own: taken and rewritten.
  for left in ('process 1 on host h, started 2026-01-01T00:00:00+00:00\n', ''):
    (tmp_path / '.lock').write_text(left)
    with workdir_lock.hold(str(tmp_path)):
      assert (tmp_path / '.lock').read_text().startswith(f'process {os.getpid()} on host ')
