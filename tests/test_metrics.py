"""What a run's metrics writer leaves in the workdir: metrics.jsonl and TensorBoard's event
files with the same scalars."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from resnet_jax.errors import MetricWriteError
from resnet_jax.train import metrics, run_dir


def _tensorboard_scalars(workdir) -> dict:
  """{(step, tag): value} of the event files in `workdir`, as TensorBoard reads them."""
  scalars = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == 'scalars', value
        scalars[event.step, value.tag] = float(tf.make_ndarray(value.tensor))
  return scalars


def test_scalars_go_to_metrics_jsonl_and_tensorboard_alike(tmp_path):
  written = {2: {'train/loss': 2.25, 'train/top1': 0.125}, 4: {'eval/top1': np.float32(0.5)}}
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  for step, scalars in written.items():
    writer.write(step, scalars)
  writer.close()
  lines = [json.loads(line) for line in open(run_dir.metrics_path(str(tmp_path)))]
  from_jsonl = {(line['step'], tag): value for line in lines for tag, value in line.items()
                if tag != 'step'}
  expected = {(step, tag): float(value) for step, scalars in written.items()
              for tag, value in scalars.items()}
  assert from_jsonl == expected
  assert _tensorboard_scalars(tmp_path) == expected


def test_a_full_disk_is_one_error_naming_the_file(tmp_path, capsys):
  """/dev/full fails every write as a full disk does (ENOSPC): the write raises a
  MetricWriteError (train.py prints it as one line), and close() adds no warning."""
  os.symlink('/dev/full', run_dir.metrics_path(str(tmp_path)))
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  with pytest.raises(MetricWriteError, match=r'step 2 to .*metrics\.jsonl failed '
                     r'\(OSError: No space left on device\).*run the same command'):
    writer.write(2, {'train/loss': 2.25})
  writer.close()
  assert 'WARNING' not in capsys.readouterr().out
