"""The recipe features together (LARS with the polynomial schedule, drop path, Mixup and
CutMix, BCE, weight EMA, repeated augmentation, other train and eval sizes, TA-wide and
random erasing): an interrupted run resumes bit-identically."""

import pytest
from helpers import (assert_metrics_match, assert_same_state, checkpoint_steps, interrupt_at,
                     tiny_digits_config)

from resnet_jax.errors import Interrupted
from resnet_jax.train.config_schema import KEYS
from resnet_jax.train.loop import train_and_evaluate

EVERYTHING = dict(num_train_steps=6, optimizer='lars', schedule='polynomial',
                  end_learning_rate=0.001, warmup_steps=2, drop_path_rate=0.2,
                  mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, loss='bce',
                  bce_target_thresh=0.2, ema_decay=0.99, ema_every_steps=2,
                  best_metric='eval_ema/top1', eval_every_steps=3,
                  repeated_augmentation=4, train_image_size=10, eval_image_size=9)
# Augmentations of resnet_jax.data.augment, on where this tree has them (their keys).
AUGMENTATIONS = {'auto_augment': 'ta_wide', 'random_erase': 0.5}
EVERYTHING.update({k: v for k, v in AUGMENTATIONS.items() if k in KEYS})


@pytest.mark.slow  # trains and resumes with every recipe feature: ~35 s
def test_interrupted_run_with_every_recipe_feature_resumes_bit_identically(tmp_path,
                                                                           monkeypatch):
  reference = str(tmp_path / 'reference')
  train_and_evaluate(tiny_digits_config(**EVERYTHING), reference)

  workdir = str(tmp_path / 'run')
  interrupt_at(monkeypatch, 4)  # while step 4 runs
  with pytest.raises(Interrupted, match='saved step 4'):
    train_and_evaluate(tiny_digits_config(**EVERYTHING), workdir)
  assert checkpoint_steps(workdir)[-1] == 4
  monkeypatch.undo()
  train_and_evaluate(tiny_digits_config(**EVERYTHING), workdir)
  assert_same_state(workdir, reference)  # params, BN statistics, LARS momenta, the EMA
  assert_metrics_match(workdir, reference)
