"""Keep freed host memory in the process, so XLA:CPU does not page-fault its buffers anew.

XLA:CPU allocates each step's buffers with malloc. glibc serves blocks this large with
fresh mmap()s (and returns freed ones to the OS), so every step pays a page fault per
4 KiB of activations; benchmarks/RESULTS.md records what that cost on the CI machine.
"""

import ctypes
import importlib.metadata
import importlib.util
import os

# mallopt() parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only_host() -> bool:
  """True where JAX can only run on the CPU: JAX_PLATFORMS=cpu or no accelerator plugin."""
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  plugins = importlib.metadata.entry_points(group='jax_plugins')
  return not plugins and importlib.util.find_spec('libtpu') is None


def keep_freed_memory() -> bool:
  """Make glibc's malloc reuse freed memory instead of mapping and unmapping it.

  One heap shared by all threads, no mmap() for large blocks, no trimming: the memory
  of the first step is reused by every later one. Peak memory is unchanged, but it is not
  handed back to the OS until the process exits. It must run before JAX creates its CPU
  client (before the first computation), since threads keep the heap they started with.

  Returns:
    Whether the settings were applied (False where the C library is not glibc).
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
