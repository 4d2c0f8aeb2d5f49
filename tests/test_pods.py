"""Several processes on one machine (jax.distributed over gloo on localhost): preemption,
a dead process, a stuck one, an agreed checkpoint fallback, and data that stays
exactly-once across a change of process count.

Each multi-process test starts train.py as a user would (the README's command), two
processes at a time; they share the compilation cache of the session.
"""

import collections

import jax
import numpy as np
import pytest
from helpers import tiny_digits_config

from resnet_jax.data import pipeline as pipeline_module


# --- exactly-once data across a change of process count -----------------------------------

def _global_batches(monkeypatch, count, start_step, num_steps, config):
  """Global batches start_step .. start_step+num_steps-1 as `count` processes read them:
  each process's host batches, made with a fake process index, concatenated."""
  per_process = []
  for index in range(count):
    fake = type('jax', (), {'process_index': staticmethod(lambda i=index: i),
                            'process_count': staticmethod(lambda: count)})
    monkeypatch.setattr(pipeline_module, 'jax', fake)
    stream = pipeline_module.Pipeline(config).train_batches(start_step)
    per_process.append([next(stream) for _ in range(num_steps)])
    monkeypatch.setattr(pipeline_module, 'jax', jax)
  return [{key: np.concatenate([shards[key] for shards in step]) for key in step[0]}
          for step in zip(*per_process)]


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
@pytest.mark.parametrize('preprocess', ['none', 'digits'])
def test_an_epoch_is_exactly_once_across_a_change_of_process_count(monkeypatch, before,
                                                                   after, preprocess):
  """`before` processes train 7 steps of epoch 1, `after` processes the rest of it: every
  example of the epoch is used once, and (global order, per-example seeds) each step sees
  the batch a one-process run sees, augmented alike."""
  config = tiny_digits_config(preprocess=preprocess)
  steps_per_epoch = pipeline_module.Pipeline(config).steps_per_epoch
  start, stop_at = steps_per_epoch, steps_per_epoch + 7  # epoch 1, a few steps in
  reference = _global_batches(monkeypatch, 1, start, steps_per_epoch, config)
  changed = (_global_batches(monkeypatch, before, start, stop_at - start, config) +
             _global_batches(monkeypatch, after, stop_at, steps_per_epoch - 7, config))
  used = collections.Counter(image.tobytes() for batch in changed for image in batch['image'])
  expected = collections.Counter(image.tobytes() for batch in reference
                                 for image in batch['image'])
  assert sum(used.values()) == steps_per_epoch * config.batch_size
  assert used == expected  # every example of the epoch, each once
  for a, b in zip(changed, reference):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


# --- two processes on localhost -------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from helpers import (HANG_S, JAX_CACHE_DIR, LONG_FLAGS, REPO, assert_same_state,  # noqa: E402
                     checkpoint_steps, free_port, subprocess_env, wait_for_checkpoint)

# Runs train.py after applying INJECT (Python source, run once jax.distributed is up) on
# the process whose id is INJECT_PROCESS: the stalls and read failures of the tests.
WRAPPER = '''
import os, runpy, sys
sys.path.insert(0, {repo!r})
from resnet_jax.train import distributed
initialize = distributed.initialize
def initialize_then_inject(*args, **kwargs):
  initialize(*args, **kwargs)
  import jax
  if str(jax.process_index()) == os.environ.get('INJECT_PROCESS'):
    exec(os.environ['INJECT'], dict())
distributed.initialize = initialize_then_inject
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path({train!r}, run_name='__main__')
'''


def _start_pod(tmp_path, workdir, config, *flags, inject=None, inject_process=1,
               heartbeat_s=10, port=None, ids=(0, 1)):
  """Processes `ids` of a two-process train.py run (the README command plus `flags`),
  their outputs in files."""
  port, wrapper = port or free_port(), tmp_path / 'wrapper.py'
  wrapper.write_text(WRAPPER.format(repo=str(REPO), train=str(REPO / 'train.py')))
  env = subprocess_env(devices=1, INJECT=inject or '', INJECT_PROCESS=str(inject_process))
  processes = []
  for i in ids:
    log = open(tmp_path / f'process{i}.{time.monotonic_ns()}.log', 'w+')
    args = [sys.executable, str(wrapper) if inject else 'train.py', '--config', config,
            '--workdir', str(workdir), '--jax_cache_dir', JAX_CACHE_DIR,
            f'--coordinator_address=localhost:{port}', '--num_processes=2',
            f'--process_id={i}', f'--heartbeat_timeout_s={heartbeat_s}', *flags]
    processes.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
  return processes


def _output(log):
  log.flush()
  log.seek(0)
  return log.read()


def _finish(processes, timeout=HANG_S):
  """(return codes, outputs) once both processes exit."""
  deadline = time.monotonic() + timeout
  try:
    for process, _ in processes:
      process.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return [p.returncode for p, _ in processes], [_output(log) for _, log in processes]


