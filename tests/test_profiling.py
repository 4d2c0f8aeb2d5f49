"""config.profile_steps: a jax.profiler trace of the chosen steps in the workdir."""

import glob
import os
import subprocess
import sys

import pytest
from helpers import can_mount_a_tmpfs, full_disk_command, subprocess_env, tiny_digits_config

from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.profiling import PROFILE_DIR


@pytest.mark.parametrize('profile_steps, traced', [
    ((1, 3), 'steps 2-3'),
    ((2, 100), 'steps 3-4'),  # the run ends first (it said 'steps 3-100')
])
def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path, capsys, profile_steps, traced):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_digits_config(num_train_steps=4, profile_steps=profile_steps),
                     workdir)
  # TensorBoard's profile plugin reads plugins/profile/<run>/<host>.xplane.pb.
  traces = glob.glob(os.path.join(workdir, PROFILE_DIR, 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert f'Wrote a profile of {traced} to' in capsys.readouterr().out


def test_no_trace_without_profile_steps(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(tiny_digits_config(num_train_steps=2), workdir)
  assert not os.path.exists(os.path.join(workdir, PROFILE_DIR))


# StepProfiler on a real full disk, in a user namespace; it prints what is left of the trace.
FULL_DISK_PROFILE = '''
import os, sys
import jax.numpy as jnp
from resnet_jax.train.profiling import StepProfiler
profiler = StepProfiler((0, 1), sys.argv[1])
profiler.before_step(0)
profiler.after_step(1, jnp.ones(8).sum())
print('left:', sorted(os.listdir(os.path.join(sys.argv[1], 'profile', 'plugins', 'profile'))))
print('notes:', open(os.path.join(sys.argv[1], 'profile', 'notes.txt')).read().strip())
'''


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_a_tmpfs(), reason='needs user namespaces (unshare -Urm)')
def test_a_full_disk_costs_the_profile_not_the_run(tmp_path):
  """Before: jax.profiler's RESOURCE_EXHAUSTED error ended train.py with a traceback at
  the end of the profiled steps, and left a truncated trace for TensorBoard. Only the
  failed trace is removed: an earlier run's trace and the user's file stay."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  script = tmp_path / 'profile_on_a_full_disk.py'
  script.write_text(FULL_DISK_PROFILE)
  earlier = disk / 'profile' / 'plugins' / 'profile' / 'earlier'
  before = (f'mkdir -p {earlier} && echo trace > {earlier}/host.xplane.pb && '
            f'echo mine > {disk}/profile/notes.txt')
  result = subprocess.run(full_disk_command(disk, 8, [sys.executable, script, disk], before),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert (f'WARNING: writing the profile of steps 1-1 to {disk}/profile failed '
          '(JaxRuntimeError: No space left on device); training goes on without it.'
          in result.stdout), result.stdout + result.stderr
  assert "left: ['earlier']" in result.stdout and 'notes: mine' in result.stdout, result.stdout
