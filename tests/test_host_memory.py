"""The glibc malloc settings train.py applies on CPU-only hosts."""

import json
import subprocess
import sys

import pytest
from helpers import HANG_S, REPO, subprocess_env

from resnet_jax.train import host_memory

# In a fresh process (the settings are process-wide and must precede JAX's CPU client):
# resident memory after freeing 256 MiB, glibc's default first, then with the settings, then
# after a JAX computation on 256 MiB, whose result must still be right.
KEPT_AFTER_FREE = '''
import json
import numpy as np
from resnet_jax.train import host_memory

def resident_mib():
  return int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20

def resident_after_freeing_256_mib():
  before = resident_mib()
  x = np.ones((64, 1024, 1024), np.float32)  # 256 MiB: glibc mmaps it by default
  del x
  return resident_mib() - before

default = resident_after_freeing_256_mib()
applied = host_memory.keep_freed_memory()
kept = resident_after_freeing_256_mib()
import jax.numpy as jnp
before = resident_mib()
y = jnp.ones((64, 1024, 1024))
right = float((y * 2).sum()) == 2 * y.size
del y
print(json.dumps(dict(default=default, applied=applied, kept=kept, right=right,
                      jax_kept=resident_mib() - before)))
'''


@pytest.mark.slow
def test_keep_freed_memory_keeps_freed_buffers_in_the_process_and_jax_still_runs():
  result = subprocess.run([sys.executable, '-c', KEPT_AFTER_FREE], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=HANG_S)
  assert result.returncode == 0, result.stderr[-3000:]
  mib = json.loads(result.stdout.splitlines()[-1])
  assert mib['applied'] and mib['right'], mib
  assert mib['default'] < 64, mib  # glibc's default hands a freed 256 MiB back at once
  assert mib['kept'] > 200 and mib['jax_kept'] > 200, mib  # the settings keep it


def _no_plugins(monkeypatch, libtpu=False):
  """Installed packages as cpu_only_host sees them: no JAX plugin; libtpu or not."""
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: [])
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec',
                      lambda name: object() if libtpu and name == 'libtpu' else None)


@pytest.mark.parametrize('platforms, libtpu, cpu_only', [
    ('cpu', True, True),  # JAX_PLATFORMS=cpu wins over an installed TPU runtime
    (' CPU ', True, True),
    ('', False, True),  # nothing but the CPU is installed
    (None, False, True),
    ('', True, False),  # libtpu: JAX may find a TPU
    ('tpu', True, False),
    ('cpu,tpu', True, False),
])
def test_cpu_only_host_is_jax_platforms_cpu_or_no_accelerator_installed(
    monkeypatch, platforms, libtpu, cpu_only):
  if platforms is None:
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  else:
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
  _no_plugins(monkeypatch, libtpu)
  assert host_memory.cpu_only_host() is cpu_only


def test_a_jax_plugin_is_an_accelerator(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  _no_plugins(monkeypatch)
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points',
                      lambda group: ['jax_cuda12_plugin'] if group == 'jax_plugins' else [])
  assert not host_memory.cpu_only_host()
