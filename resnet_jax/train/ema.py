"""An exponential moving average of the weights and BatchNorm statistics, as torchvision's
reference recipes keep it (`ExponentialMovingAverage`, an `AveragedModel` with
`use_buffers=True`, updated every `model_ema_steps` batches of an epoch).

torchvision's decay adjustment (references/classification/train.py, after pycls):
  alpha = min(1, (1 - ema_decay) * batch_size * ema_every_steps / epochs)
  decay = 1 - alpha
with batch_size the global batch (world_size * per-device batch) and epochs the run's
length in epochs, so the average spans about the same share of the run whatever the
batch size and update period. An update at batch i of an epoch (i % ema_every_steps ==
0) sets avg = decay * avg + (1 - decay) * model, except that it copies the model when
no update has been averaged yet; during warmup every update copies (torchvision resets
`n_averaged` during its warmup epochs).
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
  """When and how strongly the average moves (static: part of the compiled step)."""
  decay: float
  every_steps: int
  steps_per_epoch: int
  warmup_steps: int = 0


def adjusted_decay(ema_decay: float, batch_size: int, every_steps: int,
                   epochs: float) -> float:
  """torchvision's adjustment of `ema_decay` (see the module docstring)."""
  alpha = min(1.0, (1.0 - ema_decay) * batch_size * every_steps / epochs)
  return 1.0 - alpha


def init(params, batch_stats) -> dict:
  """The average at step 0: a copy of the model, nothing averaged yet."""
  return {'params': params, 'batch_stats': batch_stats, 'count': jnp.zeros((), jnp.int32)}


def update(ema: dict, params, batch_stats, step: jax.Array, schedule: EmaSchedule) -> dict:
  """`ema` after training batch `step` (0-based) produced `params` and `batch_stats`."""
  due = (step % schedule.steps_per_epoch) % schedule.every_steps == 0
  copy = ema['count'] == 0
  decay = jnp.float32(schedule.decay)

  def average(avg, new):
    moved = jnp.where(copy, new, decay * avg + (1 - decay) * new).astype(avg.dtype)
    return jnp.where(due, moved, avg)

  model = {'params': params, 'batch_stats': batch_stats}
  averaged = jax.tree.map(average, {k: ema[k] for k in model}, model)
  count = jnp.where(step < schedule.warmup_steps, 0, ema['count'] + 1)
  return {**averaged, 'count': jnp.where(due, count, ema['count']).astype(jnp.int32)}
