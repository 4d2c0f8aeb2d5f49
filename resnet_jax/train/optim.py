"""Learning-rate schedules and the optimizers of the ResNet recipes.

`optimizer`: 'sgd' (torch.optim.SGD with coupled L2 weight decay, the 2015 recipe),
'lars' (MLPerf's large-batch LARS), 'lamb' (timm's Lamb, the "ResNet strikes back"
recipes) or 'adamw' (torch.optim.AdamW). Each is a chain of optax transformations; where
optax's own alias differs from the reference (optax.lars normalizes by |g + wd w|, MLPerf
by |g| + wd |w|; optax.lamb adapts the norms and biases that timm leaves alone), the
difference is one transformation here.
"""

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from resnet_jax.errors import UserError

SCHEDULES = ('constant', 'cosine', 'step', 'polynomial')
OPTIMIZERS = ('sgd', 'lars', 'lamb', 'adamw')


def num_train_steps(config, steps_per_epoch: int) -> int:
  """`num_train_steps` if positive, else `num_epochs` epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  if config.num_epochs <= 0:
    raise UserError('Set config.num_train_steps or config.num_epochs to a positive number.')
  return int(config.num_epochs * steps_per_epoch)


def warmup_steps(config, steps_per_epoch: int) -> int:
  """`warmup_steps`, or `warmup_epochs` epochs of steps when it is 0."""
  return config.warmup_steps or int(config.warmup_epochs * steps_per_epoch)


def base_learning_rate(config) -> float:
  """`learning_rate`, scaled linearly by batch_size / learning_rate_batch_base if set."""
  base = config.learning_rate_batch_base
  return config.learning_rate * (config.batch_size / base if base else 1.0)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then constant, cosine, multistep or polynomial decay.

  'step' multiplies the rate by `lr_decay_factor` at each of `lr_boundaries` (steps),
  the paper's CIFAR schedule; 'cosine' decays to `end_learning_rate`; 'polynomial' is
  MLPerf's (lr - end) * (1 - t / T)^power + end over the T steps after warmup. Warmup
  counts in `warmup_steps` or `warmup_epochs`.
  """
  lr = base_learning_rate(config)
  if config.schedule in ('cosine', 'polynomial') and config.end_learning_rate > lr:
    raise UserError(f'config.end_learning_rate={config.end_learning_rate} is above the '
                    f'learning rate ({lr}) that schedule={config.schedule!r} decays from.')
  total = num_train_steps(config, steps_per_epoch)
  warmup = warmup_steps(config, steps_per_epoch)
  decay_steps = max(1, total - warmup)
  if config.schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.end_learning_rate / lr)
  elif config.schedule == 'step':
    main = optax.piecewise_constant_schedule(
        lr, {int(b) - warmup: config.lr_decay_factor for b in config.lr_boundaries})
  elif config.schedule == 'polynomial':
    main = optax.polynomial_schedule(lr, config.end_learning_rate, config.polynomial_power,
                                     decay_steps)
  else:
    raise UserError(f'config.schedule={config.schedule!r}; choose one of {SCHEDULES}.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _norm_and_bias_kinds(params) -> dict:
  """{flat path: 'norm', 'bias' or 'weight'}: a BatchNorm's scale and bias are 'norm' (a
  `scale` beside them tells a norm's bias from the head's), other biases 'bias'."""
  flat = traverse_util.flatten_dict(params)
  kinds = {}
  for path in flat:
    if path[-1] == 'scale' or (path[-1] == 'bias' and path[:-1] + ('scale',) in flat):
      kinds[path] = 'norm'
    else:
      kinds[path] = 'bias' if path[-1] == 'bias' else 'weight'
  return kinds


def decay_mask(params, exclude_bn_and_bias: bool, exclude_norm: bool = False):
  """True for the parameters that weight decay applies to: all, all but the BatchNorm
  scales and biases (`exclude_norm`, torchvision's `norm_weight_decay=0`), or only the
  kernels of convolutions and of the head (`exclude_bn_and_bias`, timm's and MLPerf's).
  By name, so the stacked parameters of scanned blocks too."""
  kinds = _norm_and_bias_kinds(params)
  excluded = ({'norm', 'bias'} if exclude_bn_and_bias else set()) | (
      {'norm'} if exclude_norm else set())
  return traverse_util.unflatten_dict({p: k not in excluded for p, k in kinds.items()})


def scale_by_mlperf_lars(weight_decay: float, eta: float = 0.001,
                         eps: float = 0.0) -> optax.GradientTransformation:
  """MLPerf's LARS step direction: trust * (g + wd * w) with
  trust = eta * |w| / (|g| + wd * |w| + eps), and 1 where |w| or |g| is 0.

  (MLPerf's reference `LARSOptimizer.compute_lr`; optax.lars divides by |g + wd * w|.)
  """

  def update_fn(updates, state, params):
    def scale(g, w):
      w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
      trust = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
      trust = jnp.where((w_norm > 0) & (g_norm > 0), trust, 1.0)
      return (g + weight_decay * w) * trust.astype(g.dtype)
    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _sgd(config, learning_rate_fn, mask):
  """SGD with (Nesterov) momentum and coupled L2 weight decay, as torch.optim.SGD does it."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov))


def _lars(config, learning_rate_fn, mask):
  """MLPerf's LARS: the parameters of `mask` (weights: not BatchNorm, not biases) get
  `scale_by_mlperf_lars`; the rest plain momentum SGD without weight decay. Then
  v = momentum * v + lr * update and w -= v (TensorFlow's ApplyMomentum)."""
  return optax.chain(
      optax.masked(scale_by_mlperf_lars(config.weight_decay, config.lars_eta,
                                        config.lars_eps), mask),
      optax.scale_by_learning_rate(learning_rate_fn),
      optax.trace(decay=config.momentum, nesterov=config.nesterov))


def _lamb(config, learning_rate_fn, mask):
  """timm's Lamb: Adam's direction, plus weight decay added to it and the layer-wise trust
  ratio |w| / |update| for the parameters of `mask` only (timm adapts only parameters
  with weight decay, so none when weight_decay is 0; optax.lamb adapts all)."""
  adapt = (optax.masked(optax.scale_by_trust_ratio(), mask) if config.weight_decay > 0
           else optax.identity())
  return optax.chain(
      optax.scale_by_adam(config.adam_beta1, config.adam_beta2, config.adam_eps),
      optax.add_decayed_weights(config.weight_decay, mask=mask),
      adapt,
      optax.scale_by_learning_rate(learning_rate_fn))


def _adamw(config, learning_rate_fn, mask):
  """torch.optim.AdamW: Adam plus weight decay decoupled from the gradient."""
  return optax.adamw(learning_rate_fn, config.adam_beta1, config.adam_beta2,
                     config.adam_eps, weight_decay=config.weight_decay, mask=mask)


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer over all parameters, after clipping the gradients' global norm to
  `grad_clip_norm` when it is positive (timm's Lamb clips at 1.0 inside the optimizer).

  Weight decay skips what `weight_decay_exclude_bn_and_bias` and
  `weight_decay_exclude_norm` say; LARS never adapts nor decays BatchNorm parameters
  and biases, as MLPerf's reference skips them.
  """
  exclude = dict(exclude_bn_and_bias=config.weight_decay_exclude_bn_and_bias,
                 exclude_norm=config.weight_decay_exclude_norm)
  if config.optimizer == 'lars':
    exclude = dict(exclude_bn_and_bias=True)
  mask = lambda params: decay_mask(params, **exclude)  # noqa: E731
  build = {'sgd': _sgd, 'lars': _lars, 'lamb': _lamb, 'adamw': _adamw}.get(config.optimizer)
  if build is None:
    raise UserError(f'config.optimizer={config.optimizer!r}; choose one of {OPTIMIZERS}.')
  tx = build(config, learning_rate_fn, mask)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
