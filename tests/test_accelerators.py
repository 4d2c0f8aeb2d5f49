"""resnet_jax.accelerators: libtpu (the `tpu` extra) is silent in the project's commands on
a machine without a TPU."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from resnet_jax import accelerators

LIBTPU_LINES = ('host bounds', 'libtpu', 'TPU_', 'E0000')


@pytest.mark.cli
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason="needs libtpu: pip install 'resnet_jax[tpu]'")
def test_a_command_prints_no_libtpu_error_without_a_tpu(tmp_path):
  """`predict` starts JAX's backends as a user's command does (no JAX_PLATFORMS): libtpu
  loads, finds no TPU, and prints nothing."""
  if accelerators._tpu_chips_attached():
    pytest.skip('a TPU host: libtpu runs here')
  import jax
  from PIL import Image
  from resnet_jax import create_model
  from resnet_jax.train.checkpoint_format import save_converted
  model = create_model('cifar_resnet20')
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
  save_converted(variables, {'name': 'cifar_resnet20', 'num_classes': 10},
                 tmp_path / 'converted')
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'black.png')
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', *accelerators._NO_TPU_ENV)}
  result = subprocess.run([sys.executable, '-m', 'resnet_jax.predict', '--checkpoint',
                           str(tmp_path / 'converted'), str(tmp_path / 'black.png')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'black.png' in result.stdout, result.stdout
  assert not [line for line in result.stderr.splitlines()
              if any(marker in line for marker in LIBTPU_LINES)], result.stderr


def test_nothing_is_set_where_the_user_chose(monkeypatch):
  monkeypatch.setattr(accelerators, '_tpu_chips_attached', lambda: False)
  monkeypatch.setattr(accelerators.importlib.util, 'find_spec', lambda name: object())
  for key in accelerators._NO_TPU_ENV:
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not accelerators.quiet_libtpu_without_tpu()
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v4-8')
  assert not accelerators.quiet_libtpu_without_tpu()
  assert 'TPU_WORKER_HOSTNAMES' not in os.environ
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE')
  monkeypatch.setattr(accelerators, '_tpu_chips_attached', lambda: True)  # a TPU host
  assert not accelerators.quiet_libtpu_without_tpu()
  assert not any(key in os.environ for key in accelerators._NO_TPU_ENV)
