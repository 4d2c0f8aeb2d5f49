"""The training config's keys, and the checks that turn a bad config into one UserError.

`KEYS` is the one table of what the code reads from a config: every config file defines
each of these keys (configs/default.py is the base, with a comment per key), the code reads
them as attributes (never `config.get(key, default)`, which would hide a key no user can
set), and the tests check both against the table.
"""

import collections.abc
import dataclasses
import difflib
import math
import typing
from typing import Any, Callable, Dict, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from resnet_jax.data import augment_policy
from resnet_jax.data.normalization import RECIPES
from resnet_jax.data.sizes import EVAL_CROP_FRACTION, image_sizes
from resnet_jax.errors import UserError
from resnet_jax.models.resnet import MEMORY_SAVING, MEMORY_SAVING_AUTO, ResNet
from resnet_jax.models.zoo import MODEL_OPTIONS
from resnet_jax.train.losses import LOSSES
from resnet_jax.train.optim import OPTIMIZERS, SCHEDULES

DTYPES = ('float32', 'bfloat16', 'float16')
INPUT_PIPELINES = ('tf.data', 'dali')


def _any(value) -> Optional[str]:
  del value


def _positive(value) -> Optional[str]:
  return None if value > 0 else 'must be positive'


def _non_negative(value) -> Optional[str]:
  return None if value >= 0 else 'must be 0 or more'


def _unit_interval(value) -> Optional[str]:
  return None if 0 <= value < 1 else 'must be in [0, 1)'


def _one_of(choices: Sequence[str]) -> Callable:
  return lambda value: None if value in choices else f'must be one of {", ".join(choices)}'


def _boundaries(value) -> Optional[str]:
  steps = list(value)
  if any(int(b) != b or b <= 0 for b in steps) or steps != sorted(set(steps)):
    return 'must be increasing positive step numbers, e.g. (32000, 48000)'
  return None


def _probability(value) -> Optional[str]:
  return None if 0 <= value <= 1 else 'must be in [0, 1]'


def _auto_augment(value) -> Optional[str]:
  augment_policy.parse(value)  # a UserError that says what to write
  return None


def _decay_factor(value) -> Optional[str]:
  return None if 0 < value <= 1 else 'must be in (0, 1]'


def _name(value) -> Optional[str]:
  return None if isinstance(value, str) and value.strip() else 'must not be empty'


def _profile_steps(value) -> Optional[str]:
  steps = tuple(value)
  if steps and (len(steps) != 2 or any(int(s) != s for s in steps)
                or not 0 <= steps[0] < steps[1]):
    return 'must be () or (start, end) steps with 0 <= start < end, e.g. (10, 15)'
  return None


def _seed(value) -> Optional[str]:
  # What jax.random.PRNGKey and the data order's 64-bit seeds take without overflow.
  if isinstance(value, bool) or int(value) != value or not 0 <= value < 2**32:
    return f'must be an integer from 0 to {2**32 - 1}'
  return None


def _non_finite(value) -> bool:
  """Whether `value` is or holds (in a tuple, list or dict) an infinite or NaN float."""
  if isinstance(value, float):
    return not math.isfinite(value)
  if isinstance(value, (tuple, list)):
    return any(map(_non_finite, value))
  if hasattr(value, 'items'):
    return any(_non_finite(v) for _, v in value.items())
  return False


def _override_type(annotation) -> type:
  """The command-line type of a ResNet field: Optional[X] is X, a Sequence a tuple, and a
  dtype its name."""
  if annotation is Any:
    return str
  if typing.get_origin(annotation) is typing.Union:
    return _override_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
  if typing.get_origin(annotation) is collections.abc.Sequence:
    return tuple
  return annotation


# The type of each create_model option, as config.model_overrides takes it, and
# memory_saving, one name for the remat fields (`models.resnet.MEMORY_SAVING`).
OVERRIDE_TYPES = {**{f.name: _override_type(f.type) for f in dataclasses.fields(ResNet)
                     if f.name in MODEL_OPTIONS}, 'memory_saving': str}
MEMORY_SAVING_CHOICES = (*MEMORY_SAVING, MEMORY_SAVING_AUTO)


def model_overrides(**values: Any) -> ml_collections.ConfigDict:
  """config.model_overrides: every create_model option, None (not overridden) unless
  given, so that `--config.model_overrides.remat=True` works with any config built on it."""
  check_model_overrides(values)
  return ml_collections.ConfigDict({
      name: config_dict.placeholder(kind) if values.get(name) is None else values[name]
      for name, kind in OVERRIDE_TYPES.items()})


def _valid_options() -> str:
  return ', '.join(sorted(OVERRIDE_TYPES))


