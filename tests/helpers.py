"""What several test modules share: tiny configs, PyTorch layout, subprocess environments,
checkpoint reading and the comparison with an uninterrupted run.

Fixtures live in conftest.py; this module has no side effects beyond the compilation cache
directory of the session, so train.py subprocesses can import it from a config file.
"""

import atexit
import contextlib
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL = {'stage_sizes': (1, 1, 1), 'stage_widths': (4, 8, 16)}

# The kill/preemption run: long enough that a kill after the first checkpoint lands mid-run.
LONG = dict(num_train_steps=60, log_every_steps=5, checkpoint_every_steps=10,
            eval_every_steps=0, keep_checkpoints=2)
LONG_FLAGS = [f'--config.{k}={v}' for k, v in LONG.items()]
# Metrics that depend on the wall clock, not on the run.
TIMING_KEYS = ('train/images_per_sec',)
# Seconds after which a subprocess is taken to hang: a bound for a hang, never a speed test
# (a two-process train.py run took over 240 s on the 2-core CI machine at load 20).
HANG_S = 900


# --- the quick tier -------------------------------------------------------------------------

def quick_sample(cases, quick, ids=None):
  """pytest parameters over `cases` where only the cases whose id is in `quick` run in the
  quick tier (`pytest -m "not slow"`); the others are marked slow, so the full suite (CI)
  still checks every case. An id is `ids(case)`, or the case itself."""
  ids = ids or (lambda case: case)
  unknown = set(quick) - {ids(case) for case in cases}
  assert not unknown, f'quick cases {unknown} are not among the cases'
  return [pytest.param(*(case if isinstance(case, tuple) else (case,)), id=str(ids(case)),
                       marks=() if ids(case) in quick else pytest.mark.slow)
          for case in cases]


# --- configs --------------------------------------------------------------------------------

def load_config(name: str):
  """The packaged configs/<name>.py's get_config()."""
  return importlib.import_module(f'resnet_jax.configs.{name}').get_config()


def tiny_digits_config(**overrides):
  """The default digits config with a 4-block ResNet, a few steps and a constant lr."""
  config = load_config('default')
  config.model_overrides = TINY_MODEL
  config.update(dict(batch_size=32, eval_batch_size=128, num_train_steps=4, schedule='constant',
                     warmup_steps=0, learning_rate=0.05, log_every_steps=2, eval_every_steps=4,
                     checkpoint_every_steps=2))
  config.update(overrides)
  return config


# --- PyTorch layout (test_batch_norm, test_pooling, test_convolution) and what a backward
# pass keeps (test_models, test_nnx) ---------------------------------------------------------

def nchw(x):
  """An NHWC array as the NCHW tensor PyTorch's layers take."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(t) -> np.ndarray:
  """A PyTorch NCHW output as an NHWC array, to compare with ours."""
  return t.detach().permute(0, 2, 3, 1).numpy()


def saved_activations(loss, *args):
  """(shape, description) of the values of image size (4 or more axes, more than one pixel)
  that the backward pass of `loss(*args)` keeps, arguments aside, as
  `jax.ad_checkpoint.print_saved_residuals` describes them."""
  import jax  # pylint: disable=g-import-not-at-top
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # lines like "bf16[2,8,8,64] named 'x' from ..."
    jax.ad_checkpoint.print_saved_residuals(loss, *args)
  saved = [re.match(r'\w+\[([\d,]*)\] (.*)', line).groups()
           for line in printed.getvalue().splitlines()]
  shapes = [(tuple(int(d) for d in dims.split(',') if d), why) for dims, why in saved]
  return [(shape, why) for shape, why in shapes
          if len(shape) >= 4 and np.prod(shape[:-1]) > 1 and 'argument' not in why]


# --- subprocesses ---------------------------------------------------------------------------

def _session_cache_dir() -> str:
  """One persistent compilation cache per test process (per xdist worker), inherited by its
  train.py subprocesses through the environment and removed when the session ends: every
  train_and_evaluate call and every subprocess compiles the same small programs again."""
  variable = f'RESNET_JAX_TEST_CACHE_{os.environ.get("PYTEST_XDIST_WORKER", "main")}'
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix='resnet_jax_test_cache_')
    atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
  return os.environ[variable]


JAX_CACHE_DIR = _session_cache_dir()


def can_mount_a_tmpfs() -> bool:
  """Whether `full_disk_command` can run here (user namespaces: `unshare -Urm`)."""
  try:
    return subprocess.run(['unshare', '-Urm', 'true'], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def full_disk_command(disk, free_kib: int, command, before: str = 'true') -> list:
  """`command` with a real full disk at `disk`: a 4 MiB tmpfs mounted there in a user
  namespace (no root needed), `before` run in it (a shell command), then filled to
  `free_kib` KiB free."""
  fill = (f'dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null; '
          f'truncate -s -{free_kib}K {disk}/filler')
  return ['unshare', '-Urm', 'sh', '-c',
          f'mount -t tmpfs -o size=4m tmpfs {disk} && {before} && {{ {fill}; }} && exec "$@"',
          'sh', *map(str, command)]


def subprocess_env(devices: int = 1, **extra) -> dict:
  """The environment of a JAX subprocess: CPU only, `devices` host devices, fast compiles,
  and this source tree first on the path (an editable install may point elsewhere)."""
  path = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'PYTHONPATH': path, **extra}


def train_py_command(config_file, workdir, *flags) -> list:
  """`python train.py` on `config_file` and `workdir`, with the session's compilation cache."""
  return [sys.executable, 'train.py', '--config', str(config_file), '--workdir', str(workdir),
          '--jax_cache_dir', JAX_CACHE_DIR, *flags]


