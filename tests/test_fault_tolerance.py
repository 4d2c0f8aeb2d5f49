"""Fault tolerance of training: kills, preemption, bad checkpoints, divergence, bad input,
changing device counts and several processes, each against an uninterrupted run.

Subprocesses run train.py as a user would (each costs ~10 s of imports); everything that
does not need a separate process runs in this one.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from helpers import (HANG_S, JAX_CACHE_DIR, LONG, LONG_FLAGS, REPO, assert_metrics_match,
                     assert_same_state, can_mount_a_tmpfs, checkpoint_steps, free_port,
                     full_disk_command, interrupt_at, metric_lines, read_state,
                     subprocess_env, tiny_digits_config, train_py_command, truncate_files,
                     wait_for_checkpoint)

import resnet_jax
from resnet_jax import plot
from resnet_jax.train import checkpoints, loop
from resnet_jax.errors import Interrupted, MetricWriteError, UserError
from resnet_jax.train.config_schema import check_config
from resnet_jax.train.loop import train_and_evaluate

# --- helpers ----------------------------------------------------------------------------

def _run(args, devices=1, timeout=HANG_S, check=True):
  result = subprocess.run(args, cwd=REPO, env=subprocess_env(devices), capture_output=True,
                          text=True, timeout=timeout)
  if check:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def _start(args):
  return subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(process, workdir):
  def killed_output():
    process.kill()
    return process.communicate()[0][-3000:]
  wait_for_checkpoint(workdir, [process], killed_output)


@pytest.fixture(scope='module')
def long_reference(tmp_path_factory):
  """The uninterrupted LONG run, in this process."""
  workdir = str(tmp_path_factory.mktemp('long_reference'))
  train_and_evaluate(tiny_digits_config(**LONG), workdir)
  return workdir


@pytest.fixture(scope='module')
def six_step_reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('six_step_reference'))
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  return workdir


def patch_train_batches(monkeypatch, edit):
  """Makes the loop's pipeline pass each training batch through edit(step, batch)."""
  create = loop.create_pipeline

  def create_pipeline(config):
    pipeline = create(config)
    stream = pipeline.train_batches

    def train_batches(start_step=0):
      for step, batch in enumerate(stream(start_step), start_step + 1):
        yield edit(step, batch)

    pipeline.train_batches = train_batches
    return pipeline

  monkeypatch.setattr(loop, 'create_pipeline', create_pipeline)


# --- exact resume and preemption ----------------------------------------------------------

@pytest.mark.slow
def test_sigkill_then_same_command_is_bit_identical(tmp_path, config_file, long_reference):
  """Killed with SIGKILL right after its first checkpoint appears (typically while that
  save is still being written), the same command finishes the run exactly."""
  workdir = tmp_path / 'run'
  command = train_py_command(config_file, workdir, *LONG_FLAGS)
  process = _start(command)
  _wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGKILL)
  output = process.communicate()[0]
  assert process.returncode == -signal.SIGKILL, output
  assert 'step 60/60' not in output
  output = _run(command).stdout
  assert 'Resumed from' in output and 'step 60/60' in output, output
  assert_same_state(workdir, long_reference)
  assert_metrics_match(str(workdir), long_reference)


