"""The command line of train.py and `python -m resnet_jax.plan`: the --config flag, and
flag parsing with one message for each kind of mistake (no traceback)."""

import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags


def _exit_unknown_key(error: Exception):
  """ml_collections' AttributeError for a --config.KEY the config lacks, as one message."""
  from resnet_jax.train.config_schema import unknown_override  # pylint: disable=g-import-not-at-top
  sys.exit(f'Error: {unknown_override(sys.argv) or error}')


def define_config_flag(default_path: str, help_string: str):
  """--config: an ml_collections config file, with --config.KEY=VALUE overrides."""
  try:  # ml_collections applies the default config's overrides here already
    config_flags.DEFINE_config_file('config', default_path, help_string, lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_unknown_key(e)


def parse_flags(argv):
  """absl's flag parsing (for app.run's flags_parser), with one message for a bad flag,
  value, config key or config file."""
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Error: {e}\nPass --helpfull to see the flags.')
  except SyntaxError as e:  # in the --config file: Python's own lines name the spot
    sys.exit('Error: the --config file does not parse:\n'
             + ''.join(traceback.format_exception_only(e)).rstrip())
  except OSError as e:  # --config.KEY=VALUE on a file that did not load
    _exit_unloaded(argv, e)
  except (AttributeError, KeyError) as e:
    if "attribute 'get_config'" in str(e):
      sys.exit(f'Error: --config {_config_file(argv)} defines no get_config().')
    _exit_unknown_key(e)
  config = flags.FLAGS.config
  if getattr(config, '_error', None) is not None:  # ml_collections' stand-in for a failed load
    _exit_unloaded(argv, config._error)  # pylint: disable=protected-access
  if not isinstance(config, ml_collections.ConfigDict):
    sys.exit(f'Error: get_config() of --config {_config_file(argv)} returned '
             f'{type(config).__name__}, not an ml_collections.ConfigDict.')
  return parsed


def _config_file(argv) -> str:
  """The --config path of the command line (absl has none to give when parsing failed)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return 'the default config'


def _exit_unloaded(argv, error: OSError):
  """One line for a config file that did not load: the last of ml_collections' lines."""
  sys.exit(f'Error: cannot load --config {_config_file(argv)}: '
           f'{str(error).strip().splitlines()[-1].strip()}')
