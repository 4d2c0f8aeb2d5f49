"""resnet_jax.train.run_dir and checkpoint_format: converted checkpoint directories and
training workdirs."""

import errno
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import HANG_S, tiny_digits_config

import resnet_jax
from resnet_jax import create_model, scan_variables
from resnet_jax.errors import UserError
from resnet_jax.train import run_dir
from resnet_jax.train.checkpoint_format import save_converted
from resnet_jax.train import loop, parallel

ARCH = 'cifar_resnet20'


def init_variables(seed=0, **overrides):
  model = create_model(ARCH, **overrides)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  # Distinct running statistics, so a mix-up of blocks or collections shows.
  stats = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(seed + 1), v.shape),
                       variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': stats}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_workdir(path, steps, scanned=True):
  """A training workdir as the trainer writes it: model.json and checkpoints/ whose steps
  hold a 'state' item (scan layout, plus optimizer state and step) and a 'data' item."""
  path.mkdir()
  (path / 'model.json').write_text(json.dumps(  # JSON as the trainer writes it: lists, dtype names
      {'name': ARCH, 'num_classes': 10, 'scan_blocks': scanned, 'stage_sizes': [3, 3, 3],
       'dtype': 'float32'}))
  saved = {}
  with ocp.CheckpointManager(path / 'checkpoints') as manager:
    for step in steps:
      variables = init_variables(seed=step)
      layout = scan_variables(variables) if scanned else variables
      state = {**layout, 'step': np.int32(step),
               'opt_state': {'momentum': jax.tree.map(jnp.zeros_like, layout['params'])}}
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({'position': step})))
      saved[step] = variables
    manager.wait_until_finished()
  return saved


def test_converted_directory_round_trip(tmp_path):
  variables = init_variables()
  save_converted(variables, {'name': ARCH, 'num_classes': 10}, tmp_path / 'ckpt')
  assert_trees_equal(resnet_jax.load_variables(tmp_path / 'ckpt'), variables)
  model, loaded = resnet_jax.load_model(tmp_path / 'ckpt')
  assert model.num_classes == 10 and not model.scan_blocks
  assert_trees_equal(loaded, variables)


def test_workdir_loads_latest_step_unrolled(tmp_path):
  saved = write_workdir(tmp_path / 'workdir', steps=(1, 5))
  assert_trees_equal(resnet_jax.load_variables(tmp_path / 'workdir'), saved[5])


