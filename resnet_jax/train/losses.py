"""The training losses on (soft) targets: softmax cross-entropy and timm's binary
cross-entropy."""

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax', 'bce')


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
  return optax.softmax_cross_entropy(logits, targets)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array,
                         target_thresh: float = 0.0) -> jax.Array:
  """Per-example mean over classes of the sigmoid cross-entropy, so that the batch mean
  is timm's `BinaryCrossEntropy` (mean over examples and classes). `target_thresh` > 0
  makes targets above it 1 and the others 0 (timm's `bce_target_thresh`)."""
  if target_thresh > 0:
    targets = (targets > target_thresh).astype(targets.dtype)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
