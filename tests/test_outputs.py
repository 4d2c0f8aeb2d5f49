"""resnet_jax.outputs: what removing a killed writer's leftovers leaves alone, and an old
output never deleted before it is back in place. (The rule as convert and export use it,
kills included: tests/test_convert.py, test_export.py.)"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import can_mount_a_tmpfs, full_disk_command, subprocess_env

from resnet_jax import outputs
from resnet_jax.convert import cli as convert

FILE = outputs.Kind(tool='test', description='a file', is_ours=lambda path: path.is_file())


def test_a_running_writer_and_folders_not_laid_out_as_ours_are_left_alone(tmp_path):
  output = tmp_path / 'w.bin'
  output.write_bytes(b'old')
  writer = lambda name: json.dumps({'output': name})
  strangers = {}
  for name, files in {'.w.bin.abcdefgh.partial': {'notes.txt': 'mine', '.writer': writer('w.bin')},
                      '.w.bin.ijklmnop.partial': {'.writer': writer('another')},
                      '.w.bin.qrstuvwx.partial': {'w.bin': 'no writer file'}}.items():
    (tmp_path / name).mkdir()
    for file, text in files.items():
      (tmp_path / name / file).write_text(text)
    strangers[name] = files

  def write(path):
    path.write_bytes(b'new')
    # Another writer of the same output checks it meanwhile: this folder is not a leftover.
    outputs.check_output(output, FILE, overwrite=True)
    assert path.read_bytes() == b'new'

  outputs.write_atomically(output, write, FILE, overwrite=True)
  assert output.read_bytes() == b'new'
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*strangers, 'w.bin'])
  for name, files in strangers.items():
    assert {p.name: p.read_text() for p in (tmp_path / name).iterdir()} == files


def test_an_old_output_that_cannot_be_put_back_is_kept_for_the_next_check(tmp_path,
                                                                          monkeypatch):
  output = tmp_path / 'w.bin'
  output.write_bytes(b'old')
  real_rename = os.rename

  def rename(src, dst):  # the new output cannot be moved in, nor the old one back
    if Path(dst) == output:
      raise OSError('rename failed')
    real_rename(src, dst)
  monkeypatch.setattr(os, 'rename', rename)
  with pytest.raises(OSError, match='rename failed'):
    outputs.write_atomically(output, lambda path: path.write_bytes(b'new'), FILE, True)
  assert not output.exists()
  assert [p.read_bytes() for p in tmp_path.glob('.w.bin.*.partial/replaced/w.bin')] == [b'old']
  monkeypatch.setattr(os, 'rename', real_rename)
  outputs.check_output(output, FILE, overwrite=True)
  assert output.read_bytes() == b'old' and os.listdir(tmp_path) == ['w.bin']


# Each writer of an output, on a full disk, in one process: convert to a converted
# directory (orbax), to .pth and .safetensors (an old .pth replaced with --overwrite), and
# export. Prints one JSON line per command: its exit code, stderr and what the disk holds.
FULL_DISK_WRITERS = '''
import contextlib, hashlib, io, json, os, sys
from resnet_jax import export
from resnet_jax.convert import cli as convert
disk, workdir, weights = sys.argv[1:]
for main, args in [
    (convert.main, ['--arch', 'resnet18', '--input', weights, '--output', f'{disk}/converted']),
    (convert.main, ['--input', workdir, '--output', f'{disk}/old.pth', '--overwrite']),
    (convert.main, ['--input', workdir, '--output', f'{disk}/w.safetensors']),
    (export.main, ['--checkpoint', workdir, '--output', f'{disk}/m.jaxexport'])]:
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      code = main(args)
    except SystemExit as e:
      code = e.code
  old = hashlib.sha256(open(f'{disk}/old.pth', 'rb').read()).hexdigest()
  print(json.dumps({'code': code, 'stderr': stderr.getvalue(), 'old': old,
                    'disk': sorted(os.listdir(disk))}), flush=True)
'''


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_a_tmpfs(), reason='needs user namespaces (unshare -Urm)')
def test_a_full_disk_is_one_message_from_each_writer_and_changes_nothing(tmp_path,
                                                                         trained_workdir):
  """A real full disk (a tmpfs with 8 KiB free): each of convert's and export's writers
  fails with one line naming the output and the cause, and leaves the disk as it was,
  an old output included. Before: 441 lines of orbax's and torch's tracebacks, and a
  partial folder that orbax's late writes kept."""
  import torch
  import torchvision
  workdir, _ = trained_workdir
  disk, weights, old = tmp_path / 'disk', tmp_path / 'resnet18.pth', tmp_path / 'old.pth'
  disk.mkdir()
  torch.save(torchvision.models.resnet18().state_dict(), weights)
  assert convert.main(['--input', workdir, '--output', str(old)]) == 0
  old_sha256 = hashlib.sha256(old.read_bytes()).hexdigest()
  script = tmp_path / 'writers.py'
  script.write_text(FULL_DISK_WRITERS)
  command = full_disk_command(disk, 8, [sys.executable, script, disk, workdir, weights],
                              before=f'cp {old} {disk}/old.pth && sync')
  done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                        env=subprocess_env())
  results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  assert len(results) == 4, done.stdout[-2000:] + done.stderr[-3000:]
  for result, output in zip(results, ('converted', 'old.pth', 'w.safetensors', 'm.jaxexport')):
    assert result['code'] == 2, result
    assert result['stderr'].strip().splitlines() == [
        f'{result["stderr"].split(": error: ")[0]}: error: Writing --output {disk}/{output} '
        'failed (OSError: No space left on device); nothing there changed. Free disk space '
        'or make its folder writable, then run the command again.'], result
    assert result['disk'] == ['filler', 'old.pth'] and result['old'] == old_sha256, result
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
