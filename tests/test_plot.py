"""Tests of `python -m resnet_jax.plot`."""

import json

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


def test_plot_one_and_several_runs(tmp_path, monkeypatch):
  a, b = _write_run(tmp_path / 'a'), _write_run(tmp_path / 'b', 0.1)
  plot.main([a])
  assert (tmp_path / 'a' / 'curves.png').stat().st_size > 1000
  monkeypatch.chdir(tmp_path)
  plot.main([a, b, '--out', 'both.png'])
  assert (tmp_path / 'both.png').stat().st_size > 1000


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
