"""The weight EMA (resnet_jax.train.ema) against torchvision's ExponentialMovingAverage
(an AveragedModel with use_buffers=True) driven as its reference train.py drives it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_digits_config

from resnet_jax.train import ema

STEPS_PER_EPOCH, EVERY, EPOCHS, WARMUP_EPOCHS = 5, 2, 4, 1


def _model_states(count):
  """The weights and BN statistics after each of `count` training steps."""
  rng = np.random.default_rng(0)
  states, current = [], {'weight': rng.standard_normal((4, 3, 3, 3)),
                         'bias': rng.standard_normal(4), 'running_mean': rng.standard_normal(4),
                         'running_var': rng.uniform(0.5, 2, 4)}
  for _ in range(count):
    current = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in current.items()}
    states.append(current)
  return states


def _torchvision_ema(initial, states, decay):
  """torchvision's ExponentialMovingAverage and its train.py loop, transcribed."""
  model = torch.nn.BatchNorm2d(4)  # weight, bias; buffers running_mean, running_var
  model.weight = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))  # a conv-shaped weight

  def load(values):
    with torch.no_grad():
      for name, value in values.items():
        getattr(model, name).copy_(torch.from_numpy(value))

  load(initial)

  def ema_avg(avg_model_param, model_param, num_averaged):
    return decay * avg_model_param + (1 - decay) * model_param

  model_ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=ema_avg, use_buffers=True)
  step = 0
  for epoch in range(EPOCHS):
    for i in range(STEPS_PER_EPOCH):
      load(states[step])  # the optimizer's step
      step += 1
      if i % EVERY == 0:
        model_ema.update_parameters(model)
        if epoch < WARMUP_EPOCHS:
          model_ema.n_averaged.fill_(0)
  return {k: getattr(model_ema.module, k).detach().numpy() for k in initial}


def test_ema_matches_torchvisions_over_a_run_with_warmup():
  decay = 0.7
  states = _model_states(STEPS_PER_EPOCH * EPOCHS)
  initial = {k: np.zeros_like(v) for k, v in states[0].items()}
  split = lambda s: ({'weight': s['weight'], 'bias': s['bias']},  # noqa: E731
                     {'running_mean': s['running_mean'], 'running_var': s['running_var']})
  average = ema.init(*jax.tree.map(jnp.asarray, split(initial)))
  schedule = ema.EmaSchedule(decay, EVERY, STEPS_PER_EPOCH, WARMUP_EPOCHS * STEPS_PER_EPOCH)
  update = jax.jit(functools.partial(ema.update, schedule=schedule))
  for step, state in enumerate(states):
    average = update(average, *split(state), jnp.int32(step))
  expected = _torchvision_ema(initial, states, decay)
  got = {**average['params'], **average['batch_stats']}
  for k in expected:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-6, atol=1e-6,
                               err_msg=k)
  # Not a copy of the last state: the average did move slowly.
  assert not np.allclose(np.asarray(got['weight']), states[-1]['weight'], atol=1e-3)


def test_decay_adjustment_is_torchvisions():
  """torchvision's V2 recipe: 8 GPUs x 128, --model-ema-steps 32, --model-ema-decay
  0.99998, 600 epochs: alpha = 2e-5 * 1024 * 32 / 600."""
  np.testing.assert_allclose(ema.adjusted_decay(0.99998, 1024, 32, 600),
                             1 - 2e-5 * 1024 * 32 / 600, rtol=1e-12)
  assert ema.adjusted_decay(0.9, 1024, 32, 1) == 0.0  # alpha capped at 1


@pytest.mark.slow  # trains in-process: ~30 s loaded
def test_a_run_reports_and_keeps_the_ema(tmp_path):
  from resnet_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  from helpers import read_state  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config(ema_decay=0.999, ema_every_steps=1, best_metric='eval_ema/top1')
  results = train_and_evaluate(config, str(tmp_path))
  assert 0 <= results['ema_top1'] <= 1 and 0 <= results['top1'] <= 1
  metrics = read_metrics(str(tmp_path))
  assert 'eval_ema/top1' in metrics and 'eval/top1' in metrics
  state = read_state(str(tmp_path))
  assert set(state['ema']) == {'params', 'batch_stats', 'count'}
  assert int(state['ema']['count']) == 4
