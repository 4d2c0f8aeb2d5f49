"""resnet_jax.outputs: what removing a killed writer's leftovers leaves alone, and an old
output never deleted before it is back in place. (The rule as convert and export use it,
kills included: tests/test_convert.py, test_export.py.)"""

import json
import os
from pathlib import Path

import pytest

from resnet_jax import outputs

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
