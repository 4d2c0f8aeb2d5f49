"""Mixup/CutMix (resnet_jax.train.mixing) and the losses (resnet_jax.train.losses)
against timm's `Mixup` and `BinaryCrossEntropy`: for the same lambda, pairing and box,
the same mixed images and targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from resnet_jax.train import losses, mixing

NUM_CLASSES = 7


def _batch(n=6, height=12, width=10):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((n, height, width, 3)).astype(np.float32),
          rng.integers(0, NUM_CLASSES, n))


def _timm_mix(monkeypatch, images, labels, choice, mixup_alpha, cutmix_alpha, smoothing):
  """timm's Mixup on NCHW copies of `images`, its numpy draws replaced by `choice`'s."""
  rand = iter([0.0, 0.0 if bool(choice.use_cutmix) else 0.99])  # mix_prob, switch_prob
  centre = iter([int(choice.centre_y), int(choice.centre_x)])
  monkeypatch.setattr(timm_mixup.np.random, 'rand', lambda *a: next(rand))
  monkeypatch.setattr(timm_mixup.np.random, 'beta', lambda *a, **k: np.float64(choice.lam))
  monkeypatch.setattr(timm_mixup.np.random, 'randint', lambda *a, **k: next(centre))
  mix = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                         label_smoothing=smoothing, num_classes=NUM_CLASSES)
  x, y = mix(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
  return x.numpy().transpose(0, 2, 3, 1), y.numpy()


@pytest.mark.parametrize('mixup_alpha, cutmix_alpha, seed', [
    (0.2, 0.0, 0), (0.0, 1.0, 0), (0.2, 1.0, 0), (0.2, 1.0, 1), (0.2, 1.0, 2), (0.2, 1.0, 3)])
def test_mixed_images_and_targets_are_timms(monkeypatch, mixup_alpha, cutmix_alpha, seed):
  images, labels = _batch()
  choice = mixing.draw(jax.random.key(seed), 12, 10, mixup_alpha, cutmix_alpha)
  mixed, lam = mixing.apply(jnp.asarray(images), choice)
  targets = mixing.targets(jnp.asarray(labels), NUM_CLASSES, 0.1, lam)
  expected_images, expected_targets = _timm_mix(monkeypatch, images, labels, choice,
                                                mixup_alpha, cutmix_alpha, 0.1)
  np.testing.assert_allclose(np.asarray(mixed), expected_images, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets), expected_targets, rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(mixed), images)  # something was mixed


def test_both_mixings_are_chosen_and_lam_follows_beta():
  draws = [mixing.draw(jax.random.key(s), 12, 10, 0.2, 1.0) for s in range(400)]
  cutmix = np.array([bool(d.use_cutmix) for d in draws])
  lam = np.array([float(d.lam) for d in draws])
  assert 0.4 < cutmix.mean() < 0.6
  # Beta(1, 1) is uniform (mean 1/2, var 1/12); Beta(0.2, 0.2) has var 1/ (4 * 1.4) ~ 0.18.
  assert abs(lam[cutmix].mean() - 0.5) < 0.06 and abs(lam[cutmix].var() - 1 / 12) < 0.02
  assert abs(lam[~cutmix].var() - 0.25 / 1.4) < 0.04


def test_cutmix_box_is_clipped_and_lam_corrected():
  top, bottom, left, right = (int(v) for v in mixing.cutmix_box(jnp.float32(0.36), 1, 9, 12, 10))
  # sides int(12 * 0.8) = 9 and int(10 * 0.8) = 8: rows 1-4..1+5, cols 9-4..9+4, clipped.
  assert (top, bottom, left, right) == (0, 6, 5, 10)
  images, _ = _batch()
  choice = mixing.MixDraw(jnp.asarray(True), jnp.float32(0.36), jnp.int32(1), jnp.int32(9))
  _, lam = mixing.apply(jnp.asarray(images), choice)
  np.testing.assert_allclose(float(lam), 1 - 6 * 5 / 120, rtol=1e-6)


@pytest.mark.parametrize('smoothing, thresh', [(0.0, 0.0), (0.1, 0.0), (0.1, 0.2)])
def test_bce_is_timms_binary_cross_entropy(smoothing, thresh):
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((6, NUM_CLASSES)).astype(np.float32) * 3
  labels = rng.integers(0, NUM_CLASSES, 6)
  reference = BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh or None)
  expected = float(reference(torch.from_numpy(logits), torch.from_numpy(labels)))
  targets = mixing.targets(jnp.asarray(labels), NUM_CLASSES, smoothing)
  got = losses.binary_cross_entropy(jnp.asarray(logits), targets, thresh).mean()
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_mixed_bce_and_soft_cross_entropy_are_timms(monkeypatch):
  """timm's train.py with mixup: the smoothed, mixed targets go to BinaryCrossEntropy
  (with its threshold) or SoftTargetCrossEntropy."""
  images, labels = _batch()
  choice = mixing.draw(jax.random.key(5), 12, 10, 0.2, 0.0)
  _, lam = mixing.apply(jnp.asarray(images), choice)
  _, timm_targets = _timm_mix(monkeypatch, images, labels, choice, 0.2, 0.0, 0.1)
  logits = np.random.default_rng(2).standard_normal((6, NUM_CLASSES)).astype(np.float32)
  targets = mixing.targets(jnp.asarray(labels), NUM_CLASSES, 0.1, lam)
  bce = BinaryCrossEntropy(target_threshold=0.2)(torch.from_numpy(logits),
                                                 torch.from_numpy(timm_targets))
  np.testing.assert_allclose(float(losses.binary_cross_entropy(logits, targets, 0.2).mean()),
                             float(bce), rtol=1e-6)
  soft = SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(timm_targets))
  np.testing.assert_allclose(float(losses.softmax_cross_entropy(logits, targets).mean()),
                             float(soft), rtol=1e-6)
