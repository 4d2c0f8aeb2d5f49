"""Train a ResNet: `python train.py --config configs/NAME.py --workdir DIR [--config.KEY=V]`.

With no flags it trains the offline default (configs/default.py, sklearn digits) in
./workdirs/default. Running again with the same workdir resumes from its last checkpoint.
"""

import os
import sys

from absl import app, flags, logging

from resnet_jax.configs import config_path
from resnet_jax.train.command_line import define_config_flag, parse_flags


define_config_flag(config_path('default'), 'Training configuration file.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics '
                    '(default: ./workdirs/<config name>).')
flags.DEFINE_string('jax_cache_dir', os.path.expanduser('~/.cache/resnet_jax/jax'),
                    'Persistent compilation cache, so restarts do not recompile ("" disables).')
flags.DEFINE_bool('keep_freed_memory', True, 'On CPU-only hosts, keep freed memory in the '
                  'process (glibc malloc settings): XLA:CPU steps run up to 25% faster.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host pods; '
                  'coordinator found from the environment: TPU, SLURM, Open MPI, ...).')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 for a multi-process '
                    'run without a cluster manager (with --num_processes, --process_id).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of the run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0 .. num_processes-1.')
flags.DEFINE_integer('heartbeat_timeout_s', 30, 'Multi-process runs: a process silent this '
                     'long counts as dead, and the others exit.')
flags.DEFINE_integer('initialization_timeout_s', 300, 'Multi-process runs: how long each '
                     'process waits at start-up for all the others to connect; then it exits '
                     'with status 1 naming the missing ones.')
FLAGS = flags.FLAGS


def _cache_folder() -> str:
  """--jax_cache_dir made if local, or '' (no persistent cache) with one warning for the
  default, or an exit with one message for a folder passed: JAX would only warn, then
  compile every run anew. Other URLs (gs://...) are JAX's to open."""
  folder = FLAGS.jax_cache_dir
  if not folder or '://' in folder:
    return folder
  try:
    os.makedirs(folder, exist_ok=True)
    return folder
  except OSError as e:
    reason = 'it is a file' if os.path.isfile(folder) else e.strerror or e
  if not FLAGS['jax_cache_dir'].present:  # e.g. a read-only home: train, compiling anew
    print(f'Warning: no compilation cache: {folder} cannot be made a folder ({reason}); '
          f'pass --jax_cache_dir=FOLDER.', file=sys.stderr, flush=True)
    return ''
  sys.exit(f'Error: --jax_cache_dir {folder} cannot be made a folder ({reason}); pass a '
           f'folder, or --jax_cache_dir= to compile without the persistent cache.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.workdir is not None and not FLAGS.workdir.strip():  # e.g. an unset "$WORKDIR"
    sys.exit('Error: --workdir is empty; pass a directory, or leave --workdir out for '
             './workdirs/<config name>.')
  cache_folder = _cache_folder()
  if not FLAGS['verbosity'].present:  # keep the console to progress lines
    logging.set_verbosity(logging.WARNING)
  from resnet_jax.train import host_memory  # pylint: disable=g-import-not-at-top
  if FLAGS.keep_freed_memory and host_memory.cpu_only_host():
    host_memory.keep_freed_memory()  # before JAX starts its CPU client
  from resnet_jax import accelerators  # pylint: disable=g-import-not-at-top
  accelerators.quiet_libtpu_without_tpu()  # before JAX starts a backend
  import jax  # pylint: disable=g-import-not-at-top
  from resnet_jax.errors import (  # pylint: disable=g-import-not-at-top
      CheckpointSaveError, Interrupted, UserError)
  from resnet_jax.train import distributed  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes is not None:
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                             FLAGS.process_id, FLAGS.heartbeat_timeout_s,
                             FLAGS.initialization_timeout_s)
  except UserError as e:
    sys.exit(f'Error: {e}')
  if cache_folder:
    jax.config.update('jax_compilation_cache_dir', cache_folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  from resnet_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config_name = os.path.splitext(os.path.basename(flags.FLAGS['config'].config_filename))[0]
  workdir = FLAGS.workdir or os.path.join('workdirs', config_name)
  if jax.process_count() > 1:
    print(distributed.describe(FLAGS.heartbeat_timeout_s), flush=True)
  try:
    train_and_evaluate(FLAGS.config, workdir)
  except CheckpointSaveError as e:  # not sys.exit: it would wait for orbax's stuck threads
    sys.stdout.flush()
    print(f'Error: {e}', file=sys.stderr, flush=True)
    os._exit(1)
  except UserError as e:  # the message says what to fix; no traceback
    sys.exit(f'Error: {e}')
  except Interrupted as e:  # saved; not 0, so that a scheduler requeues the job
    sys.exit(e.exit_status)
  except Exception as e:  # pylint: disable=broad-except
    if not distributed.is_lost_process(e):
      raise
    print(f'Error: {distributed.lost_process_message(e)}', file=sys.stderr, flush=True)
    os._exit(1)  # not sys.exit: its shutdown would wait for the lost process


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
