"""Tests of resnet_jax.train: schedules, the pure steps, and train.py end to end."""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P
from helpers import HANG_S, REPO, TINY_MODEL, load_config, subprocess_env, tiny_digits_config

import resnet_jax
from resnet_jax.errors import UserError
from resnet_jax.train import optim
from resnet_jax.train.build import merge_pretrained
from resnet_jax.train.checkpoint_format import restore_run, save_converted
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.parallel import DATA_AXIS, create_mesh, device_batches
from resnet_jax.train.metrics import read_metrics
from resnet_jax.train.state import TrainState, create_train_state
from resnet_jax.train.step import all_finite, eval_metrics, eval_step, train_step

# Golden value of the first step's loss of `_tiny_state` on `_fixed_batch`. If a deliberate
# change to the model's initialization, the loss or the step moves it, check the new value
# and update it here.
GOLDEN_FIRST_LOSS = 2.658118


def _tiny_state(learning_rate=0.1, num_classes=10):
  model = resnet_jax.create_model('cifar_resnet20', num_classes=num_classes, in_channels=1,
                                  **TINY_MODEL)
  tx = optax.sgd(learning_rate, momentum=0.9)
  init = jax.jit(lambda rng: create_train_state(model, tx, rng, (1, 8, 8, 1)))
  return init(jax.random.PRNGKey(0))


def _fixed_batch(n=16):
  rng = np.random.default_rng(0)
  return {'image': rng.standard_normal((n, 8, 8, 1)).astype(np.float32),
          'label': (np.arange(n) % 10).astype(np.int32)}


