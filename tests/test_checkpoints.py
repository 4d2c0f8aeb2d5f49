"""Checkpoints that must survive: the best one across restarts, valid ones under a config
change, a workdir under two writers, and readers while train.py writes."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import (HANG_S, REPO, checkpoint_steps, subprocess_env, tiny_digits_config,
                     train_py_command, truncate_files)

import resnet_jax
from resnet_jax import evaluate
from resnet_jax.errors import UserError
from resnet_jax.train import checkpoint_format, checkpoints, workdir_lock
from resnet_jax.train.loop import train_and_evaluate


def _copy(workdir, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('.lock'))
  return copy


# --- the best checkpoint across restarts -------------------------------------------------

SAVER = '''
import sys
import numpy as np
from resnet_jax.train import checkpoints
manager = checkpoints.create_manager(sys.argv[1], keep=1)
for pair in sys.argv[2:]:
  step, top1 = pair.split(':')
  checkpoints.save(manager, int(step), {'w': np.zeros(3)}, {'batches_consumed': int(step)},
                   None if top1 == '-' else float(top1))
  manager.wait_until_finished()
manager.close()
'''


@pytest.mark.slow
def test_best_checkpoint_survives_restarts_across_processes(tmp_path):
  """Each process saves worse checkpoints than step 2; it stays through every restart."""
  workdir = str(tmp_path)
  for pairs, kept in [(['1:0.5', '2:0.9', '3:0.4'], [2, 3]), (['4:0.3', '5:-'], [2, 5]),
                      (['6:0.8'], [2, 6]), (['7:0.95', '8:-'], [7, 8])]:
    subprocess.run([sys.executable, '-c', SAVER, workdir, *pairs], env=subprocess_env(),
                   check=True, capture_output=True, timeout=HANG_S)
    assert checkpoint_steps(workdir) == kept, pairs


def test_checkpoint_whose_score_cannot_be_read_is_kept(tmp_path):
  """A step saved before scores were kept with it (no 'eval_top1') is never deleted."""
  manager = checkpoints.create_manager(str(tmp_path), keep=1)
  for step in (1, 2):
    checkpoints.save(manager, step, {'w': np.zeros(3)}, {'batches_consumed': step})
    manager.wait_until_finished()
  path = tmp_path / 'checkpoints' / '2' / 'data' / checkpoint_format.DATA_FILE
  path.write_text(json.dumps({'batches_consumed': 2}))  # as saved by an older version
  manager.close()
  manager = checkpoints.create_manager(str(tmp_path), keep=1)
  checkpoints.save(manager, 3, {'w': np.zeros(3)}, {'batches_consumed': 3})
  manager.wait_until_finished()
  manager.close()
  assert checkpoint_steps(str(tmp_path)) == [2, 3]


# --- a config change is a refusal, not corruption ----------------------------------------

@pytest.mark.slow  # trains in-process: 15-60 s on a loaded 2-core machine
def test_structure_mismatch_is_refused_and_nothing_moves(trained_workdir, tmp_path):
  workdir = _copy(trained_workdir[0], tmp_path)
  config_json = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(UserError, match=r"momentum: 0\.9 -> 0\.0.*opt_state.*new --workdir"):
    train_and_evaluate(tiny_digits_config(momentum=0.0, num_train_steps=6), workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))
  assert open(os.path.join(workdir, 'config.json')).read() == config_json
  # Unchanged settings still resume (the refusal did not leave the workdir locked).
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  assert checkpoint_steps(workdir) == [4, 6]


@pytest.mark.slow  # trains in-process: 15-60 s on a loaded 2-core machine
def test_all_checkpoints_unreadable_is_refused_not_restarted(trained_workdir, tmp_path):
  workdir = _copy(trained_workdir[0], tmp_path)
  for step in (2, 4):
    truncate_files(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  with pytest.raises(UserError, match='No readable checkpoint.*move or remove'):
    train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  assert len(os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))) == 2
  assert checkpoint_steps(workdir) == []
  # Asking for it (removing the set-aside ones) starts over.
  shutil.rmtree(os.path.join(workdir, 'checkpoints_unreadable'))
  train_and_evaluate(tiny_digits_config(num_train_steps=2), workdir)
  assert checkpoint_steps(workdir) == [2]


# --- a lost config.json: the checkpoints' own records are checked ------------------------

def _rewrite_data_items(workdir, edit):
  for step in checkpoint_steps(workdir):
    path = os.path.join(workdir, 'checkpoints', str(step), 'data', checkpoint_format.DATA_FILE)
    with open(path) as f:
      data = json.load(f)
    with open(path, 'w') as f:
      json.dump(edit(data), f)


@pytest.mark.slow  # trains in-process: 15-60 s on a loaded 2-core machine
@pytest.mark.parametrize('damage', ['deleted', 'empty', 'not JSON'])
def test_lost_config_json_is_checked_against_what_the_checkpoints_record(
    trained_workdir, tmp_path, damage):
  """Without a readable config.json, another batch size or seed is still refused (it
  would mix two runs); the same settings resume and config.json is written again."""
  workdir = _copy(trained_workdir[0], tmp_path)
  config_json = os.path.join(workdir, 'config.json')
  if damage == 'deleted':
    os.remove(config_json)
  else:
    open(config_json, 'w').write('' if damage == 'empty' else '{"batch_size": 3')
  with pytest.raises(UserError, match=r'Checkpoint 4 .* batch_size=32 \(this config: 16\).*'
                                      r'nothing was moved.*new --workdir'):
    train_and_evaluate(tiny_digits_config(batch_size=16, num_train_steps=6), workdir)
  with pytest.raises(UserError, match=r'Checkpoint 4 .* seed=0 \(this config: 1\)'):
    train_and_evaluate(tiny_digits_config(seed=1, num_train_steps=6), workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  assert checkpoint_steps(workdir) == [4, 6]
  assert json.load(open(config_json))['seed'] == 0


@pytest.mark.slow  # trains in-process: 15-60 s on a loaded 2-core machine
def test_checkpoints_that_record_only_the_batch_size_still_resume(trained_workdir, tmp_path):
  """Checkpoints of older versions record batch_size alone: that is checked, the rest
  is not there to check."""
  workdir = _copy(trained_workdir[0], tmp_path)
  os.remove(os.path.join(workdir, 'config.json'))
  _rewrite_data_items(workdir, lambda data: {k: v for k, v in data.items() if k not in (
      'dataset', 'train_split', 'image_size', 'preprocess', 'seed')})
  with pytest.raises(UserError, match=r'batch_size=32 \(this config: 16\)'):
    train_and_evaluate(tiny_digits_config(batch_size=16, num_train_steps=6), workdir)
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  assert checkpoint_steps(workdir) == [4, 6]


@pytest.mark.slow  # trains in-process: 15-60 s on a loaded 2-core machine
def test_damaged_manifest_falls_back_with_one_warning(trained_workdir, tmp_path, capfd):
  """Garbage in step 4's OCDBT manifest: one warning naming it, no traceback (reported
  elsewhere as 138 lines of asyncio's 'Event loop is closed')."""
  workdir = _copy(trained_workdir[0], tmp_path)
  manifest = os.path.join(workdir, 'checkpoints', '4', 'state', 'manifest.ocdbt')
  with open(manifest, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(300))
  capfd.readouterr()
  train_and_evaluate(tiny_digits_config(num_train_steps=6), workdir)
  out, err = capfd.readouterr()
  assert 'WARNING: checkpoint 4 in' in out and 'at step 2' in out, out
  assert 'Traceback' not in out + err and 'Event loop is closed' not in out + err, err
  assert len((out + err).strip().splitlines()) <= 10, out + err