# train.py, held at the end of step STEP until a signal arrives: the test knows the step the
# signal arrives at, however slowly the machine runs.
HELD_AT_STEP = """
import os, runpy, sys, time
from resnet_jax.train import preemption
requested = preemption.StopRequest.requested
def held(self, step):
  if step == {step} and self.signal is None:
    open({marker!r}, 'w').close()
    while self.signal is None:
      time.sleep(0.01)
  return requested(self, step)
preemption.StopRequest.requested = held
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.mark.slow
def test_sigterm_saves_the_step_it_arrived_at_and_exits(tmp_path, config_file, long_reference):
  """SIGTERM at step 23 (checkpoints every 10, logs every 5): step 23 is saved, nothing
  after it is trained or logged, the status is 143, and a restart finishes the run exactly
  as the uninterrupted one."""
  workdir, marker, wrapper = tmp_path / 'run', tmp_path / 'at_23', tmp_path / 'held.py'
  wrapper.write_text(HELD_AT_STEP.format(step=23, marker=str(marker)))
  command = train_py_command(config_file, workdir, *LONG_FLAGS)
  process = _start([sys.executable, str(wrapper), *command[2:]])
  deadline = time.monotonic() + HANG_S
  while not marker.exists():
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f'step 23 was not reached:\n{process.communicate()[0][-3000:]}')
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=HANG_S)[0]
  assert process.returncode == 128 + signal.SIGTERM, output  # not 0: a scheduler requeues
  assert 'SIGTERM: saved step 23;' in output, output
  assert checkpoint_steps(workdir)[-1] == 23
  assert max(row['step'] for row in metric_lines(workdir)) <= 23
  # Restarting (here in-process) continues from it and ends where the reference ends.
  train_and_evaluate(tiny_digits_config(**LONG), str(workdir))
  assert_same_state(workdir, long_reference)
  assert_metrics_match(str(workdir), long_reference)


@pytest.mark.slow  # trains and resumes in-process: ~30 s loaded
def test_ctrl_c_between_log_steps_resumes_with_the_same_metrics(tmp_path, monkeypatch,
                                                                  six_step_reference):
  """Ctrl-C at step 3 (logs every 2) saves step 3; the resumed run logs step 4's average
  over steps 3 and 4 exactly as the uninterrupted run does."""
  interrupt_at(monkeypatch, 3)
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(Interrupted, match='SIGINT: saved step 3') as interrupted:
    train_and_evaluate(tiny_digits_config(num_train_steps=6), str(tmp_path))
  assert interrupted.value.exit_status == 130
  assert checkpoint_steps(tmp_path) == [2, 3]
  monkeypatch.undo()
  train_and_evaluate(tiny_digits_config(num_train_steps=6), str(tmp_path))
  assert_same_state(tmp_path, six_step_reference)
  assert_metrics_match(str(tmp_path), six_step_reference)
  assert signal.getsignal(signal.SIGINT) is handler


# --- bad checkpoints ----------------------------------------------------------------------

@pytest.mark.slow  # resumes in-process from a damaged step: ~25 s loaded
def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, six_step_reference,
                                                          capsys):
  workdir = str(tmp_path)
  train_and_evaluate(tiny_digits_config(), workdir)  # checkpoints 2 and 4
  truncate_files(tmp_path / 'checkpoints' / '4' / 'state')
  # What a crash during an asynchronous save leaves: a temporary directory.
  shutil.copytree(tmp_path / 'checkpoints' / '2',
                  tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp-1234')
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  out = capsys.readouterr().out
  assert 'checkpoint 4' in out and 'unreadable' in out and 'at step 2' in out, out
  moved = os.listdir(tmp_path / 'checkpoints_unreadable')
  assert len(moved) == 1 and moved[0].startswith('4.'), moved
  assert_same_state(workdir, six_step_reference)
  # All checkpoints unreadable: it refuses rather than silently start over; the user
  # starts over by removing the set-aside ones (tests/test_checkpoints.py).
  steps = checkpoint_steps(workdir)
  for step in steps:
    truncate_files(tmp_path / 'checkpoints' / str(step) / 'state')
  with pytest.raises(UserError, match='No readable checkpoint'):
    train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  assert len(os.listdir(tmp_path / 'checkpoints_unreadable')) == 1 + len(steps)


def test_workdir_of_another_model_or_run_is_refused(trained_workdir):
  workdir, _ = trained_workdir
  before = {name: open(os.path.join(workdir, name)).read()
            for name in ('model.json', 'config.json')}
  steps = checkpoint_steps(workdir)
  with pytest.raises(UserError, match='another model.*new --workdir'):
    train_and_evaluate(tiny_digits_config(model_overrides={'stage_sizes': (1, 1, 1),
                                                           'stage_widths': (8, 8, 16)}),
                       workdir)
  with pytest.raises(UserError, match='batch_size=32.*batch_size=16'):
    train_and_evaluate(tiny_digits_config(batch_size=16), workdir)
  assert checkpoint_steps(workdir) == steps
  for name, text in before.items():
    assert open(os.path.join(workdir, name)).read() == text


# --- a save that fails: one message, and the process ends -----------------------------------

# train.py, with the creation of each checkpoint's temporary folder refused as on a folder
# made read-only after the start-up check (root ignores chmod, so this stands in for it).
REFUSED_SAVE = """
import os, runpy, sys
makedirs = os.makedirs
def refused(name, *args, **kwargs):
  if 'orbax-checkpoint-tmp' in str(name):
    raise PermissionError(13, 'Permission denied', str(name))
  return makedirs(name, *args, **kwargs)