def test_step_schedule_matches_paper():
  config = load_config('cifar10_resnet20')
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=390)
  np.testing.assert_allclose([lr(0), lr(31_999), lr(32_000), lr(47_999), lr(48_000), lr(63_999)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


def test_imagenet_schedule_warms_up_then_cosine():
  config = load_config('imagenet_resnet50')
  steps_per_epoch = 1251
  lr = optim.create_learning_rate_fn(config, steps_per_epoch)
  peak, warmup = 0.1 * 1024 / 256, 5 * steps_per_epoch
  assert optim.num_train_steps(config, steps_per_epoch) == 90 * steps_per_epoch
  np.testing.assert_allclose([lr(0), lr(warmup // 2), lr(warmup)], [0, peak / 2, peak], rtol=1e-3)
  assert lr(90 * steps_per_epoch) < 1e-6


def test_weight_decay_mask_excludes_bn_and_bias():
  params = _tiny_state().params
  mask = optim.decay_mask(params, exclude_bn_and_bias=True)
  assert mask['conv1']['kernel'] and mask['fc']['kernel']
  assert not mask['bn1']['scale'] and not mask['fc']['bias']
  assert all(jax.tree.leaves(optim.decay_mask(params, exclude_bn_and_bias=False)))
  # Scanned blocks stack their parameters: a BN scale is 2-D there, and still excluded.
  model = resnet_jax.create_model('cifar_resnet20', scan_blocks=True,
                                  **{**TINY_MODEL, 'stage_sizes': (2, 2, 2)})
  scanned = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  flat = flax.traverse_util.flatten_dict(
      optim.decay_mask(scanned['params'], exclude_bn_and_bias=True), sep='/')
  stacked = [k for k, v in flax.traverse_util.flatten_dict(scanned['params'], sep='/').items()
             if v.ndim == 2 and k.endswith('scale')]
  assert stacked and not any(flat[k] for k in stacked)
  assert all(v == k.endswith('kernel') for k, v in flat.items())


def test_eval_metrics_count_top_k_and_mask():
  logits = jnp.array([[5., 4, 3, 2, 1, 0], [0., 1, 2, 3, 4, 5], [1., 1, 1, 1, 1, 1]])
  labels = jnp.array([0, 0, 2])
  sums = eval_metrics(logits, labels, jnp.array([1., 1., 0.]))
  assert (float(sums['top1']), float(sums['top5']), float(sums['count'])) == (1, 1, 2)


def test_first_step_loss_is_golden():
  _, metrics = jax.jit(train_step)(_tiny_state(), _fixed_batch())
  np.testing.assert_allclose(float(metrics['loss']), GOLDEN_FIRST_LOSS, atol=2e-4, err_msg=(
      'The first training step\'s loss moved. If the model init, loss or step changed on '
      'purpose, update GOLDEN_FIRST_LOSS.'))


def test_steps_normalize_uint8_pixels_like_the_host_would():
  """The pipelines' uint8 pixels, normalized in the step, train and evaluate exactly as
  the same pixels normalized beforehand."""
  rng = np.random.default_rng(1)
  pixels = {'image': rng.integers(0, 256, (16, 8, 8, 1), np.uint8),
            'label': (np.arange(16) % 10).astype(np.int32), 'mask': np.ones(16, np.float32)}
  floats = dict(pixels, image=(pixels['image'] / np.float32(255) - 0.3) / 0.4)  # 'digits'
  state = _tiny_state()
  _, on_device = jax.jit(functools.partial(train_step, normalization='digits'))(state, pixels)
  _, on_host = jax.jit(train_step)(state, floats)
  eval_on_device = jax.jit(functools.partial(eval_step, normalization='digits'))(state, pixels)
  eval_on_host = jax.jit(eval_step)(state, floats)
  for got, expected in ((on_device, on_host), (eval_on_device, eval_on_host)):
    np.testing.assert_allclose(float(got['loss']), float(expected['loss']), rtol=1e-5)


def test_loss_falls_when_overfitting_a_fixed_batch():
  state, batch = _tiny_state(learning_rate=0.05), _fixed_batch()
  step = jax.jit(train_step)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.3 * losses[0], losses
  assert int(state.step) == 30


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 'opposite infinities'])
def test_all_finite_sees_any_nan_or_infinity(bad):
  tree = {'a': np.full((3, 4), 1e30, np.float32), 'b': [np.zeros(5, jnp.bfloat16)]}
  assert bool(all_finite(tree))
  if bad == 'opposite infinities':
    tree['a'][0, 0], tree['a'][2, 3] = np.inf, -np.inf
  else:
    tree['a'][1, 2] = bad
  assert not bool(all_finite(tree))


def test_step_with_a_finite_loss_but_infinite_gradients_is_not_finite():
  def apply_fn(variables, images, train, mutable):  # sqrt at 0: finite, infinite slope
    logits = jnp.sqrt(variables['params']['w']) + jnp.zeros((images.shape[0], 10))
    return logits, {'batch_stats': {}}
  state = TrainState.create(apply_fn=apply_fn, params={'w': jnp.zeros(10)},
                            tx=optax.sgd(0.1), batch_stats={})
  new_state, metrics = jax.jit(functools.partial(train_step, skip_nonfinite=True))(
      state, _fixed_batch())
  assert np.isfinite(float(metrics['loss'])) and not bool(metrics['finite'])
  assert int(new_state.step) == 0 and np.all(np.asarray(new_state.params['w']) == 0)


def test_device_batches_copy_ahead_in_order():
  pulled = []

  def host_batches():
    for i in range(5):
      pulled.append(i)
      yield {'image': np.full((8, 2), i, np.uint8)}

  mesh = create_mesh()
  stream = device_batches(host_batches(), NamedSharding(mesh, P(DATA_AXIS)), ahead=2)
  first = next(stream)
  assert isinstance(first['image'], jax.Array) and len(pulled) == 3  # two copies ahead
  rest = [int(b['image'][0, 0]) for b in stream]
  assert [int(first['image'][0, 0])] + rest == [0, 1, 2, 3, 4]


def test_merge_pretrained_reinitializes_a_head_of_another_size():
  pretrained = _tiny_state(num_classes=10)
  fresh = _tiny_state(num_classes=5)
  loaded = {'params': pretrained.params, 'batch_stats': pretrained.batch_stats}
  merged = merge_pretrained({'params': fresh.params, 'batch_stats': fresh.batch_stats},
                            jax.device_get(loaded), scan=False)
  np.testing.assert_array_equal(merged['params']['conv1']['kernel'],
                                pretrained.params['conv1']['kernel'])
  assert merged['params']['fc']['kernel'].shape == (16, 5)
  with pytest.raises(UserError, match='does not fit'):
    del loaded['params']['layer1']
    merge_pretrained({'params': fresh.params, 'batch_stats': fresh.batch_stats}, loaded, False)


def test_digits_run_writes_the_workdir_contract(trained_workdir):
  workdir, results = trained_workdir
  assert results['count'] == 360
  with open(os.path.join(workdir, 'model.json')) as f:
    spec = json.load(f)
  assert spec['name'] == 'cifar_resnet20' and spec['num_classes'] == 10
  assert spec['in_channels'] == 1
  for name in ('config.json', 'metrics.jsonl', 'curves.png'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  model, variables = resnet_jax.load_model(workdir)  # the conversion engineer's loader
  assert variables['params']['fc']['kernel'].shape == (16, 10)


def test_resumed_run_matches_uninterrupted_run(tmp_path, trained_workdir):
  workdir, uninterrupted = trained_workdir  # 4 steps
  train_and_evaluate(tiny_digits_config(num_train_steps=3), str(tmp_path))
  resumed = train_and_evaluate(tiny_digits_config(), str(tmp_path))
  a, b = resnet_jax.load_variables(workdir), resnet_jax.load_variables(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed == uninterrupted
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '4']


def test_a_finished_run_says_there_is_nothing_to_train(tmp_path, trained_workdir, capsys):
  """Before: 'Training ... 4 steps', then nothing, whether the run had all its steps (a
  requeued job) or more than the config asks."""
  workdir = shutil.copytree(trained_workdir[0], tmp_path / 'run')  # 4 steps
  metrics, saved = (workdir / 'metrics.jsonl').read_text(), os.listdir(workdir / 'checkpoints')
  for steps, words in [(4, 'has trained all 4 steps'), (2, "is past the config's 2 steps")]:
    assert train_and_evaluate(tiny_digits_config(num_train_steps=steps), str(workdir)) == {}
    out = capsys.readouterr().out
    assert f'Nothing to train: the run in {workdir} is at step 4 and {words}.' in out, out
    assert 'Training' not in out, out
  assert (workdir / 'metrics.jsonl').read_text() == metrics
  assert os.listdir(workdir / 'checkpoints') == saved


@pytest.mark.parametrize('dataset, preprocess', [('cifar10', 'cifar'),
                                                 ('imagenet2012', 'imagenet')])
def test_trains_on_mock_tfds_data(tmp_path, dataset, preprocess):
  config = tiny_digits_config(dataset=dataset, preprocess=preprocess, image_size=32,
                              batch_size=8, eval_batch_size=8, num_train_steps=2,
                              eval_every_steps=2)
  with tfds.testing.mock_data(num_examples=20):
    results = train_and_evaluate(config, str(tmp_path))
  assert results['count'] == 20
  with open(tmp_path / 'model.json') as f:
    assert json.load(f)['num_classes'] == (10 if dataset == 'cifar10' else 1000)


def _run(args, devices=1, timeout=HANG_S):
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _eval_metrics(workdir):
  return {key: values[-1][-1] for key, values in read_metrics(workdir).items()
          if key.startswith('eval/')}


@pytest.mark.slow
def test_train_py_on_four_devices_matches_one_device(tmp_path, trained_workdir, config_file):
  """The README command, run on 4 simulated CPU devices, against the in-process run."""
  out = _run(['train.py', '--config', config_file, '--workdir', str(tmp_path / 'run'),
              '--jax_cache_dir', ''], devices=4)
  assert 'step 4/4' in out and 'on 4 device(s)' in out and 'top-1' in out, out
  workdir, _ = trained_workdir
  single, multi = _eval_metrics(workdir), _eval_metrics(str(tmp_path / 'run'))
  assert single.keys() == multi.keys()
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # The 4-device checkpoint restores onto this 1-device process.
  (_, a), (_, b) = restore_run(workdir), restore_run(str(tmp_path / 'run'))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  # Training resumes from it here too, from the saved step.
  train_and_evaluate(tiny_digits_config(num_train_steps=5), str(tmp_path / 'run'))
  assert read_metrics(str(tmp_path / 'run'))['train/loss'][0][-1] == 5


def test_init_from_a_trained_run(tmp_path, trained_workdir):
  workdir, _ = trained_workdir
  # The warmup's first step has a learning rate of 0: the parameters stay as loaded.
  config = tiny_digits_config(init_from=workdir, warmup_steps=5, weight_decay=0.0,
                              num_train_steps=1)
  train_and_evaluate(config, str(tmp_path))
  (_, start), (_, after) = restore_run(workdir), restore_run(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, start['params'], after['params'])


def test_init_from_a_run_of_another_width_is_one_message(tmp_path, trained_workdir):
  workdir, _ = trained_workdir
  config = tiny_digits_config(init_from=workdir, model_overrides={
      'stage_sizes': (1, 1, 1), 'stage_widths': (8, 8, 16)})
  with pytest.raises(UserError,
                     match=r'init_from: params/.* has shape \(4,\), the model expects \(8,\)'):
    train_and_evaluate(config, str(tmp_path))


def _tiny_resnet18_checkpoint(path):
  spec = dict(name='resnet18', num_classes=10, in_channels=1, stage_sizes=[1, 1],
              stage_widths=[4, 8])
  model = resnet_jax.create_model('resnet18', num_classes=10, in_channels=1,
                                  stage_sizes=(1, 1), stage_widths=(4, 8))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  save_converted(variables, spec, path)
  return str(path)


def test_init_from_that_does_not_fit_says_what_to_do(tmp_path):
  """Before: a .pth was 'not a resnet_jax checkpoint', a mistyped pretrained name a folder
  that 'does not exist', and another model's checkpoint a list of missing keys only."""
  (tmp_path / 'model.pth').write_bytes(b'weights')
  cases = [
      (str(tmp_path / 'model.pth'), r'a PyTorch weights file; convert it first '
                                    r'\(`python -m resnet_jax.convert --arch cifar_resnet20'),
      ('resnet18.tv_in1', r"there is no folder 'resnet18.tv_in1'\. Unknown pretrained weights "
                          r"'resnet18.tv_in1'\. Did you mean resnet18.tv_in1k"),
      (_tiny_resnet18_checkpoint(tmp_path / 'r18'),
       r'it holds a resnet18 and this run trains a cifar_resnet20: pass '
       r'--config.model=resnet18\. init_from checkpoint does not fit'),
  ]
  for value, message in cases:
    with pytest.raises(UserError, match=rf"config\.init_from='.*': {message}"):
      train_and_evaluate(tiny_digits_config(init_from=value), str(tmp_path / 'run'))


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  from resnet_jax.train import checkpoints
  manager = checkpoints.create_manager(str(tmp_path), keep=2)
  tree = {'params': {'w': np.zeros(3)}, 'step': np.array(0, np.int32)}
  for step, top1 in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, 0.7)]:
    checkpoints.save(manager, step, tree, {'batches_consumed': step}, top1)
    manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]
  restored, position = checkpoints.restore_latest_good(manager, tree, str(tmp_path))
  assert position['batches_consumed'] == 5


def test_progress_bar_is_quiet_when_not_a_terminal(capsys):
  from resnet_jax.train.metrics import log, progress_bar
  with progress_bar(3) as bar:  # pytest's captured stderr is not a terminal
    bar.update(3)
    log('a log line')
  captured = capsys.readouterr()
  assert bar.disable
  assert captured.out == 'a log line\n' and captured.err == ''
