"""The optimizers and schedules of resnet_jax.train.optim against their references:
MLPerf's LARS (a NumPy transcription of its TensorFlow update), timm's Lamb and
torch.optim.AdamW, on the same gradients for a few steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import load_config
from flax import traverse_util

from resnet_jax.errors import UserError
from resnet_jax.train import optim

STEPS = 4


def _params_and_grads():
  """A conv kernel, a BatchNorm's scale and bias, the head's kernel and bias, and
  STEPS gradients for them (one leaf with a zero gradient at step 1)."""
  rng = np.random.default_rng(0)
  shapes = {('conv1', 'kernel'): (3, 3, 2, 4), ('bn1', 'scale'): (4,), ('bn1', 'bias'): (4,),
            ('fc', 'kernel'): (4, 3), ('fc', 'bias'): (3,)}
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}
           for _ in range(STEPS)]
  grads[1][('fc', 'kernel')][:] = 0
  return params, grads


def _config(**overrides):
  config = load_config('default')
  config.update({**dict(schedule='constant', warmup_steps=0, learning_rate=0.1,
                        weight_decay=0.05, nesterov=False), **overrides})
  return config


def _run_optax(config, params, grads, learning_rate_fn):
  tx = optim.create_optimizer(config, learning_rate_fn)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()})
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
  for g in grads:
    params, state = step(params, state, traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in g.items()}))
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _apply(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _schedule(t):
  return 0.1 * (1 + t) / (2 + t)  # changes every step, to catch where the rate enters


def mlperf_lars(params, grads, lr_fn, momentum, weight_decay, eta, eps=0.0):
  """MLPerf's reference LARSOptimizer (TensorFlow), transcribed: skip_list keeps
  BatchNorm and bias variables out of the trust ratio and the weight decay; the others
  use lr * eta * |w| / (|g| + wd |w| + eps) on g + wd w; then ApplyMomentum with rate 1:
  accum = momentum * accum + scaled_grad, w -= accum."""
  w = {k: v.astype(np.float64) for k, v in params.items()}
  accum = {k: np.zeros_like(v) for k, v in w.items()}
  for t, g in enumerate(grads):
    for k in w:
      grad, scaled_lr = g[k].astype(np.float64), lr_fn(t)
      if not (k[0].startswith('bn') or k[-1] == 'bias'):
        w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(grad)
        trust = (eta * w_norm / (g_norm + weight_decay * w_norm + eps)
                 if w_norm > 0 and g_norm > 0 else 1.0)
        scaled_lr = scaled_lr * trust
        grad = grad + weight_decay * w[k]
      accum[k] = momentum * accum[k] + grad * scaled_lr
      w[k] = w[k] - accum[k]
  return w


def test_lars_matches_mlperfs_reference_update():
  params, grads = _params_and_grads()
  config = _config(optimizer='lars', momentum=0.9, lars_eta=0.001)
  got = _run_optax(config, params, grads, _schedule)
  expected = mlperf_lars(params, grads, _schedule, 0.9, 0.05, 0.001)
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=2e-6, atol=1e-7, err_msg=str(k))
  # optax.lars itself normalizes by |g + wd w|: the reference is not what it computes.
  stock = optax.lars(_schedule, weight_decay=0.05, trust_coefficient=0.001, momentum=0.9)
  assert not np.allclose(_run_tx(stock, params, grads)[('conv1', 'kernel')],
                         expected[('conv1', 'kernel')], rtol=1e-4)


def _run_tx(tx, params, grads):
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()})
  state = tx.init(params)
  for g in grads:
    params, state = _apply(tx, params, state, traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in g.items()}))
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _run_torch(make_optimizer, params, grads, lr_fn, is_decayed=lambda k: k[-1] == 'kernel'):
  """Runs a torch optimizer over the same gradients; make_optimizer(decayed, not_decayed)
  gets the parameters split by `is_decayed` (by default as timm's and torchvision's param
  groups split them: weight decay on kernels only)."""
  tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  decayed = [t for k, t in tensors.items() if is_decayed(k)]
  others = [t for k, t in tensors.items() if not is_decayed(k)]
  optimizer = make_optimizer(decayed, others)
  for t, g in enumerate(grads):
    for k, tensor in tensors.items():
      tensor.grad = torch.tensor(g[k])
    for group in optimizer.param_groups:
      group['lr'] = lr_fn(t)
    optimizer.step()
  return {k: v.detach().numpy() for k, v in tensors.items()}


def test_lamb_matches_timms_lamb():
  from timm.optim import Lamb  # pylint: disable=g-import-not-at-top
  params, grads = _params_and_grads()
  for g in grads:  # large enough that the global-norm clipping at 1.0 acts
    g[('conv1', 'kernel')] *= 4
  config = _config(optimizer='lamb', adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-6,
                   grad_clip_norm=1.0, weight_decay_exclude_bn_and_bias=True)
  got = _run_optax(config, params, grads, _schedule)
  expected = _run_torch(lambda decayed, others: Lamb(
      [{'params': decayed, 'weight_decay': 0.05}, {'params': others, 'weight_decay': 0.0}],
      lr=0.1, betas=(0.9, 0.99), eps=1e-6, max_grad_norm=1.0), params, grads, _schedule)
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_adamw_matches_torch_adamw():
  params, grads = _params_and_grads()
  config = _config(optimizer='adamw', adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-8,
                   weight_decay_exclude_bn_and_bias=True)
  got = _run_optax(config, params, grads, _schedule)
  expected = _run_torch(lambda decayed, others: torch.optim.AdamW(
      [{'params': decayed, 'weight_decay': 0.05}, {'params': others, 'weight_decay': 0.0}],
      lr=0.1, betas=(0.8, 0.99), eps=1e-8), params, grads, _schedule)
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_sgd_with_norm_weight_decay_off_matches_torchvisions_param_groups():
  """torchvision's V2 recipe: weight decay on everything but the BatchNorm parameters
  (`norm_weight_decay=0`), so the head's bias is still decayed."""
  params, grads = _params_and_grads()
  config = _config(optimizer='sgd', momentum=0.9, nesterov=True,
                   weight_decay_exclude_norm=True)
  got = _run_optax(config, params, grads, _schedule)
  expected = _run_torch(lambda rest, norms: torch.optim.SGD(
      [{'params': rest, 'weight_decay': 0.05}, {'params': norms, 'weight_decay': 0.0}],
      lr=0.1, momentum=0.9, nesterov=True), params, grads, _schedule,
                        is_decayed=lambda k: k[0] != 'bn1')
  for k in params:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_polynomial_schedule_is_mlperfs():
  """MLPerf's: linear warmup, then (lr - end) * (1 - t / T)^2 + end over the rest."""
  config = _config(schedule='polynomial', learning_rate=10.0, end_learning_rate=1e-4,
                   polynomial_power=2.0, warmup_steps=0, warmup_epochs=2.0,
                   num_train_steps=-1, num_epochs=10)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=100)
  steps = np.array([0, 100, 200, 450, 700, 999, 1000])
  warm = 10.0 * np.minimum(steps, 200) / 200
  decay = (10.0 - 1e-4) * (1 - (steps - 200) / 800) ** 2 + 1e-4
  expected = np.where(steps < 200, warm, decay)
  np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-5, atol=1e-7)


def test_end_learning_rate_above_the_rate_is_refused():
  config = _config(schedule='cosine', learning_rate=0.1, end_learning_rate=0.5)
  with pytest.raises(UserError, match='end_learning_rate=0.5 is above'):
    optim.create_learning_rate_fn(config, steps_per_epoch=10)
