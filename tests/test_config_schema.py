"""The training config: every key the code reads is settable, README options parse and
validate, and a bad key or value is one message."""

import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from helpers import HANG_S, REPO, load_config, tiny_digits_config
from ml_collections import config_flags

from resnet_jax.errors import UserError
from resnet_jax import plan
from resnet_jax.train import build, run_dir
from resnet_jax.models.zoo import MODEL_OPTIONS
from resnet_jax.train.config_schema import (KEYS, check_config, check_eval_batch_size,
                                            model_overrides)
from resnet_jax.train.loop import train_and_evaluate

CONFIG_NAMES = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_file_defines_exactly_the_keys_the_code_reads(name):
  config = load_config(name)
  assert set(config.keys()) == set(KEYS), set(config.keys()) ^ set(KEYS)
  check_config(config, num_devices=1)


class _RecordingConfig(ml_collections.ConfigDict):
  """A ConfigDict that remembers every key read from it (attribute, item or `get`)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    object.__setattr__(self, 'read_keys', set())

  def __getitem__(self, key):
    self.read_keys.add(key)
    return super().__getitem__(key)


@pytest.mark.parametrize('overrides', [
    {},  # digits, in memory
    dict(dataset='synthetic', image_size=8, in_channels=1, synthetic_train_size=64,
         synthetic_eval_size=32, eval_batch_size=32, preprocess='none'),
])
def test_training_reads_only_keys_of_the_table(tmp_path, overrides):
  config = _RecordingConfig(tiny_digits_config(num_train_steps=2, **overrides).to_dict())
  train_and_evaluate(config, str(tmp_path))
  assert config.read_keys and config.read_keys <= set(KEYS), config.read_keys - set(KEYS)


@pytest.mark.parametrize('key, value, message', [
    ('learning_rate', -1.0, 'learning_rate=-1.0 must be positive'),
    ('learning_rate', 0.0, 'must be positive'),
    ('momentum', 1.0, r'momentum=1.0 must be in \[0, 1\)'),
    ('weight_decay', -1e-4, 'weight_decay=-0.0001 must be 0 or more'),
    ('label_smoothing', 1.0, r'label_smoothing=1.0 must be in \[0, 1\)'),
    ('dtype', 'int8', "dtype='int8' must be one of float32, bfloat16, float16"),
    ('schedule', 'linear', "schedule='linear' must be one of constant, cosine, step"),
    ('lr_boundaries', (20, 10), 'lr_boundaries=.* must be increasing'),
    ('keep_checkpoints', 0, 'keep_checkpoints=0 must be positive'),
    # Non-finite values pass a comparison such as > 0: refused everywhere.
    ('learning_rate', float('inf'), 'learning_rate=inf must be finite'),
    ('weight_decay', float('inf'), 'weight_decay=inf must be finite'),
    ('momentum', float('nan'), 'momentum=nan must be finite'),
    ('lr_boundaries', (10, float('inf')), 'lr_boundaries=.* must be finite'),
    ('seed', 99999999999999, 'seed=99999999999999 must be an integer from 0 to 4294967295'),
    ('seed', -1, 'seed=-1 must be an integer from 0'),
    ('dataset', '', "dataset='' must not be empty"),
    ('eval_split', '', "eval_split='' must not be empty"),
    ('train_split', 'train[:0]', r"Split 'train\[:0\]' of dataset 'digits' cannot be read "
                                 r"\(.*\)\. Its splits: 'train' \(1437 examples\), 'test'"),
    ('eval_split', 'tset', r"Split 'tset' of dataset 'digits' cannot be read"),
    ('eval_batch_size', 1000000, r"eval_batch_size=1000000 is larger than the eval split "
                                 r"'test' \(360 examples\); use at most eval_batch_size=360"),
    ('optimizer', 'adam', "optimizer='adam' must be one of sgd, lars, lamb, adamw"),
    ('adam_beta2', 1.0, r'adam_beta2=1.0 must be in \[0, 1\)'),
])
def test_impossible_values_are_refused_before_training(tmp_path, key, value, message):
  with pytest.raises(UserError, match=message):
    train_and_evaluate(tiny_digits_config(**{key: value}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_eval_batch_is_at_most_the_eval_split_rounded_up_to_the_devices():
  config = tiny_digits_config(eval_batch_size=16)
  check_eval_batch_size(config, eval_examples=10, num_devices=8)  # 2 per device
  config.eval_batch_size = 24
  with pytest.raises(UserError, match=r'\(10 examples\); use at most eval_batch_size=16'):
    check_eval_batch_size(config, eval_examples=10, num_devices=8)


def test_unwritable_workdir_is_one_message(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(UserError, match='Cannot write to workdir .*pass a writable --workdir'):
    train_and_evaluate(tiny_digits_config(), str(tmp_path / 'file' / 'run'))


def _train_py(*args):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=HANG_S)


@pytest.mark.cli
@pytest.mark.parametrize('args, message', [
    (['--config.learnig_rate=0.1'], 'learnig_rate (did you mean learning_rate'),
    (['--config', 'configs/synthetic.py', '--config.momentun=0'], 'did you mean momentum'),
    (['--config.model_overrides.remats=True'],
     "'remats' is no create_model option (did you mean remat?)"),
    (['--config.learning_rate=fast'], "could not convert string to float: 'fast'"),
    (['--config.dataset='], "config.dataset='' must not be empty"),
    (['--workdir', ''], '--workdir is empty'),  # it trained in ./workdirs/default
    (['--jax_cache_dir', __file__], 'cannot be made a folder (it is a file)'),  # JAX warned
])
def test_train_py_bad_key_or_type_is_one_message(args, message):
  result = _train_py('--workdir', '/nonexistent/never/written', *args)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr and message in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


@pytest.mark.cli
@pytest.mark.parametrize('text, message', [
    (None, 'Error: cannot load --config {path}: [Errno 2] No such file or directory'),
    ('def get_config(:\n', 'Error: the --config file does not parse:\n  File "{path}", line 1'),
    ('x = 1\n', 'Error: --config {path} defines no get_config().'),
    ('def get_config():\n  return 3\n',
     'Error: get_config() of --config {path} returned int, not an ml_collections.ConfigDict.'),
])
def test_a_config_file_that_gives_no_config_is_one_message(tmp_path, text, message):
  """Before: tracebacks (a missing file's only when the config was first read)."""
  path = tmp_path / 'config.py'
  if text is not None:
    path.write_text(text)
  result = _train_py('--config', str(path), '--workdir', str(tmp_path / 'run'))
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr and message.format(path=path) in result.stderr, (
      result.stderr)
  assert not (tmp_path / 'run').exists()


# --- Every --config.KEY=VALUE the README shows ---------------------------------------------

def _readme_commands():
  """(config file, [--config.KEY=VALUE, ...]) for each train.py command of the README and
  each override its prose names (against the default config)."""
  text = (REPO / 'README.md').read_text()
  blocks = re.findall(r'```bash\n(.*?)```', text, re.S)
  commands = []
  for block in blocks:
    for command in block.replace('\\\n', ' ').splitlines():
      if 'train.py' in command:
        config = re.search(r'--config (\S+)', command)
        commands.append((config.group(1) if config else 'configs/default.py',
                         re.findall(r'--config\.[a-z_.]+=\S+', command)))
  prose = re.sub(r'```.*?```', '', text, flags=re.S)
  commands += [('configs/default.py', [override])
               for override in re.findall(r'--config\.[a-z_.]+=[^\s`]+', prose)]
  return commands


def _parse(config_file, overrides):
  """The config train.py would build from these command-line arguments."""
  argv = ['train.py', f'--config={REPO / config_file}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


README_COMMANDS = _readme_commands()
# Overrides that the default digits config runs in seconds: those run to completion.
QUICK = {'skip_nonfinite_steps', 'bn_group_size', 'num_train_steps', 'dtype'}


def test_readme_shows_config_overrides():
  assert len([o for _, overrides in README_COMMANDS for o in overrides]) >= 10


def _runs(config_file, overrides):
  keys = {o.split('=')[0][len('--config.'):] for o in overrides}
  return config_file == 'configs/default.py' and keys <= QUICK


@pytest.mark.parametrize('config_file, overrides', [
    pytest.param(file, overrides, id=' '.join(overrides),
                 marks=pytest.mark.slow if _runs(file, overrides) else ())  # trains: seconds
    for file, overrides in README_COMMANDS])
def test_readme_config_overrides_parse_validate_and_quick_ones_run(tmp_path, config_file,
                                                                   overrides):
  config = _parse(config_file, overrides)
  check_config(config, num_devices=1)
  if _runs(config_file, overrides):
    keys = {o.split('=')[0][len('--config.'):] for o in overrides}
    quick = tiny_digits_config(**{k: config[k] for k in keys})
    quick.num_train_steps = min(config.num_train_steps, 4)
    results = train_and_evaluate(quick, str(tmp_path))
    assert 0 <= results['top1'] <= 1


# --- config.model_overrides: every create_model option, from the command line -------------

@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_create_model_option_is_a_model_override_that_is_off_until_set(name):
  config = load_config(name)
  assert set(config.model_overrides.keys()) == {*MODEL_OPTIONS, 'memory_saving'}
  set_ = {k: v for k, v in config.model_overrides.items() if v is not None}
  spec = run_dir.model_config_of_run(config, 10, 3)
  assert {k: spec[k] for k in set_} == set_ and None not in spec.values(), spec


@pytest.mark.parametrize('overrides, message', [
    (dict(stem='foo'), "with config.model_overrides: stem must be one of .* got 'foo'"),
    (dict(stage_widths=[8, 16]), r'a width for each stage; got stage_sizes=\(3, 3, 3\)'),
])
def test_impossible_model_overrides_are_one_message(overrides, message):
  """Before: 'Images of 8x8 ... are too small' for an unknown stem, a traceback for
  widths that do not fit the stages."""
  spec = dict(name='cifar_resnet20', num_classes=10, in_channels=1, **overrides)
  with pytest.raises(UserError, match=message):
    build.create_model_checked(spec, image_size=8)


def test_model_overrides_from_the_command_line_reach_the_model():
  config = _parse('configs/default.py', ['--config.model_overrides.remat=True',
                                         '--config.model_overrides.stage_sizes=(1, 2, 1)',
                                         '--config.model_overrides.bn_momentum=0.5'])
  check_config(config, num_devices=1)
  model = run_dir.model_from_config(run_dir.model_config_of_run(config, 10, 3))
  assert (model.remat, model.stage_sizes, model.bn_momentum) == (True, (1, 2, 1), 0.5)
  assert not model.scan_blocks  # not set: the zoo's value


@pytest.mark.parametrize('overrides, message', [
    ({'remats': True}, "no option 'remats' \\(did you mean remat\\?\\). Valid options.*scan_blocks"),
    ({'remat': 'yes'}, "model_overrides.remat='yes' must be a bool"),
    ({'stage_sizes': 3}, 'must be a tuple'),
])
def test_model_overrides_names_and_types_are_checked(overrides, message):
  config = load_config('default')
  config.model_overrides = overrides
  with pytest.raises(UserError, match=message):
    check_config(config, num_devices=1)
  with pytest.raises(UserError, match=message):
    model_overrides(**overrides)


def test_planner_advice_is_flags_that_parse():
  config = load_config('default')
  text = plan.advice(config, None)
  flags_given = re.findall(r'--config\.[a-z_.]+=[^\s`]+', text)
  for saving in ('elementwise', 'full', 'auto'):
    assert f'--config.model_overrides.memory_saving={saving}' in flags_given, text
  for flag in flags_given:
    if '=N' not in flag:
      check_config(_parse('configs/default.py', [flag]), num_devices=1)
  parsed = _parse('configs/default.py', ['--config.model_overrides.memory_saving=full',
                                         '--config.dtype=bfloat16'])
  assert 'memory_saving' not in plan.advice(parsed, None)  # what is set is not advised again
  assert 'dtype' not in plan.advice(parsed, None)