os.makedirs = refused
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
"""


def _run_timing_the_exit(command, tmp_path):
  """Runs `command` (train.py) to its end: (its result, the seconds from its error message
  to its exit)."""
  with open(tmp_path / 'stdout.txt', 'w+') as stdout:
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=stdout,
                               stderr=subprocess.PIPE, text=True)
    hang = threading.Timer(HANG_S, process.kill)
    hang.start()
    try:
      stderr = ''
      for line in process.stderr:
        stderr += line
        if line.startswith('Error: '):
          break
      said = time.monotonic()
      stderr += process.communicate()[1]
      took = time.monotonic() - said
    finally:
      hang.cancel()
    stdout.seek(0)
    return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr), took


def _assert_one_message(result, reason):
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  assert 'Error: Saving a checkpoint to ' in result.stderr and reason in result.stderr, output
  assert len(output.strip().splitlines()) <= 8, output


@pytest.mark.slow
def test_failed_save_ends_the_process_with_one_message(tmp_path, config_file):
  """Before: a PermissionError traceback per orbax thread, then the process never exited
  (orbax's threads wait 300 s for the failed save)."""
  wrapper = tmp_path / 'refused_save.py'
  wrapper.write_text(REFUSED_SAVE)
  command = [sys.executable, str(wrapper), *train_py_command(config_file, tmp_path / 'run')[2:]]
  result, took = _run_timing_the_exit(command, tmp_path)
  _assert_one_message(result, 'PermissionError: Permission denied')
  assert took < 150, f'{took:.0f} s from the message to the exit'  # orbax's wait: 300 s


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_a_tmpfs(), reason='needs user namespaces (unshare -Urm)')
def test_full_disk_during_a_save_is_one_message(tmp_path, config_file):
  """A real full disk with 100 KiB free, less than one checkpoint. Before: 176-530 lines
  of tracebacks."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  command = full_disk_command(disk, 100, train_py_command(config_file, disk / 'run'))
  result, took = _run_timing_the_exit(command, tmp_path)
  _assert_one_message(result, 'No space left on device')
  assert took < 150, f'{took:.0f} s from the message to the exit'  # orbax's wait: 300 s


@pytest.mark.slow  # two runs in-process: ~20 s
def test_a_full_disk_stops_at_a_metrics_line_and_only_warns_at_the_plot(
    tmp_path, six_step_reference, capsys, monkeypatch):
  """metrics.jsonl on /dev/full (every write fails as on a full disk): the first log line
  ends the run with one UserError, before the save of that step; the same command then
  trains the run exactly as an uninterrupted one, metrics included, and a full disk at
  the end's curves.png is a warning, not a failed run."""
  metrics_file, curves = tmp_path / 'metrics.jsonl', tmp_path / 'curves.png'
  metrics_file.symlink_to('/dev/full')
  with pytest.raises(MetricWriteError, match='step 2 .*No space left on device'):
    train_and_evaluate(tiny_digits_config(num_train_steps=6), str(tmp_path))
  assert checkpoint_steps(tmp_path) == []
  metrics_file.unlink()

  def write_to_a_full_disk(path, write):  # curves.png's temporary file on a full disk
    with open('/dev/full', 'wb') as f:
      write(f)
      f.flush()

  monkeypatch.setattr(plot, 'replace_file', write_to_a_full_disk)
  train_and_evaluate(tiny_digits_config(num_train_steps=6), str(tmp_path))
  assert_same_state(tmp_path, six_step_reference)
  assert_metrics_match(str(tmp_path), six_step_reference)
  assert f'WARNING: could not write {curves} (No space left on device)' in (
      capsys.readouterr().out)


# --- divergence ---------------------------------------------------------------------------

