"""libtpu on a machine without a TPU: quiet, for the processes this project starts.

The `tpu` extra installs libtpu for the planner. JAX then loads it in every process, and
on a machine with no TPU chip libtpu looks for the accelerator type and worker hostnames
(from a metadata server that is not there) and prints a multi-line error before JAX falls
back to the CPU (or GPU). The command-line tools call `quiet_libtpu_without_tpu` in their
`main`, before JAX starts a backend; a user's own script can do the same.
"""

import importlib.util
import os

# What libtpu asks for when no metadata server answers. With no TPU chip present it then
# finds nothing to run on and stays silent (it compiles nothing for these processes).
_NO_TPU_ENV = {'TPU_ACCELERATOR_TYPE': 'v5litepod-1', 'TPU_WORKER_HOSTNAMES': 'localhost'}


def quiet_libtpu_without_tpu() -> bool:
  """Gives libtpu the settings it asks for where no TPU chip is attached, so that it loads
  without printing errors. Changes nothing on a TPU host, where libtpu is absent, where
  JAX_PLATFORMS is set or where the user set these variables. True when it set them."""
  if (os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None or
      any(key in os.environ for key in _NO_TPU_ENV) or _tpu_chips_attached()):
    return False
  os.environ.update(_NO_TPU_ENV)
  return True


def _tpu_chips_attached() -> bool:
  """JAX's own test (TPU chips on the PCI bus); True if this JAX cannot tell."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return True