def test_load_model_matches_the_layout_of_the_model(tmp_path):
  saved = write_workdir(tmp_path / 'workdir', steps=(2,))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  scanned_model, scanned = resnet_jax.load_model(tmp_path / 'workdir')
  assert scanned_model.scan_blocks
  unrolled_model, unrolled = resnet_jax.load_model(tmp_path / 'workdir', scan_blocks=False)
  assert_trees_equal(unrolled, saved[2])
  np.testing.assert_allclose(scanned_model.apply(scanned, x), unrolled_model.apply(unrolled, x),
                             rtol=1e-5, atol=1e-5)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='neither variables/ nor checkpoints/'):
    resnet_jax.load_variables(tmp_path)
  with pytest.raises(UserError, match='does not exist'):
    resnet_jax.load_variables(tmp_path / 'missing')
  with pytest.raises(UserError, match='has no model.json'):
    resnet_jax.load_model(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(UserError, match='holds no saved step'):
    resnet_jax.load_variables(tmp_path)


@pytest.mark.slow
def test_import_resnet_jax_stays_light():
  code = ('import sys, resnet_jax; heavy = [m for m in ("orbax", "torch", "tensorflow") '
          'if m in sys.modules]; assert not heavy, heavy; '
          'assert callable(resnet_jax.load_model) and "orbax.checkpoint" not in sys.modules; '
          'import resnet_jax.convert; assert "torch" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=HANG_S)


def test_each_run_directory_name_is_typed_in_run_dir_only():
  """Every other module asks run_dir for a path, so a renamed file cannot be half-renamed."""
  names = (run_dir.MODEL_JSON, run_dir.CONFIG_JSON, run_dir.METRICS_FILE, run_dir.CURVES_FILE,
           run_dir.UNREADABLE_DIR, run_dir.LOCK_FILE)
  package = os.path.dirname(resnet_jax.__file__)
  typed = {}
  for root, _, files in os.walk(package):
    for file in (f for f in files if f.endswith('.py')):
      text = open(os.path.join(root, file)).read()
      for name in names:
        if f"'{name}'" in text or f'"{name}"' in text:
          typed.setdefault(name, []).append(os.path.relpath(os.path.join(root, file), package))
  assert typed == {name: [os.path.join('train', 'run_dir.py')] for name in names}


def test_loads_the_trainers_workdir(trained_workdir):
  """The contract with resnet_jax.train: a real (tiny) training run's workdir loads."""
  workdir, _ = trained_workdir
  model, variables = resnet_jax.load_model(workdir)
  size = model.total_stride
  x = jnp.zeros((2, size, size, model.in_channels))
  expected = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(
      {'params': expected['params'], 'batch_stats': expected['batch_stats']})
  assert model.apply(variables, x).shape == (2, model.num_classes)


# --- model.json and config.json are replaced whole ----------------------------------------

class _FullDiskFile:
  """A file opened for writing on a disk that fills up halfway through the first write."""

  def __init__(self, file):
    self._file = file

  def write(self, text):
    self._file.write(text[:len(text) // 2])
    self._file.flush()
    raise OSError(errno.ENOSPC, 'No space left on device')

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._file.close()


def test_run_files_survive_a_full_disk_while_rewritten(tmp_path, monkeypatch):
  """Each start rewrites model.json and config.json: a full disk (or a kill) at that
  moment leaves the old files whole, and no temporary file behind."""
  spec = {'name': ARCH, 'num_classes': 10}
  run_dir.write_run_files(tmp_path, tiny_digits_config(), spec)
  before = {p.name: p.read_text() for p in tmp_path.iterdir()}
  real_open = io.open

  def open_on_full_disk(file, mode='r', *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    return _FullDiskFile(opened) if 'w' in mode else opened

  monkeypatch.setattr(io, 'open', open_on_full_disk)
  with pytest.raises(UserError, match=r'Writing the run files .*No space left on device'):
    run_dir.write_run_files(tmp_path, tiny_digits_config(seed=1), {**spec, 'num_classes': 3})
  monkeypatch.undo()
  assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
  assert json.loads(before['config.json'])['seed'] == 0


# --- the start-up check covers every folder the run writes --------------------------------

def _no_compile(*args, **kwargs):
  raise AssertionError('the start-up check should refuse the workdir before compiling')


def _file(path):
  path.write_text('not a folder')


def _dangling_link(path):
  os.symlink(path.parent / 'missing' / 'folder', path)


def _folder(path):
  path.mkdir()


# Things in the way that stop root too (chmod does not; see the test below for that).
@pytest.mark.parametrize('name, make, message', [
    ('checkpoints', _file, 'NotADirectoryError: it exists and is not a directory'),
    ('checkpoints', _dangling_link, 'NotADirectoryError: .* \\(a dangling link\\)'),
    ('checkpoints_unreadable', _file, 'NotADirectoryError'),
    ('metrics.jsonl', _folder, 'IsADirectoryError'),
])
def test_unwritable_run_folder_or_file_is_refused_before_compiling(tmp_path, monkeypatch,
                                                                   name, make, message):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  make(workdir / name)
  monkeypatch.setattr(parallel, 'compile_steps', _no_compile)
  with pytest.raises(UserError, match=f"Cannot write to '{workdir / name}' \\({message}.*"
                                      f"pass another --workdir"):
    loop.train_and_evaluate(tiny_digits_config(), str(workdir))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes to a read-only (chmod 555) folder')
def test_read_only_checkpoints_folder_is_refused_before_compiling(tmp_path, monkeypatch):
  (tmp_path / 'checkpoints').mkdir(mode=0o555)
  monkeypatch.setattr(parallel, 'compile_steps', _no_compile)
  with pytest.raises(UserError, match=r"checkpoints' \(PermissionError: Permission denied"):
    loop.train_and_evaluate(tiny_digits_config(), str(tmp_path))