def _nan_at_step_3(step, batch):
  if step == 3:
    batch = {**batch, 'image': np.full(batch['image'].shape, np.nan, np.float32)}
  return batch


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_non_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
  patch_train_batches(monkeypatch, _nan_at_step_3)
  # Logging only at the end: the check before the save at step 4 must catch it.
  with pytest.raises(FloatingPointError, match='at step 3'):
    train_and_evaluate(tiny_digits_config(log_every_steps=0), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [2]
  assert _all_finite(read_state(tmp_path))


def test_non_finite_steps_can_be_skipped(tmp_path, monkeypatch):
  patch_train_batches(monkeypatch, _nan_at_step_3)
  train_and_evaluate(tiny_digits_config(skip_nonfinite_steps=True), str(tmp_path))
  state = read_state(tmp_path)
  assert checkpoint_steps(tmp_path) == [2, 4] and _all_finite(state)
  assert int(state['step']) == 3  # the optimizer did not count the skipped step
  last = [row for row in metric_lines(str(tmp_path)) if 'train/loss' in row][-1]
  assert last['train/skipped_steps'] == 1 and np.isfinite(last['train/loss'])


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    (dict(model='resnet_51'), 'Unknown model .*Valid names: .*resnet50'),
    (dict(dataset='no_such_dataset'), 'Unknown dataset .*digits'),
    (dict(image_size=2), 'Images of 2x2 .* are too small .*use image_size >= 4'),
    (dict(num_train_steps=0), 'num_train_steps=0'),
    (dict(num_train_steps=-5), 'num_train_steps=-5'),
    (dict(batch_size=0), 'batch_size=0 must be positive'),
])
def test_bad_config_is_one_clear_error(tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    train_and_evaluate(tiny_digits_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_config_checks_keys_and_device_divisibility():
  config = tiny_digits_config()
  with pytest.raises(UserError, match='multiple of the number of devices \\(3\\).*batch_size=30'):
    check_config(config, num_devices=3)
  config.lerning_rate = 0.1
  with pytest.raises(UserError, match='lerning_rate \\(did you mean learning_rate\\?\\)'):
    check_config(config, num_devices=1)


@pytest.mark.slow
def test_train_py_prints_the_error_without_a_traceback(tmp_path, config_file):
  result = _run(train_py_command(config_file, tmp_path, '--config.model=resnet_51'), check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr + result.stdout, result.stderr
  assert "Unknown model 'resnet_51'" in result.stderr, result.stderr


# --- changing device counts and several processes -----------------------------------------

def assert_close_state(workdir, reference):
  a, b = read_state(workdir), read_state(reference)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)


@pytest.mark.slow
def test_checkpoint_from_4_devices_resumes_on_1_and_on_8(tmp_path, config_file,
                                                         trained_workdir):
  reference, _ = trained_workdir  # 4 steps on 1 device
  four, eight = tmp_path / 'four', tmp_path / 'eight'
  _run(train_py_command(config_file, four, '--config.num_train_steps=2'), devices=4)
  shutil.copytree(four, eight)
  # The 4-device checkpoint loads here, on 1 device, and training resumes from it.
  assert resnet_jax.load_variables(str(four))['params']['fc']['kernel'].shape == (16, 10)
  train_and_evaluate(tiny_digits_config(), str(four))
  output = _run(train_py_command(config_file, eight), devices=8).stdout
  assert 'at step 2' in output and 'on 8 device(s)' in output, output
  assert_close_state(four, reference)
  assert_close_state(eight, reference)


WORKER = '''
import sys
import threading
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_compilation_cache_dir', {cache!r})
port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=process_id)
sys.path.insert(0, {tests!r})
from helpers import tiny_digits_config
from resnet_jax.train.loop import train_and_evaluate
assert jax.process_count() == 2 and jax.device_count() == 2
train_and_evaluate(tiny_digits_config(num_train_steps=2), workdir)
train_and_evaluate(tiny_digits_config(), workdir)  # restores step 2 from disk
print('worker', process_id, 'done', flush=True)
'''


def _two_process_batches(monkeypatch):
  """A pipeline yielding both processes' shards of each global batch, in device order."""
  from resnet_jax.data import pipeline as pipeline_module
  current = {'index': 0}
  fake_jax = type('jax', (), {'process_index': staticmethod(lambda: current['index']),
                              'process_count': staticmethod(lambda: 2)})

  def shard_stream(index, start_step):
    """Process `index`'s stream; its shard is read when the first batch is made."""
    monkeypatch.setattr(pipeline_module, 'jax', fake_jax)
    current['index'] = index
    stream = pipeline_module.Pipeline(tiny_digits_config()).train_batches(start_step)
    first = next(stream)
    monkeypatch.setattr(pipeline_module, 'jax', jax)
    yield first
    yield from stream

  def train_batches(start_step=0):
    shards = [shard_stream(0, start_step), shard_stream(1, start_step)]
    for a, b in zip(*shards):
      yield {key: np.concatenate([a[key], b[key]]) for key in a}

  whole = pipeline_module.Pipeline(tiny_digits_config())
  whole.steps_per_epoch = (whole.shard_size // 2) // (whole.batch // 2)
  whole.train_batches = train_batches
  monkeypatch.setattr(loop, 'create_pipeline', lambda config: whole)


@pytest.mark.slow
def test_two_processes_with_gloo_match_one_process(tmp_path, monkeypatch):
  worker = tmp_path / 'worker.py'
  worker.write_text(WORKER.replace('{tests!r}', repr(str(REPO / 'tests'))).replace(
      '{cache!r}', repr(JAX_CACHE_DIR)))
  workdir, port = str(tmp_path / 'run'), free_port()
  env = subprocess_env(devices=1)
  processes = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), workdir],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=HANG_S)[0] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0 and f'worker {i} done' in out, out[-3000:]
  assert 'at step 2' in outputs[0], outputs[0]
  _two_process_batches(monkeypatch)
  reference = str(tmp_path / 'reference')
  train_and_evaluate(tiny_digits_config(), reference)
  assert_close_state(workdir, reference)


