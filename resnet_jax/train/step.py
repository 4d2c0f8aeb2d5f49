"""Pure train and eval steps, to be wrapped once in `jax.jit` by the caller.

Under `jax.jit` with the batch sharded over a data axis, BatchNorm statistics cover the
global batch (synchronized BN) and gradients are averaged over all devices by the
compiler; there is no explicit collective here.

Both steps take the pipelines' uint8 pixels and normalize them with the mean and std named
`normalization` (see `resnet_jax.data.normalization`); `normalization=None` feeds 'image'
to the model as it is.
"""

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax.data.normalization import normalize
from resnet_jax.models.drop_path import RNG_STREAM
from resnet_jax.train import ema as ema_lib
from resnet_jax.train import losses, mixing
from resnet_jax.train.state import TrainState

Batch = Dict[str, jax.Array]
# Tags of the train step's random streams, folded into its key.
DROP_PATH_STREAM, MIX_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What the train step does besides the optimizer's update, fixed when it is compiled.

  Every random choice comes from `step_key(seed, state.step)`, so a resumed run draws
  what the uninterrupted one drew.

  Attributes:
    seed: the run's seed.
    drop_path: whether the model draws drop-path masks (its `drop_path_rate` > 0).
    mixup_alpha, cutmix_alpha: Mixup / CutMix of the batch (`resnet_jax.train.mixing`);
      0 turns each off; with both on, CutMix is chosen with probability `switch_prob`.
    loss: 'softmax' (cross-entropy) or 'bce' (timm's binary cross-entropy, with
      `bce_target_thresh`); both on the smoothed (and mixed) targets.
    ema: when set, the state's weight EMA moves after each step (`ema.update`).
  """
  seed: int = 0
  drop_path: bool = False
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  switch_prob: float = 0.5
  loss: str = 'softmax'
  bce_target_thresh: float = 0.0
  ema: Optional[ema_lib.EmaSchedule] = None

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  def loss_fn(self, logits: jax.Array, labels: jax.Array, label_smoothing: float,
              lam: Optional[jax.Array] = None) -> jax.Array:
    """Per-example loss of `logits` against `labels` (mixed by `lam` when given)."""
    if self.loss == 'softmax' and lam is None:
      return cross_entropy(logits, labels, label_smoothing)  # as it always was
    targets = mixing.targets(labels, logits.shape[-1], label_smoothing, lam)
    if self.loss == 'bce':
      return losses.binary_cross_entropy(logits, targets, self.bce_target_thresh)
    return losses.softmax_cross_entropy(logits, targets)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The random key of train step `step` (the state's step before the update)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def model_input(batch: Batch, normalization: Optional[str]) -> jax.Array:
  """The batch's images as the model takes them."""
  images = batch['image']
  return images if normalization is None else normalize(images, normalization)


def train_step(state: TrainState, batch: Batch, normalization: Optional[str] = None,
               skip_nonfinite: bool = False, recipe: Recipe = Recipe()
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on {'image', 'label'}; returns the new state and
  loss/accuracy/finite.

  'finite' says whether the loss and the gradients were finite; with `skip_nonfinite`
  a step where they were not returns `state` unchanged instead of a state holding NaN.
  `recipe` adds drop path, Mixup/CutMix and the loss (see `Recipe`); accuracy counts
  the unmixed labels.
  """

  images = model_input(batch, normalization)
  key = step_key(recipe.seed, state.step)
  rngs = {RNG_STREAM: jax.random.fold_in(key, DROP_PATH_STREAM)} if recipe.drop_path else {}
  lam = None
  if recipe.mixes:
    images, lam = mixing.mix_batch(jax.random.fold_in(key, MIX_STREAM),
                                   images.astype(jnp.float32), recipe.mixup_alpha,
                                   recipe.cutmix_alpha, recipe.switch_prob)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(variables, images, train=True, mutable=['batch_stats'],
                                     **({'rngs': rngs} if rngs else {}))
    loss = recipe.loss_fn(logits, batch['label'], state.label_smoothing, lam).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if recipe.ema is not None:
    new_state = new_state.replace(ema=ema_lib.update(
        state.ema, new_state.params, new_state.batch_stats, state.step, recipe.ema))
  finite = jnp.isfinite(loss) & all_finite(grads)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return new_state, {'loss': loss, 'accuracy': accuracy, 'finite': finite}


def all_finite(tree) -> jax.Array:
  """Whether no leaf of `tree` holds a NaN or an infinity.

  One plain sum per leaf, which NaN and infinities propagate into (opposite infinities
  make NaN): fewer XLA fusions to compile than a norm or an elementwise isfinite.
  """
  return jnp.isfinite(sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(tree)))


def eval_step(state: TrainState, batch: Batch, normalization: Optional[str] = None
              ) -> Dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and example count over the masked batch."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, model_input(batch, normalization), train=False)
  return eval_metrics(logits, batch['label'], batch['mask'])


def eval_metrics(logits, labels, mask) -> Dict[str, jax.Array]:
  k = min(5, logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, labels[:, None], -1)
  # Rank of the true class; ties count against it, so a constant output is not 'correct'.
  rank = jnp.sum(logits >= label_logit, -1) - 1
  return {
      'loss': jnp.sum(cross_entropy(logits, labels) * mask),
      'top1': jnp.sum((rank < 1) * mask),
      'top5': jnp.sum((rank < k) * mask),
      'count': jnp.sum(mask),
  }
