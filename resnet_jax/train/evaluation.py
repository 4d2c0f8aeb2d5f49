"""Evaluation of a train state over every example of a dataset split."""

from typing import Callable

import jax
from jax.sharding import NamedSharding

from resnet_jax.train.metrics import progress_bar
from resnet_jax.train.parallel import device_batches
from resnet_jax.train.state import TrainState


def evaluate_split(eval_fn: Callable, state: TrainState, pipeline, split: str,
                   batch_size: int, sharding: NamedSharding) -> dict:
  """Loss, top-1 and top-5 over every example of `split` (padding masked out)."""
  num_batches, batches = pipeline.eval_batches(split, batch_size)
  totals = None
  with progress_bar(num_batches, desc=f'eval {split}', unit='batch') as bar:
    for batch in device_batches(batches(), sharding):
      sums = eval_fn(state, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      bar.update()
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': count}