def check_model_overrides(overrides) -> None:
  """Refuses a model_overrides name that is no create_model option, or a value of
  another type than the option's."""
  for name, value in dict(overrides).items():
    if name not in OVERRIDE_TYPES:
      close = difflib.get_close_matches(name, OVERRIDE_TYPES, n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise UserError(f'config.model_overrides has no option {name!r}{hint}. Valid options '
                      f'(create_model\'s): {_valid_options()}.')
    if value is not None and not _is_of_type(value, OVERRIDE_TYPES[name]):
      raise UserError(f'config.model_overrides.{name}={value!r} must be a '
                      f'{OVERRIDE_TYPES[name].__name__}.')
  _check_memory_saving(dict(overrides))


def _check_memory_saving(overrides: dict) -> None:
  """memory_saving is a known name, and the only one of the settings it stands for."""
  name = overrides.get('memory_saving')
  if name is None:
    return
  if name not in MEMORY_SAVING_CHOICES:
    raise UserError(f'config.model_overrides.memory_saving={name!r} must be one of '
                    f'{", ".join(map(repr, MEMORY_SAVING_CHOICES))}.')
  both = [k for k in MEMORY_SAVING['none'] if overrides.get(k) is not None]
  if both:
    raise UserError(f'config.model_overrides.memory_saving={name!r} sets {" and ".join(both)}'
                    f' itself: set memory_saving or {" / ".join(both)}, not both.')


def model_overrides_of(config) -> dict:
  """The create_model options config.model_overrides sets (None: not overridden), with
  memory_saving made the fields it names; 'auto' must be resolved first
  (`memory_saving.choose_memory_saving`, which train.py and the planner call)."""
  overrides = config.model_overrides
  overrides = overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides or {})
  overrides = {k: v for k, v in overrides.items() if v is not None}
  name = overrides.pop('memory_saving', None)
  if name == MEMORY_SAVING_AUTO:
    raise UserError("config.model_overrides.memory_saving='auto' is chosen at start-up by "
                    "train.py and resnet_jax.plan; here name one of "
                    f"{', '.join(map(repr, MEMORY_SAVING))}.")
  return {**overrides, **(MEMORY_SAVING[name] if name else {})}


