"""Shared test settings: compile fast, run on the CPU."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # keep TensorFlow and torch off GPUs

# torchvision (which loads torch's triton) before TensorFlow: loading triton after
# TensorFlow segfaults, and test modules import both.
import torchvision  # noqa: E402,F401
import jax  # noqa: E402

# Compile time dominates these small tests; XLA's heavy passes do not pay off here.
jax.config.update('jax_disable_most_optimizations', True)


# --- PyTorch layout (tests/test_batch_norm.py, test_pooling.py, test_convolution.py) and
# what a backward pass keeps (test_models.py, test_nnx.py) ---------------------------------
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def nchw(x) -> torch.Tensor:
  """An NHWC array as the NCHW tensor PyTorch's layers take."""
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
  """A PyTorch NCHW output as an NHWC array, to compare with ours."""
  return t.detach().permute(0, 2, 3, 1).numpy()


def saved_activations(loss, *args):
  """(shape, description) of the values of image size (4 or more axes, more than one pixel)
  that the backward pass of `loss(*args)` keeps, arguments aside, as
  `jax.ad_checkpoint.print_saved_residuals` describes them."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # lines like "bf16[2,8,8,64] named 'x' from ..."
    jax.ad_checkpoint.print_saved_residuals(loss, *args)
  saved = [re.match(r'\w+\[([\d,]*)\] (.*)', line).groups()
           for line in printed.getvalue().splitlines()]
  shapes = [(tuple(int(d) for d in dims.split(',') if d), why) for dims, why in saved]
  return [(shape, why) for shape, why in shapes
          if len(shape) >= 4 and np.prod(shape[:-1]) > 1 and 'argument' not in why]


# --- Training fixtures (tests/test_train.py, test_data.py, test_evaluate.py) ---------
import importlib  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL = {'stage_sizes': (1, 1, 1), 'stage_widths': (4, 8, 16)}


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


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A tiny digits run of 4 steps: (workdir, the eval results it reported)."""
  from resnet_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  return workdir, train_and_evaluate(tiny_digits_config(), workdir)


# --- Compilation cache (tests/test_fault_tolerance.py) ------------------------------------
# Every train_and_evaluate call and every train.py subprocess compiles the same small
# programs again; a per-session persistent cache makes the repeats cheap. Set before any
# compilation, so the whole session uses it; removed when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

JAX_CACHE_DIR = tempfile.mkdtemp(prefix='resnet_jax_test_cache_')
atexit.register(shutil.rmtree, JAX_CACHE_DIR, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', JAX_CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
