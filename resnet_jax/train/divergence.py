"""The divergence policy: a non-finite step stops the run, or is skipped when asked."""

from typing import Sequence

from resnet_jax.errors import NonFiniteLossError
from resnet_jax.train.metrics import log


def check_finite(rows: Sequence[tuple], skip_nonfinite: bool):
  """Raises NonFiniteLossError at the first of the (step, loss, accuracy, finite) `rows`
  that was not finite, or (with `skip_nonfinite`) warns that the step was skipped: the
  step itself left the state unchanged then (`train_step(skip_nonfinite=True)`)."""
  for step, loss, _, finite in rows:
    if finite:
      continue
    if not skip_nonfinite:
      raise NonFiniteLossError(
          f'Non-finite loss ({loss}) or gradients at step {step}; stopping before any '
          f'checkpoint holds them (the last one is from an earlier step). Lower '
          f'config.learning_rate, check the data, or set config.skip_nonfinite_steps=True '
          f'to skip such steps.')
    log(f'WARNING: step {step} had a non-finite loss or gradients; skipped it.')
