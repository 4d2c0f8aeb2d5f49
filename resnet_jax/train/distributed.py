"""Several processes, one run: starting jax.distributed and explaining a lost process.

jax.distributed.initialize starts the coordination service (on process 0), which
watches every process's heartbeats, and the preemption service (SIGTERM on any process
-> every process saves the same step: train/preemption.py). When a process dies, the
others learn it at once from a failed collective (gloo's TCP connection resets) or,
when the host vanished without closing its sockets, after `heartbeat_timeout_s`, when
the coordination service terminates them (a process blocked in a collective included).
"""

import errno
import inspect
import os
import socket
import sys
import threading

import jax

from resnet_jax.errors import UserError

SHUTDOWN_TIMEOUT_S = 120  # how long a finished process waits for the others at exit
RESTART = ('run the same command on every process to resume from the newest complete '
           'checkpoint')


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               heartbeat_timeout_s: int = 30, initialization_timeout_s: int = 300):
  """jax.distributed.initialize with the given (or detected) addresses and ids.

  Unset values come from the cluster (TPU, SLURM, Open MPI, ...) or the environment
  (JAX_COORDINATOR_ADDRESS). On CPU, JAX's default collectives across processes are
  gloo's, over TCP. A process that cannot meet all the others within
  `initialization_timeout_s` exits with status 1 and one message (`_StartupDeadline`);
  a coordinator port in use is refused with a UserError naming it.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and None in given:
    raise UserError('--coordinator_address, --num_processes and --process_id go together: '
                    'pass all three (e.g. --coordinator_address=localhost:12345 '
                    '--num_processes=2 --process_id=0), or none to detect them.')
  if initialization_timeout_s < 1:
    raise UserError(f'--initialization_timeout_s={initialization_timeout_s}: pass a whole '
                    f'number of seconds, at least 1.')
  if process_id == 0:
    _check_port_free(coordinator_address)
  # Processes finish at different times (process 0 also plots; closing a data pipeline
  # can take seconds on a loaded host): the shutdown barrier must not be the heartbeat's.
  options = dict(heartbeat_timeout_seconds=heartbeat_timeout_s,
                 shutdown_timeout_seconds=max(heartbeat_timeout_s, SHUTDOWN_TIMEOUT_S))
  if 'initialization_timeout' in inspect.signature(jax.distributed.initialize).parameters:
    options['initialization_timeout'] = initialization_timeout_s
  with _StartupDeadline(initialization_timeout_s, coordinator_address, num_processes,
                        process_id):
    try:
      jax.distributed.initialize(coordinator_address, num_processes, process_id, **options)
    except Exception as e:  # pylint: disable=broad-except
      if 'Failed to start RPC server' not in str(e):
        raise
      raise UserError(_port_in_use_message(coordinator_address)) from None


def _port_in_use_message(coordinator_address) -> str:
  where = (f'Port {coordinator_address.rsplit(":", 1)[-1]} of --coordinator_address='
           f'{coordinator_address}' if coordinator_address else
           'The coordinator\'s port (found from the cluster)')
  return (f'{where} is already in use on this host, where process 0 starts the run\'s '
          f'coordinator: another run or program holds it. Pick a free port and pass the '
          f'same --coordinator_address to every process.')


def _check_port_free(coordinator_address: str):
  """Refuses a coordinator port that another socket holds, before JAX binds it.

  JAX binds [::]:PORT (all addresses); on a port in use it fails with 'Failed to start RPC
  server', naming no port, while the other processes wait for the whole start-up timeout.
  """
  port = coordinator_address.rsplit(':', 1)[-1]
  if not port.isdigit():
    raise UserError(f'--coordinator_address={coordinator_address}: give HOST:PORT, e.g. '
                    f'localhost:12345.')
  try:
    probe, address = socket.socket(socket.AF_INET6), ('::', int(port))
  except OSError:  # a host without IPv6
    probe, address = socket.socket(socket.AF_INET), ('0.0.0.0', int(port))
  with probe:
    # As the coordinator's server does: a closed connection in TIME_WAIT holds nothing.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(address)
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        raise UserError(f'--coordinator_address={coordinator_address}: process 0 cannot '
                        f'open port {port} ({e.strerror}); pick another port.') from None
      raise UserError(_port_in_use_message(coordinator_address)) from None


class _StartupDeadline:
  """Ends the process with one message when start-up takes `seconds`.

  JAX ends a process whose peers never connect with an abort (status 134, 'another task
  died', a C++ stack trace) a few seconds after its own initialization_timeout; that cannot
  be caught in Python. This timer fires at the timeout itself, first.
  """

  def __init__(self, seconds, coordinator_address, num_processes, process_id):
    self.message = _startup_timeout_message(seconds, coordinator_address, num_processes,
                                            process_id)
    self.timer = threading.Timer(seconds, self._give_up)
    self.timer.daemon = True
    self.lock, self.finished = threading.Lock(), False

  def _give_up(self):
    with self.lock:
      if self.finished:
        return
      print(f'Error: {self.message}', file=sys.stderr, flush=True)
      os._exit(1)  # not sys.exit: the main thread is blocked inside JAX

  def __enter__(self):
    self.timer.start()
    return self

  def __exit__(self, *_):
    with self.lock:
      self.finished = True
    self.timer.cancel()


def _startup_timeout_message(seconds, coordinator_address, num_processes, process_id) -> str:
  """Who is missing, as far as this process can tell: the others, none of which it saw."""
  if num_processes is None:  # detected from the cluster: not known before JAX starts
    who, missing = 'This process', 'one or more processes of the run'
  else:
    others = [i for i in range(num_processes) if i != process_id]
    who = f'Process {process_id} of {num_processes}'
    missing = (f'process {others[0]}' if len(others) == 1 else
               'one or more of processes ' + ', '.join(map(str, others)))
  where = coordinator_address or 'the address found from the cluster'
  return (f'{who}: the run\'s processes did not all connect to the coordinator at {where} '
          f'within {seconds} s (--initialization_timeout_s); missing: {missing}. Start '
          f'every process with the same --coordinator_address and --num_processes and its '
          f'own --process_id, check that each host can reach {where}, then run the same '
          f'commands again.')


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
