"""The glibc malloc settings train.py applies on CPU-only hosts."""

import subprocess
import sys

from resnet_jax.train import host_memory


def test_cpu_only_host_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.cpu_only_host()


def test_keep_freed_memory_applies_before_jax_starts_and_jax_still_runs():
  # In a fresh process: the settings are process-wide and must precede JAX's CPU client.
  script = ('from resnet_jax.train import host_memory\n'
            'assert host_memory.keep_freed_memory()\n'
            'import jax.numpy as jnp\n'
            'x = jnp.ones((64, 1024, 1024))\n'  # 256 MiB: glibc would mmap it by default
            'assert float((x * 2).sum()) == 2 * x.size\n')
  subprocess.run([sys.executable, '-c', script], check=True, timeout=120)