def free_port() -> int:
  """A TCP port on localhost that nothing listens on (for a coordinator)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


# --- checkpoints and metrics, against an uninterrupted run -----------------------------------

def checkpoint_steps(workdir) -> list:
  """The steps of WORKDIR/checkpoints/<step> directories, oldest first."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_for_checkpoint(workdir, processes, describe, timeout: float = HANG_S):
  """Waits until the first checkpoint directory appears (the save may still be running);
  fails with describe() when one of `processes` ends first or `timeout` seconds pass."""
  import pytest  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout
  while not checkpoint_steps(workdir):
    if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
      pytest.fail(f'No checkpoint appeared in {workdir}:\n{describe()}')
    time.sleep(0.02)


def truncate_files(directory):
  """Cuts every file below `directory` to half its size, as a crash mid-write leaves it."""
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def read_state(workdir, step=None) -> dict:
  """A checkpoint's whole 'state' item as numpy arrays (independent of device counts),
  read by the project's one reader of a step."""
  from resnet_jax.train import checkpoint_format, run_dir  # pylint: disable=g-import-not-at-top
  directory = run_dir.checkpoint_dir(workdir)
  step = checkpoint_format.saved_steps(directory)[-1] if step is None else step
  return checkpoint_format.read_state(directory, step)


def assert_same_state(workdir, reference):
  """Bit-identical parameters, batch statistics, optimizer state, step and rng."""
  import jax  # pylint: disable=g-import-not-at-top
  a, b = read_state(workdir), read_state(reference)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def metric_lines(workdir) -> list:
  """The rows of WORKDIR/metrics.jsonl without the wall-clock metrics."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_metrics_match(workdir, reference):
  """Every line logged for a step the reference also logged equals the reference's."""
  expected = {}
  for row in metric_lines(reference):
    expected.setdefault(row['step'], []).append(row)
  checked = 0
  for row in metric_lines(workdir):
    if row['step'] in expected:
      assert row in expected[row['step']], (row, expected[row['step']])
      checked += 1
  assert checked >= len(expected), 'the resumed run logged fewer steps than the reference'


def interrupt_at(monkeypatch, call: int):
  """Makes the run's compiled train step send this process SIGINT (Ctrl-C) while its
  `call`-th call runs."""
  import signal  # pylint: disable=g-import-not-at-top
  from resnet_jax.train import parallel  # pylint: disable=g-import-not-at-top
  compile_steps = parallel.compile_steps

  def compile_interrupted_steps(*args, **kwargs):
    train_fn, eval_fn = compile_steps(*args, **kwargs)
    calls = []

    def train_fn_interrupted(state, batch):
      calls.append(1)
      if len(calls) == call:
        os.kill(os.getpid(), signal.SIGINT)
      return train_fn(state, batch)

    return train_fn_interrupted, eval_fn

  monkeypatch.setattr(parallel, 'compile_steps', compile_interrupted_steps)