def _wait_for_checkpoint(processes, workdir):
  def outputs():
    codes, outputs = _finish(processes, timeout=1)
    return f'{codes}\n' + '\n'.join(o[-2000:] for o in outputs)
  wait_for_checkpoint(workdir, [p for p, _ in processes], outputs)


def _run_pod(tmp_path, workdir, config, *flags, **kwargs):
  codes, outputs = _finish(_start_pod(tmp_path, workdir, config, *flags, **kwargs))
  assert codes == [0, 0], '\n'.join(o[-3000:] for o in outputs)
  return outputs


@pytest.fixture(scope='module')
def pod_reference(tmp_path_factory, config_file):
  """The uninterrupted LONG run on two processes."""
  tmp_path = tmp_path_factory.mktemp('pod_reference')
  start = time.monotonic()
  outputs = _run_pod(tmp_path, tmp_path / 'run', config_file, *LONG_FLAGS)
  assert 'Process 0 of 2' in outputs[0] and 'step 60/60' in outputs[0], outputs[0]
  print(f'uninterrupted two-process run: {time.monotonic() - start:.1f} s')
  return str(tmp_path / 'run')


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_all(tmp_path, config_file,
                                                           pod_reference):
  workdir = tmp_path / 'run'
  processes = _start_pod(tmp_path, workdir, config_file, *LONG_FLAGS)
  _wait_for_checkpoint(processes, workdir)
  time.sleep(0.3)  # land between checkpoints
  processes[1][0].send_signal(signal.SIGTERM)
  sent = time.monotonic()
  codes, outputs = _finish(processes)
  print(f'SIGTERM to process 1 -> both saved and exited in {time.monotonic() - sent:.1f} s')
  assert codes == [143, 143], outputs  # not 0: the run is not finished; requeue it
  saved = int(outputs[0].split('SIGTERM: saved step ')[1].split(';')[0])  # process 0 logs
  assert checkpoint_steps(workdir)[-1] == saved < 60, (saved, outputs[0])
  start = time.monotonic()
  outputs = _run_pod(tmp_path, workdir, config_file, *LONG_FLAGS)
  print(f'resumed two-process run: {time.monotonic() - start:.1f} s')
  assert f'at step {saved}' in outputs[0] and 'step 60/60' in outputs[0], outputs[0]
  assert_same_state(workdir, pod_reference)


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_and_restart_is_exact(tmp_path, config_file,
                                                                     pod_reference):
  workdir = tmp_path / 'run'
  processes = _start_pod(tmp_path, workdir, config_file, *LONG_FLAGS)
  _wait_for_checkpoint(processes, workdir)
  time.sleep(0.3)
  processes[1][0].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  codes, outputs = _finish(processes)  # then process 0 is killed: fails below
  print(f'SIGKILL of process 1 -> process 0 exited {codes[0]} after '
        f'{time.monotonic() - killed:.1f} s')
  # Process 0 ended by itself (heartbeats every 10 s) with an error: our status 1 or JAX's
  # abort, not the SIGKILL of _finish.
  assert codes[1] == -signal.SIGKILL and codes[0] not in (0, -signal.SIGKILL), outputs[0][-3000:]
  # Ours (a failed collective) or JAX's (the coordination service saw the process die).
  assert ('lost contact with another process' in outputs[0] and 'run the same command' in
          outputs[0]) or 'another task died' in outputs[0], outputs[0][-3000:]
  assert 'Process 0 of 2. If one stops, the others exit' in outputs[0]
  start = time.monotonic()
  outputs = _run_pod(tmp_path, workdir, config_file, *LONG_FLAGS)
  print(f'restarted two-process run: {time.monotonic() - start:.1f} s')
  assert 'Resumed from' in outputs[0] and 'step 60/60' in outputs[0], outputs[0]
  assert_same_state(workdir, pod_reference)


# --- start-up: a process that never starts, a coordinator port in use ----------------------

STARTUP_TIMEOUT_S = 10
STARTUP_FLAG = f'--initialization_timeout_s={STARTUP_TIMEOUT_S}'


@pytest.mark.slow
@pytest.mark.parametrize('missing', [0, 1])
def test_a_process_that_never_starts_is_named_after_the_startup_timeout(tmp_path, config_file,
                                                                      missing):
  """Only one process of two starts: it exits 1 after --initialization_timeout_s with one
  message naming the other process and the coordinator's address (JAX alone aborts with
  status 134 after 300 s, saying nothing about who is missing)."""
  port = free_port()
  started = time.monotonic()
  codes, outputs = _finish(_start_pod(tmp_path, tmp_path / 'run', config_file, STARTUP_FLAG,
                                      port=port, ids=[1 - missing]))
  took = time.monotonic() - started
  print(f'process {1 - missing} alone exited {codes[0]} after {took:.1f} s')
  assert codes == [1], outputs[0][-3000:]  # by itself: JAX alone aborts after 300 s (134)
  assert f'missing: process {missing}.' in outputs[0], outputs[0][-3000:]
  assert f'coordinator at localhost:{port}' in outputs[0]
  assert 'Traceback' not in outputs[0] and 'Check failure' not in outputs[0], outputs[0]
  assert took >= STARTUP_TIMEOUT_S


