"""The command line of train.py and `python -m resnet_jax.plan`: the --config flag, and
flag parsing with one message for each kind of mistake (no traceback)."""

import sys

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
  value or config key."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Error: {e}\nPass --helpfull to see the flags.')
  except (AttributeError, KeyError) as e:
    _exit_unknown_key(e)
