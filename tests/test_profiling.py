"""config.profile_steps: a jax.profiler trace of the chosen steps in the workdir."""

import glob
import os

from helpers import tiny_digits_config

from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.profiling import PROFILE_DIR


def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_digits_config(num_train_steps=4, profile_steps=(1, 3)), workdir)
  # TensorBoard's profile plugin reads plugins/profile/<run>/<host>.xplane.pb.
  traces = glob.glob(os.path.join(workdir, PROFILE_DIR, 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert 'Wrote a profile of steps 2-3' in capsys.readouterr().out


def test_no_trace_without_profile_steps(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_digits_config(num_train_steps=2), workdir)
  assert not os.path.exists(os.path.join(workdir, PROFILE_DIR))