@pytest.mark.slow
def test_a_coordinator_port_in_use_is_named(tmp_path, config_file):
  """Another program listens on the coordinator's port: process 0 stops at once naming the
  port, process 1 (which reached that program, not a coordinator) after the start-up
  timeout; both with status 1 and one message."""
  import socket
  with socket.socket() as holder:
    holder.bind(('localhost', 0))
    holder.listen()
    port = holder.getsockname()[1]
    codes, outputs = _finish(_start_pod(tmp_path, tmp_path / 'run', config_file,
                                        STARTUP_FLAG, port=port))
  assert codes == [1, 1], '\n'.join(o[-3000:] for o in outputs)
  assert f'Port {port} of --coordinator_address=localhost:{port} is already in use' in \
      outputs[0], outputs[0][-3000:]
  assert 'missing: process 0.' in outputs[1], outputs[1][-3000:]
  for output in outputs:
    assert 'Traceback' not in output and 'Check failure' not in output, output


STALL_AT_STEP_25 = '''
import time
from resnet_jax.train import loop
create = loop.create_pipeline
def create_pipeline(config):
  pipeline = create(config)
  stream = pipeline.train_batches
  def train_batches(start_step=0):
    for step, batch in enumerate(stream(start_step), start_step + 1):
      if step == 25:
        time.sleep(12)
      yield batch
  pipeline.train_batches = train_batches
  return pipeline
loop.create_pipeline = create_pipeline
'''


@pytest.mark.slow
def test_a_stalled_process_is_reported(tmp_path, config_file):
  outputs = _run_pod(tmp_path, tmp_path / 'run', config_file, *LONG_FLAGS,
                     '--config.stall_factor=5', inject=STALL_AT_STEP_25)
  assert 'WARNING: no step has finished on process 1' in outputs[1], outputs[1][-3000:]
  assert 'step 60/60' in outputs[0]


CANNOT_READ_STEP_60 = '''
from resnet_jax.train import checkpoints
read_step = checkpoints.read_step
def failing_read_step(directory, step, target_tree, **kwargs):
  if step == 60:
    raise OSError('simulated: this host cannot read step 60')
  return read_step(directory, step, target_tree, **kwargs)
checkpoints.read_step = failing_read_step
'''


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


@pytest.mark.slow
def test_all_processes_fall_back_to_the_same_checkpoint(tmp_path, config_file,
                                                        pod_reference):
  """Process 1 cannot read step 60: both restore step 50 (process 0 could read 60), step
  60 is moved aside whole, and the run ends where the reference ends."""
  import shutil
  workdir = tmp_path / 'run'
  shutil.copytree(pod_reference, workdir)
  assert checkpoint_steps(workdir) == [50, 60]
  newest = _files(workdir / 'checkpoints' / '60')
  outputs = _run_pod(tmp_path, workdir, config_file, *LONG_FLAGS, inject=CANNOT_READ_STEP_60)
  assert 'checkpoint 60' in outputs[0] and 'on process(es) [1] of 2' in outputs[0], outputs[0]
  assert 'at step 50' in outputs[0], outputs[0]
  moved = os.listdir(workdir / 'checkpoints_unreadable')
  assert len(moved) == 1 and moved[0].startswith('60.')
  assert _files(workdir / 'checkpoints_unreadable' / moved[0]) == newest  # nothing deleted
  assert_same_state(workdir, pod_reference)


@pytest.mark.parametrize('exit_on_stall', [False, True])
def test_watchdog_warns_or_exits_when_steps_stop_finishing(exit_on_stall):
  """In-process: 6 quick steps, then none; it warns once, or exits with status 1."""
  from resnet_jax.train.watchdog import StepWatchdog
  lines, exits = [], []
  watchdog = StepWatchdog(5.0, exit_on_stall, lines.append, exit_fn=exits.append,
                          poll_s=0.01)
  try:
    for _ in range(6):
      watchdog.dispatched(jax.numpy.zeros(()))
      time.sleep(0.02)
    deadline = time.monotonic() + 60  # a bound for a missing warning, not a speed test
    while not lines and time.monotonic() < deadline:
      time.sleep(0.01)
  finally:
    watchdog.close()
  assert len(lines) == 1 and 'no step has finished' in lines[0], lines
  assert exits == ([1] if exit_on_stall else [])
  assert lines[0].startswith('Error:' if exit_on_stall else 'WARNING:')
