"""Several processes, one run: starting jax.distributed and explaining a lost process.

jax.distributed.initialize starts the coordination service (on process 0), which
watches every process's heartbeats, and the preemption service (SIGTERM on any process
-> every process saves the same step: train/preemption.py). When a process dies, the
others learn it at once from a failed collective (gloo's TCP connection resets) or,
when the host vanished without closing its sockets, after `heartbeat_timeout_s`, when
the coordination service terminates them (a process blocked in a collective included).
"""

import jax

from resnet_jax.errors import UserError

SHUTDOWN_TIMEOUT_S = 120  # how long a finished process waits for the others at exit
RESTART = ('run the same command on every process to resume from the newest complete '
           'checkpoint')


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               heartbeat_timeout_s: int = 30):
  """jax.distributed.initialize with the given (or detected) addresses and ids.

  Unset values come from the cluster (TPU, SLURM, Open MPI, ...) or the environment
  (JAX_COORDINATOR_ADDRESS). On CPU, JAX's default collectives across processes are
  gloo's, over TCP.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and None in given:
    raise UserError('--coordinator_address, --num_processes and --process_id go together: '
                    'pass all three (e.g. --coordinator_address=localhost:12345 '
                    '--num_processes=2 --process_id=0), or none to detect them.')
  # Processes finish at different times (process 0 also plots; closing a data pipeline
  # can take seconds on a loaded host): the shutdown barrier must not be the heartbeat's.
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=max(heartbeat_timeout_s,
                                                          SHUTDOWN_TIMEOUT_S))


def describe(heartbeat_timeout_s: int) -> str:
  """The line each process logs at the start of a multi-process run."""
  return (f'Process {jax.process_index()} of {jax.process_count()}. If one stops, the '
          f'others exit within {heartbeat_timeout_s} s; then {RESTART}.')


def lost_process_message(error: Exception) -> str:
  """The message for a collective that failed because another process went away."""
  first = (str(error).strip().splitlines() or [''])[0][:300]
  others = [i for i in range(jax.process_count()) if i != jax.process_index()]
  return (f'Process {jax.process_index()} lost contact with another process of this run '
          f'(processes {others}; a collective failed: {first}). That process died or '
          f'became unreachable; its own output says why. Nothing newer than the last '
          f'complete checkpoint is lost: {RESTART}.')


def is_lost_process(error: Exception) -> bool:
  """Whether `error` is a collective or coordination failure caused by a lost peer."""
  text = str(error)
  return jax.process_count() > 1 and any(
      marker in text for marker in ('Gloo', 'gloo', 'Connection reset', 'Connection closed',
                                    'coordination service', 'DEADLINE_EXCEEDED'))
