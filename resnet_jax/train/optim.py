"""Learning-rate schedules and the SGD optimizer of the ResNet recipes."""

import jax
import optax

from resnet_jax.errors import UserError

SCHEDULES = ('constant', 'cosine', 'step')


def num_train_steps(config, steps_per_epoch: int) -> int:
  """`num_train_steps` if positive, else `num_epochs` epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  if config.num_epochs <= 0:
    raise UserError('Set config.num_train_steps or config.num_epochs to a positive number.')
  return int(config.num_epochs * steps_per_epoch)


def base_learning_rate(config) -> float:
  """`learning_rate`, scaled linearly by batch_size / learning_rate_batch_base if set."""
  base = config.learning_rate_batch_base
  return config.learning_rate * (config.batch_size / base if base else 1.0)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then constant, cosine to 0, or multistep decay.

  'step' multiplies the rate by `lr_decay_factor` at each of `lr_boundaries` (steps),
  the paper's CIFAR schedule; warmup counts in `warmup_steps` or `warmup_epochs`.
  """
  lr = base_learning_rate(config)
  total = num_train_steps(config, steps_per_epoch)
  warmup = config.warmup_steps or int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif config.schedule == 'step':
    main = optax.piecewise_constant_schedule(
        lr, {int(b) - warmup: config.lr_decay_factor for b in config.lr_boundaries})
  else:
    raise UserError(f'config.schedule={config.schedule!r}; choose one of {SCHEDULES}.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params, exclude_bn_and_bias: bool):
  """True for the parameters that weight decay applies to: all, or only the kernels of
  convolutions and of the head (by name, so stacked parameters of scanned blocks too)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not exclude_bn_and_bias or path[-1].key == 'kernel', params)


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled L2 weight decay, as torch.optim.SGD does it."""
  exclude = config.weight_decay_exclude_bn_and_bias
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay,
                                mask=lambda params: decay_mask(params, exclude)),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
  )
