"""Shared test settings (compile fast, run on the CPU), the `slow` tier and shared fixtures.

Helpers shared by several test modules live in tests/helpers.py.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # keep TensorFlow and torch off GPUs

# torchvision (which loads torch's triton) before TensorFlow: loading triton after
# TensorFlow segfaults, and test modules import both.
import torchvision  # noqa: E402,F401
import jax  # noqa: E402

# Compile time dominates these small tests; XLA's heavy passes do not pay off here.
jax.config.update('jax_disable_most_optimizations', True)

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from helpers import JAX_CACHE_DIR, REPO, tiny_digits_config  # noqa: E402

# A persistent cache for the session, set before any compilation (see helpers).
jax.config.update('jax_compilation_cache_dir', JAX_CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


# --- the quick tier: `pytest -m "not slow"` -------------------------------------------------

def pytest_collection_modifyitems(items):
  """A command-line test (`cli`) is a slow one: it starts a subprocess."""
  for item in items:
    if item.get_closest_marker('cli') and not item.get_closest_marker('slow'):
      item.add_marker(pytest.mark.slow)


def _caller_is_ours(frame) -> bool:
  """Whether the first caller outside the subprocess module is this repository's code (a
  library's own helper process, such as matplotlib's fc-list, does not count)."""
  while frame and frame.f_code.co_filename == subprocess.__file__:
    frame = frame.f_back
  filename = frame.f_code.co_filename if frame else ''
  return filename.startswith(str(REPO)) and 'site-packages' not in filename


@pytest.fixture(autouse=True)
def _subprocesses_only_in_slow_tests(request, monkeypatch):
  """Fails a test that starts a subprocess (seconds of imports each) without the `slow`
  marker, so the quick tier cannot grow slow by a forgotten marker."""
  if request.node.get_closest_marker('slow'):
    return
  popen_init = subprocess.Popen.__init__

  def refuse_ours(self, args, *rest, **kwargs):
    if _caller_is_ours(sys._getframe(1)):  # pylint: disable=protected-access
      pytest.fail(f'{request.node.nodeid} starts a subprocess ({str(args)[:100]}): mark it '
                  '@pytest.mark.slow so that `pytest -m "not slow"` stays quick.',
                  pytrace=False)
    popen_init(self, args, *rest, **kwargs)

  monkeypatch.setattr(subprocess.Popen, '__init__', refuse_ours)


# --- shared fixtures ------------------------------------------------------------------------

@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A tiny digits run of 4 steps: (workdir, the eval results it reported)."""
  from resnet_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  return workdir, train_and_evaluate(tiny_digits_config(), workdir)


@pytest.fixture(scope='session')
def config_file(tmp_path_factory):
  """A config file train.py can read: the tiny digits config."""
  path = tmp_path_factory.mktemp('config') / 'tiny.py'
  path.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(REPO / 'tests')!r})
      from helpers import tiny_digits_config
      def get_config():
        return tiny_digits_config()
  '''))
  return str(path)