# --- readers: fall back, never move ---------------------------------------------------------

def test_evaluate_falls_back_from_a_corrupt_checkpoint_without_moving_it(trained_workdir,
                                                                        tmp_path, capsys):
  workdir = _copy(trained_workdir[0], tmp_path)
  truncate_files(os.path.join(workdir, 'checkpoints', '4', 'state'))
  results = evaluate.evaluate(workdir=workdir)
  assert results['count'] > 0
  assert 'checkpoint 4' in capsys.readouterr().out
  assert checkpoint_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


def test_a_reader_outpaced_by_the_writer_reads_the_step_it_keeps(trained_workdir, tmp_path,
                                                                  monkeypatch):
  """A writer that saves a newer step (rotating the read one away) during every read of the
  newest: the reader lists again, and on its last pass reads the older step the writer
  keeps (its best) instead of refusing. (Seen in CI: a save every step on a loaded machine.)"""
  workdir = _copy(trained_workdir[0], tmp_path)
  directory = os.path.join(workdir, 'checkpoints')
  expected = checkpoint_format.restore_variables(workdir, step=2)
  read_state, newer = checkpoint_format.read_state, []

  def outpaced(directory_, step, *args, **kwargs):
    if step == max(checkpoint_steps(workdir)):  # the writer's next save lands, this one goes
      os.rename(os.path.join(directory, str(step)), os.path.join(directory, str(step + 1)))
      newer.append(step + 1)
    return read_state(directory_, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_format, 'read_state', outpaced)
  variables = checkpoint_format.restore_variables(workdir)
  assert len(newer) == checkpoint_format.READ_ATTEMPTS
  assert checkpoint_steps(workdir) == [2, newer[-1]]
  jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_evaluate_missing_workdir_is_one_line(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(['--workdir', str(tmp_path / 'missing')])
  message = str(exit_info.value.code)
  assert message.startswith('Error: ') and 'no config.json' in message, message
  assert '\n' not in message


# --- one writer per workdir -------------------------------------------------------------------

@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(UserError, match=f'process {os.getpid()} on host .* started'):
      with workdir_lock.hold(str(tmp_path)):
        pass
  killed = subprocess.run(
      [sys.executable, '-c', 'import os, signal, sys\n'
       'from resnet_jax.train import workdir_lock\n'
       'with workdir_lock.hold(sys.argv[1]):\n'
       '  os.kill(os.getpid(), signal.SIGKILL)', str(tmp_path)], env=subprocess_env(),
      timeout=HANG_S)
  assert killed.returncode == -9
  with workdir_lock.hold(str(tmp_path)):
    pass


def _best_eval_step(workdir, steps):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  scores = {r['step']: r['eval/top1'] for r in rows if 'eval/top1' in r and r['step'] in steps}
  return max(scores, key=lambda s: (scores[s], s)), scores


@pytest.mark.slow
def test_train_py_restart_keeps_the_best_while_readers_read_and_a_second_writer_is_refused(
    tmp_path, config_file):
  """The issue's repro: 30 good steps, then a restart to 80 with a setting that makes it
  worse (weight decay) and a save every step. Two such commands start together: one is
  refused at once, naming the other. Meanwhile readers read in a loop; none fails."""
  workdir = tmp_path / 'run'
  first = subprocess.run(train_py_command(config_file, workdir, '--config.num_train_steps=30',
                                          '--config.learning_rate=0.1',
                                          '--config.keep_checkpoints=1',
                                          '--config.checkpoint_every_steps=10',
                                          '--config.eval_every_steps=10'),
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=HANG_S)
  assert first.returncode == 0, first.stderr[-3000:]
  best, first_scores = _best_eval_step(str(workdir), (10, 20, 30))
  assert checkpoint_steps(str(workdir)) == sorted({best, 30})

  # Two identical commands started together: one trains, the other is refused at once.
  command = train_py_command(config_file, workdir, '--config.num_train_steps=80',
                             '--config.learning_rate=0.1', '--config.weight_decay=10',
                             '--config.keep_checkpoints=1', '--config.checkpoint_every_steps=1',
                             '--config.eval_every_steps=10', '--config.log_every_steps=10')
  runs = [subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  try:
    reads, deadline = 0, time.monotonic() + HANG_S
    while any(r.poll() is None for r in runs) and time.monotonic() < deadline:
      variables = resnet_jax.load_variables(str(workdir))  # must never fail
      assert variables['params']['fc']['kernel'].shape == (16, 10)
      reads += 1
    outputs = [r.communicate(timeout=HANG_S)[0] for r in runs]
  finally:
    for r in runs:
      if r.poll() is None:
        r.kill()
  codes = [r.returncode for r in runs]
  assert sorted(codes) == [0, 1], (codes, outputs[0][-2000:], outputs[1][-2000:])
  winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
  assert 'Traceback' not in outputs[loser], outputs[loser][-3000:]
  assert f'is being trained by process {runs[winner].pid} on host' in outputs[loser]
  assert 'step 80/80' in outputs[winner] and 'step 80/80' not in outputs[loser]
  assert reads >= 10, reads
  overall_best, scores = _best_eval_step(str(workdir), range(10, 81, 10))
  assert overall_best == best, (first_scores, scores)  # the restart made it worse
  assert checkpoint_steps(str(workdir)) == [best, 80]
