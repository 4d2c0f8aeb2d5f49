"""Tests of `python -m resnet_jax.plot`."""

import json
import os

import pytest

from resnet_jax import plot
from resnet_jax.train.metrics import read_metrics


def _write_run(path, offset=0.0):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for step in (10, 20, 30):
      f.write(json.dumps({'step': step, 'train/loss': 2.0 / step + offset,
                          'train/accuracy': 0.5}) + '\n')
    f.write(json.dumps({'step': 30, 'eval/loss': 0.5, 'eval/top1': 0.8}) + '\n')
    f.write(json.dumps({'step': 20, 'train/loss': 9.0}) + '\n')  # a resumed run rewrites 20
  return str(path)


def test_read_metrics_keeps_the_last_value_per_step(tmp_path):
  metrics = read_metrics(_write_run(tmp_path / 'run'))
  assert metrics['train/loss'] == ((10, 20, 30), (0.2, 9.0, 2.0 / 30))
  assert metrics['eval/top1'] == ((30,), (0.8,))


def _plotted(monkeypatch):
  """The figures plot.main saves, as {panel title: {line label: (steps, values)}}, and their
  formats."""
  from matplotlib.figure import Figure
  saved, savefig = [], Figure.savefig

  def record(figure, file, **kwargs):
    saved.append((kwargs['format'],
                  {ax.get_title(): {line.get_label(): tuple(map(tuple, line.get_data()))
                                    for line in ax.get_lines()}
                   for ax in figure.axes}))
    savefig(figure, file, **kwargs)

  monkeypatch.setattr(Figure, 'savefig', record)
  return saved


def test_plot_one_and_several_runs(tmp_path, monkeypatch):
  a, b = _write_run(tmp_path / 'a'), _write_run(tmp_path / 'b', 0.1)
  saved = _plotted(monkeypatch)
  plot.main([a])
  monkeypatch.chdir(tmp_path)
  plot.main([a, b, '--out', 'both.png'])
  (one_format, one), (both_format, both) = saved
  assert one_format == both_format == 'png'
  assert sorted(os.listdir(tmp_path / 'a')) == ['curves.png', 'metrics.jsonl']
  assert (tmp_path / 'both.png').read_bytes().startswith(b'\x89PNG')
  # Each run's metrics.jsonl as read_metrics reads it (the last value per step), one line
  # per metric and run.
  for run, name in [(a, 'a'), (b, 'b')]:
    metrics = read_metrics(run)
    expected = {'loss': {f'{name} train': metrics['train/loss'],
                         f'{name} eval': metrics['eval/loss']},
                'top-1 accuracy': {f'{name} train': metrics['train/accuracy'],
                                   f'{name} eval': metrics['eval/top1']}}
    for title, lines in expected.items():
      for label, values in lines.items():
        assert both[title][label] == values, (title, label)
        if name == 'a':
          assert one[title][label] == values, (title, label)
  assert both['loss']['b train'] == ((10, 20, 30), (2.0 / 10 + 0.1, 9.0, 2.0 / 30 + 0.1))
  assert sorted(one['loss']) == ['a eval', 'a train'] and len(both['loss']) == 4


def test_a_line_cut_short_by_a_kill_is_skipped_and_closed(tmp_path):
  from resnet_jax.train.metrics import MetricWriter
  run = _write_run(tmp_path / 'run')
  with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 40, "train/lo')  # SIGKILL in the middle of a write
  writer = MetricWriter(run, enabled=True)  # the resumed run appends
  writer.write(40, {'train/loss': 0.01})
  writer.close()
  metrics = read_metrics(run)
  assert metrics['train/loss'] == ((10, 20, 30, 40), (0.2, 9.0, 2.0 / 30, 0.01))
  plot.main([run])


def test_unwritable_out_is_one_message(tmp_path, capsys):
  run = _write_run(tmp_path / 'run')
  (tmp_path / 'file').write_text('')
  with pytest.raises(SystemExit):
    plot.main([run, '--out', str(tmp_path / 'file' / 'curves.png')])
  assert 'cannot write' in capsys.readouterr().err


@pytest.mark.parametrize('out, message', [
    ('run', 'is a directory; pass a file, such as'),  # matplotlib wrote run.png beside it
    ('curves', 'name an image file, ending in .png'),  # ... and curves.png
    ('curves.txt', 'name an image file, ending in .png'),  # ... and a ValueError traceback
])
def test_an_out_that_is_no_image_file_is_one_message_and_nothing_is_written(
    tmp_path, capsys, out, message):
  run = _write_run(tmp_path / 'run')
  before = sorted(p.name for p in tmp_path.rglob('*'))
  with pytest.raises(SystemExit):
    plot.main([run, '--out', str(tmp_path / out)])
  assert message in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.rglob('*')) == before


def test_a_failed_write_keeps_the_old_image_whole(tmp_path, capsys, monkeypatch):
  from matplotlib.figure import Figure
  run = _write_run(tmp_path / 'run')
  old = tmp_path / 'run' / 'curves.png'
  plot.main([run])
  old_bytes = old.read_bytes()

  def full_disk_halfway(figure, file, **kwargs):
    file.write(b'\x89PNG half an image')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(Figure, 'savefig', full_disk_halfway)
  with pytest.raises(SystemExit):
    plot.main([run])
  assert 'No space left on device' in capsys.readouterr().err
  assert old.read_bytes() == old_bytes
  assert sorted(os.listdir(tmp_path / 'run')) == ['curves.png', 'metrics.jsonl']