def _is_of_type(value, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def _overrides(value) -> Optional[str]:
  check_model_overrides(value)


# Every key the code reads, with the check of its value.
KEYS: Dict[str, Callable] = {
    # Model.
    'model': _any, 'model_overrides': _overrides, 'num_classes': _positive, 'in_channels': _positive,
    'dtype': _one_of(DTYPES), 'bn_group_size': _non_negative,
    'drop_path_rate': _unit_interval,
    # Data.
    'dataset': _name, 'data_dir': _any, 'train_split': _name, 'eval_split': _name,
    'preprocess': _one_of(RECIPES), 'image_size': _positive,
    'shuffle_buffer': _positive, 'input_pipeline': _one_of(INPUT_PIPELINES),
    'auto_augment': _auto_augment, 'random_erase': _probability,
    'synthetic_train_size': _positive,
    'synthetic_eval_size': _positive, 'train_image_size': _non_negative,
    'eval_image_size': _non_negative, 'eval_resize_size': _non_negative,
    'repeated_augmentation': _positive,
    # Optimization.
    'batch_size': _positive, 'eval_batch_size': _positive, 'num_train_steps': _any,
    'num_epochs': _any, 'learning_rate': _positive, 'learning_rate_batch_base': _non_negative,
    'schedule': _one_of(SCHEDULES), 'end_learning_rate': _non_negative,
    'polynomial_power': _positive, 'warmup_steps': _non_negative,
    'warmup_epochs': _non_negative, 'lr_boundaries': _boundaries,
    'lr_decay_factor': _decay_factor, 'momentum': _unit_interval, 'nesterov': _any,
    'weight_decay': _non_negative, 'weight_decay_exclude_bn_and_bias': _any,
    'optimizer': _one_of(OPTIMIZERS), 'lars_eta': _positive, 'lars_eps': _non_negative,
    'adam_beta1': _unit_interval, 'adam_beta2': _unit_interval, 'adam_eps': _non_negative,
    'grad_clip_norm': _non_negative, 'weight_decay_exclude_norm': _any,
    'label_smoothing': _unit_interval, 'mixup_alpha': _non_negative,
    'cutmix_alpha': _non_negative, 'loss': _one_of(LOSSES),
    'bce_target_thresh': _unit_interval, 'ema_decay': _unit_interval,
    'ema_every_steps': _positive,
    # Run.
    'seed': _seed, 'log_every_steps': _any, 'eval_every_steps': _any,
    'checkpoint_every_steps': _any, 'keep_checkpoints': _positive, 'init_from': _any,
    'best_metric': _one_of(('eval/top1', 'eval_ema/top1')),
    'skip_nonfinite_steps': _any, 'stall_factor': _non_negative, 'stall_exit': _any,
    'profile_steps': _profile_steps,
}


def _with_suggestion(key: str) -> str:
  close = difflib.get_close_matches(key, KEYS, n=1)
  return f'{key} (did you mean {close[0]}?)' if close else key


def check_keys(config):
  """Refuses keys the code does not read (typos, stale keys) and keys a config lacks."""
  unknown = sorted(set(config.keys()) - set(KEYS))
  if unknown:
    raise UserError(f'Unknown config key(s): {", ".join(map(_with_suggestion, unknown))}. '
                    f'Valid keys: {", ".join(sorted(KEYS))}.')
  missing = sorted(set(KEYS) - set(config.keys()))
  if missing:
    raise UserError(f'The config lacks key(s) {", ".join(missing)}: build it on '
                    f'configs/default.py (`config = default.get_config()`), which defines '
                    f'every key with its default.')


def check_config(config, num_devices: int):
  """Checks everything that can be checked before any data is read or model built."""
  check_keys(config)
  for key, check in KEYS.items():
    problem = 'must be finite' if _non_finite(config[key]) else check(config[key])
    if problem:
      raise UserError(f'config.{key}={config[key]!r} {problem}.')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise UserError(f'config.{key}={config[key]} must be a multiple of the number of '
                      f'devices ({num_devices}); use e.g. {key}='
                      f'{max(1, config[key] // num_devices) * num_devices}.')
  if config.input_pipeline == 'dali' and (config.auto_augment or config.random_erase):
    raise UserError(f"config.input_pipeline='dali' does not apply auto_augment="
                    f"{config.auto_augment!r} or random_erase={config.random_erase}: use "
                    f"input_pipeline='tf.data' for them, or turn them off.")
  _check_sizes(config)
  steps, epochs = config.num_train_steps, config.num_epochs
  if steps == 0 or steps < -1 or (steps == -1 and not epochs > 0):
    raise UserError(f'config.num_train_steps={steps}, num_epochs={epochs}: set '
                    f'num_train_steps to a positive number, or to -1 with a positive '
                    f'num_epochs.')


def _check_sizes(config):
  sizes = image_sizes(config)
  if sizes.eval_resize < sizes.eval:
    raise UserError(f'config.eval_resize_size={config.eval_resize_size} is smaller than the '
                    f'eval crop ({sizes.eval}): use eval_resize_size >= {sizes.eval}, or 0 '
                    f'for {round(sizes.eval / EVAL_CROP_FRACTION)}.')
  if config.repeated_augmentation > config.batch_size:
    raise UserError(f'config.repeated_augmentation={config.repeated_augmentation} is more '
                    f'copies than a batch holds (batch_size={config.batch_size}): use at most '
                    f'{config.batch_size}.')


def check_eval_batch_size(config, eval_examples: int, num_devices: int):
  """Refuses an eval batch larger than the eval split (rounded up to a multiple of the
  devices): it would only be padding, and a large one exhausts host memory at the first
  evaluation, after steps were trained."""
  largest = -(-eval_examples // num_devices) * num_devices
  if config.eval_batch_size > largest:
    raise UserError(f'config.eval_batch_size={config.eval_batch_size} is larger than the eval '
                    f'split {config.eval_split!r} ({eval_examples} examples); use at most '
                    f'eval_batch_size={largest}.')


def unknown_override(argv: Sequence[str], config_keys: Sequence[str] = tuple(KEYS),
                     flag: str = 'config') -> Optional[str]:
  """The message for the first `--config.KEY=VALUE` in `argv` that names no key of the
  config (ml_collections raises an AttributeError with a traceback for it), or None."""
  prefix = f'--{flag}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split('=', 1)[0]
    key, _, sub_key = path.partition('.')
    if key not in config_keys:
      return (f'Unknown config key in {arg}: {_with_suggestion(key)}. Valid keys: '
              f'{", ".join(sorted(KEYS))}.')
    if sub_key:
      return _unknown_sub_key(arg, key, sub_key)
  return None


def _unknown_sub_key(arg: str, key: str, sub_key: str) -> str:
  if key == 'model_overrides' and sub_key not in OVERRIDE_TYPES:
    close = difflib.get_close_matches(sub_key, OVERRIDE_TYPES, n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    return (f'{arg}: {sub_key!r} is no create_model option{hint}. Valid options: '
            f'{_valid_options()}.')
  if key == 'model_overrides':
    return (f'{arg}: this config file defines config.model_overrides without '
            f'{sub_key!r}. Build it with resnet_jax.train.config_schema.model_overrides() '
            f'(as configs/default.py does), which defines every option.')
  return (f'{arg}: config.{key} has no key {sub_key!r}, and the command line can only '
          f'change keys a config file defines. Set it in a config file, e.g. '
          f'config.{key} = ml_collections.ConfigDict({{{sub_key!r}: ...}}).')
