"""Several processes on one machine (jax.distributed over gloo on localhost): preemption,
a dead process, a stuck one, an agreed checkpoint fallback, and data that stays
exactly-once across a change of process count.

Each multi-process test starts train.py as a user would (the README's command), two
processes at a time; they share the compilation cache of the session.
"""

import collections

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

from resnet_jax.data import pipeline as pipeline_module


# --- exactly-once data across a change of process count -----------------------------------

def _global_batches(monkeypatch, count, start_step, num_steps, config):
  """Global batches start_step .. start_step+num_steps-1 as `count` processes read them:
  each process's host batches, made with a fake process index, concatenated."""
  per_process = []
  for index in range(count):
    fake = type('jax', (), {'process_index': staticmethod(lambda i=index: i),
                            'process_count': staticmethod(lambda: count)})
    monkeypatch.setattr(pipeline_module, 'jax', fake)
    stream = pipeline_module.Pipeline(config).train_batches(start_step)
    per_process.append([next(stream) for _ in range(num_steps)])
    monkeypatch.setattr(pipeline_module, 'jax', jax)
  return [{key: np.concatenate([shards[key] for shards in step]) for key in step[0]}
          for step in zip(*per_process)]


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
@pytest.mark.parametrize('preprocess', ['none', 'digits'])
def test_an_epoch_is_exactly_once_across_a_change_of_process_count(monkeypatch, before,
                                                                   after, preprocess):
  """`before` processes train 7 steps of epoch 1, `after` processes the rest of it: every
  example of the epoch is used once, and (global order, per-example seeds) each step sees
  the batch a one-process run sees, augmented alike."""
  config = tiny_digits_config(preprocess=preprocess)
  steps_per_epoch = pipeline_module.Pipeline(config).steps_per_epoch
  start, stop_at = steps_per_epoch, steps_per_epoch + 7  # epoch 1, a few steps in
  reference = _global_batches(monkeypatch, 1, start, steps_per_epoch, config)
  changed = (_global_batches(monkeypatch, before, start, stop_at - start, config) +
             _global_batches(monkeypatch, after, stop_at, steps_per_epoch - 7, config))
  used = collections.Counter(image.tobytes() for batch in changed for image in batch['image'])
  expected = collections.Counter(image.tobytes() for batch in reference
                                 for image in batch['image'])
  assert sum(used.values()) == steps_per_epoch * config.batch_size
  assert used == expected  # every example of the epoch, each once
  for a, b in zip(changed, reference):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
