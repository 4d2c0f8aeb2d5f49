"""Data parallelism over a Mesh: the mesh, global batches and the jitted train/eval steps.

The step is compiled once over a Mesh of all devices with the batch sharded along 'data'
and the state replicated, so the same code runs on one CPU, N devices and multi-host pods
(and compiles for a TPU topology that is not there: `resnet_jax.plan`).
"""

import collections
import functools
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.train.step import Recipe, eval_step, train_step

DATA_AXIS = 'data'


def create_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh along the data axis of `devices` (default: every device of every process)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The train state's sharding: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A batch's sharding: split along its first axis over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global arrays sharded along the data axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_batches(batches: Iterator[dict], sharding: NamedSharding,
                   ahead: int = 2) -> Iterator[dict]:
  """`global_batch` of each host batch, copied to the devices `ahead` batches before the
  step that takes it, so the copies overlap with the steps still running."""
  queue = collections.deque()
  for batch in batches:
    queue.append(global_batch(batch, sharding))
    if len(queue) > ahead:
      yield queue.popleft()
  yield from queue


def compile_steps(mesh: Mesh, normalization: Optional[str] = None,
                  skip_nonfinite: bool = False, recipe: Recipe = Recipe()):
  """(train_step, eval_step) jitted over `mesh`; train_step donates the old state and
  follows `recipe`.

  Both normalize uint8 pixels with the `normalization` statistics (None: images go to the
  model as they are).
  """
  state, batch = replicated(mesh), batch_sharding(mesh)
  step = functools.partial(train_step, normalization=normalization,
                           skip_nonfinite=skip_nonfinite, recipe=recipe)
  train = jax.jit(step, in_shardings=(state, batch), out_shardings=(state, state),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, normalization=normalization),
                     in_shardings=(state, batch), out_shardings=state)
  return train, evaluate
