"""Execution settings (models.resnet.EXECUTION_FIELDS) change no variable: a workdir resumes
with them changed (remat, dtype, scan_blocks) and refuses another architecture
(resnet_jax.train.run_dir, train.checkpoints)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, read_state, tiny_digits_config
from resnet_jax.errors import UserError
from resnet_jax.models.resnet import EXECUTION_FIELDS
from resnet_jax.models.scan import is_scanned, unscan_tree
from resnet_jax.models.torch_names import LAYOUT_NEUTRAL
from resnet_jax.train import run_dir
from resnet_jax.train.loop import train_and_evaluate

# Two blocks in the first stages, so that the scanned layout differs from the unrolled one.
MODEL = {'stage_sizes': (2, 2, 1), 'stage_widths': (4, 8, 16)}


def _config(steps, **model):
  return tiny_digits_config(num_train_steps=steps, eval_every_steps=0,
                            model_overrides={**MODEL, **model})


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """uninterrupted(**model): the state after 8 steps of one run with these settings,
  unrolled (a scanned model initializes its stacked blocks from other keys, so each
  layout has its own reference)."""
  states = {}

  def state(**model):
    key = tuple(sorted(model.items()))
    if key not in states:
      workdir = str(tmp_path_factory.mktemp('uninterrupted'))
      train_and_evaluate(_config(8, **model), workdir)
      states[key] = unscan_tree(read_state(workdir))
    return states[key]
  return state


def _assert_continues(workdir, reference):
  """The resumed run's last state is the uninterrupted one's up to rounding (remat and the
  BatchNorm gradient it selects reorder float32 sums)."""
  state = read_state(workdir)
  if is_scanned(state['params']):
    state = unscan_tree(state)
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               state, reference)


@pytest.mark.parametrize('before, after', [({}, {'scan_blocks': True, 'remat': True}),
                                           pytest.param({'scan_blocks': True}, {},
                                                        marks=pytest.mark.slow)])
def test_resume_with_execution_settings_changed_continues_the_run(uninterrupted, tmp_path,
                                                                  capsys, before, after):
  workdir = str(tmp_path)
  train_and_evaluate(_config(4, **before), workdir)
  assert is_scanned(read_state(workdir)['params']) == bool(before)
  capsys.readouterr()
  train_and_evaluate(_config(8, **after), workdir)
  out = capsys.readouterr().out
  assert 'at step 4' in out, out
  for key in {**before, **after}:
    line = f'changed execution setting: {key}: {bool(before)} -> {bool(after)}'
    assert line in out, out
  _assert_continues(workdir, uninterrupted(**before))


def test_resume_with_another_architecture_names_the_setting(tmp_path):
  workdir = str(tmp_path)
  train_and_evaluate(_config(2), workdir)
  with pytest.raises(UserError, match=r'another model: stage_widths=\[4, 8, 16\] there, '
                                      r'stage_widths=\[4, 8, 32\] now'):
    train_and_evaluate(tiny_digits_config(num_train_steps=4, model_overrides={
        **MODEL, 'stage_widths': (4, 8, 32)}), workdir)


def test_a_step_saved_before_scan_blocks_switched_evaluates_as_before(tmp_path):
  """evaluate --step (checkpoint_format.restore_run) reads a step saved in the other
  scan_blocks layout: same metrics and logits as before the switch."""
  from resnet_jax.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.checkpoint_format import restore_run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)

  def logits(step):
    model, variables = restore_run(workdir, step)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, model.in_channels))
    return model.scan_blocks, model.apply(variables, images, train=False)

  train_and_evaluate(_config(4), workdir)  # steps 2 and 4, unrolled
  metrics, (scanned, expected) = evaluate(workdir, step=4), logits(4)
  assert not scanned
  train_and_evaluate(_config(6, scan_blocks=True), workdir)  # step 6, scanned
  assert is_scanned(read_state(workdir, 6)['params'])
  assert not is_scanned(read_state(workdir, 4)['params'])
  again, (scanned, actual) = evaluate(workdir, step=4), logits(4)
  assert scanned
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  assert again.keys() == metrics.keys()
  for key in metrics:
    np.testing.assert_allclose(again[key], metrics[key], rtol=1e-5, err_msg=key)


@pytest.mark.cli
def test_train_py_resumes_with_remat_and_bfloat16_from_the_command_line(tmp_path):
  """The README's command: the second run turns on remat and bfloat16 by flags alone."""
  tiny = ['--config.model_overrides.stage_sizes=(1, 1, 1)',
          '--config.model_overrides.stage_widths=(4, 8, 16)', '--config.batch_size=32',
          '--config.eval_every_steps=0', '--config.checkpoint_every_steps=2']
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, 'train.py', '--workdir', str(tmp_path), *tiny, *args], cwd=REPO,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  first = run('--config.num_train_steps=2')
  assert first.returncode == 0, first.stderr
  second = run('--config.num_train_steps=4', '--config.model_overrides.remat=True',
               '--config.dtype=bfloat16')
  out = second.stdout + second.stderr
  assert second.returncode == 0, out
  assert 'at step 2' in out and 'remat: False -> True' in out, out
  assert "dtype: 'float32' -> 'bfloat16'" in out, out
  assert read_state(str(tmp_path))['step'] == 4


# A value other than the default for each execution setting.
CHANGED = {'dtype': 'bfloat16', 'bn_momentum': 0.5, 'bn_unbiased_running_var': False,
           'bn_group_size': 1, 'bn_axis_name': 'batch', 'zero_init_residual': True,
           'scan_blocks': True, 'remat': True, 'elementwise_remat': True,
           'bn_fused_gradient': False, 'drop_path_rate': 0.1}


def _variable_shapes(**overrides):
  model = run_dir.model_from_config({'name': 'resnet18', 'num_classes': 10, **MODEL,
                                     **overrides})
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, 3)), train=False))
  return jax.tree.map(lambda s: (s.shape, s.dtype),
                      unscan_tree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)))


def test_the_execution_settings_are_the_fields_that_change_no_variable():
  assert sorted(EXECUTION_FIELDS) == sorted(CHANGED)
  assert set(EXECUTION_FIELDS) <= set(LAYOUT_NEUTRAL)
  reference = _variable_shapes()
  for key, value in CHANGED.items():
    assert _variable_shapes(**{key: value}) == reference, key
  assert _variable_shapes(stage_widths=(4, 8, 32)) != reference  # the test can tell
