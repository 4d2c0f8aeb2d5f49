"""Config checks: each problem is one `UserError` that names the fix."""

import difflib

from resnet_jax.errors import UserError

# Every key a config may hold (configs/*.py); anything else is a typo or a stale key.
KNOWN_CONFIG_KEYS = frozenset((
    'model', 'model_overrides', 'num_classes', 'in_channels', 'dtype', 'bn_group_size',
    'dataset', 'data_dir', 'train_split', 'eval_split', 'preprocess', 'image_size',
    'shuffle_buffer', 'synthetic_eval_size', 'batch_size', 'eval_batch_size',
    'num_train_steps', 'num_epochs', 'learning_rate', 'learning_rate_batch_base', 'schedule',
    'warmup_steps', 'warmup_epochs', 'lr_boundaries', 'lr_decay_factor', 'momentum',
    'nesterov', 'weight_decay', 'weight_decay_exclude_bn_and_bias', 'label_smoothing', 'seed',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'init_from', 'skip_nonfinite_steps'))


def check_config_keys(config):
  unknown = sorted(set(config.keys()) - KNOWN_CONFIG_KEYS)
  if unknown:
    hints = [f'{k} (did you mean {m[0]}?)' if (m := difflib.get_close_matches(
        k, KNOWN_CONFIG_KEYS, n=1)) else k for k in unknown]
    raise UserError(f'Unknown config key(s): {", ".join(hints)}. Valid keys: '
                    f'{", ".join(sorted(KNOWN_CONFIG_KEYS))}.')


def check_config(config, num_devices: int):
  """Checks what can be checked before any data is read or model built."""
  check_config_keys(config)
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] <= 0:
      raise UserError(f'config.{key}={config[key]} must be positive.')
    if config[key] % num_devices:
      raise UserError(f'config.{key}={config[key]} must be a multiple of the number of '
                      f'devices ({num_devices}); use e.g. {key}='
                      f'{max(1, config[key] // num_devices) * num_devices}.')
  steps, epochs = config.num_train_steps, config.get('num_epochs', -1)
  if steps == 0 or steps < -1 or (steps == -1 and not epochs > 0):
    raise UserError(f'config.num_train_steps={steps}, num_epochs={epochs}: set '
                    f'num_train_steps to a positive number, or to -1 with a positive '
                    f'num_epochs.')
  if config.get('keep_checkpoints', 1) <= 0:
    raise UserError(f'config.keep_checkpoints={config.keep_checkpoints} must be at least 1.')