# --- bad data -----------------------------------------------------------------------------

def _image_folder(root, modes=('L', 'RGB', 'RGBA', 'CMYK')):
  """ROOT/<class>/ with 10 small images per class in each of `modes`."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for label in ('cat', 'dog'):
    os.makedirs(root / label)
    for i in range(10):
      mode = modes[i % len(modes)]
      pixels = rng.integers(0, 255, (9 + i % 3, 10, len(mode)), np.uint8)
      image = Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode)
      image.save(root / label / f'{i}.{"jpg" if mode == "CMYK" else "png"}')
  return f'folder:{root}'


def _folder_config(dataset):
  return tiny_digits_config(dataset=dataset, preprocess='cifar', batch_size=4,
                            eval_batch_size=2, num_train_steps=1, log_every_steps=1,
                            checkpoint_every_steps=0, eval_every_steps=0)


def test_image_folder_of_mixed_modes_trains_and_bad_files_are_named(tmp_path):
  dataset = _image_folder(tmp_path / 'images')
  results = train_and_evaluate(_folder_config(dataset), str(tmp_path / 'ok'))
  assert results['count'] == 2  # every tenth image is held out: 1 per class
  (tmp_path / 'images' / 'dog' / '3.png').write_bytes(b'not an image')
  with pytest.raises(UserError, match=r"not readable images: \[.*dog/3.png'\]"):
    train_and_evaluate(_folder_config(dataset), str(tmp_path / 'bad'))
  assert not os.path.exists(tmp_path / 'bad')  # refused before the workdir was made


def test_empty_class_folder_is_refused(tmp_path):
  dataset = _image_folder(tmp_path / 'images', modes=('RGB',))
  os.makedirs(tmp_path / 'images' / 'empty')
  with pytest.raises(UserError, match=r"\['empty'\] .* hold no images"):
    train_and_evaluate(_folder_config(dataset), str(tmp_path / 'run'))


def test_dataset_not_available_offline_says_how_to_get_it(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def no_network(self, *args, **kwargs):
    raise OSError('Network is unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
  with pytest.raises(UserError, match="'mnist' is not prepared .*tfds build mnist"):
    train_and_evaluate(tiny_digits_config(dataset='mnist', data_dir=str(tmp_path)),
                       str(tmp_path / 'run'))


def test_checkpoint_with_the_retired_rng_key_resumes(tmp_path, trained_workdir):
  """Checkpoints saved before the train state lost its unused 'rng' still resume exactly."""
  reference, _ = trained_workdir  # 4 steps
  train_and_evaluate(tiny_digits_config(num_train_steps=2), str(tmp_path / 'new'))
  old = tmp_path / 'old'
  os.makedirs(old)
  for name in ('model.json', 'config.json'):
    shutil.copy(tmp_path / 'new' / name, old / name)
  state = read_state(tmp_path / 'new', step=2)
  state['rng'] = np.array([0, 42], np.uint32)
  manager = checkpoints.create_manager(str(old), keep=2)
  checkpoints.save(manager, 2, state, {'batches_consumed': 2, 'log_window': []})
  manager.wait_until_finished()
  train_and_evaluate(tiny_digits_config(), str(old))
  assert 'rng' not in read_state(old)
  assert_same_state(old, reference)
