"""Verification: the PyTorch reference model and ours on the same batch."""

import functools
from typing import Any, Mapping

import numpy as np

from resnet_jax.train import run_dir
from resnet_jax.convert.conversion import to_numpy
from resnet_jax.errors import UserError
from resnet_jax.models.torch_names import NUM_BATCHES_TRACKED, layout_overrides, num_classes_of
from resnet_jax.models.zoo import PYTORCH_REFERENCE


def torch_reference_model(arch: str, num_classes: int = 1000, in_channels: int = 3):
  """The torchvision (or timm) module that `arch` mirrors, randomly initialized; for
  in_channels != 3 torchvision's first conv is swapped for one of that many inputs."""
  if PYTORCH_REFERENCE.get(arch) == 'torchvision':
    import torch
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
      model.conv1 = torch.nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=7,
                                    stride=2, padding=3, bias=False)
    return model
  if PYTORCH_REFERENCE.get(arch) == 'timm':
    import timm
    return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels)
  raise UserError(f'{arch!r} has no PyTorch reference; choose one of '
                   f'{", ".join(PYTORCH_REFERENCE)}.')


def max_logit_difference(state_dict: Mapping[str, Any], variables: Mapping[str, Any],
                         arch: str, batch_size: int = 2, image_size: int = 224,
                         seed: int = 0, **overrides: Any) -> float:
  """Runs the PyTorch reference with `state_dict` and our model (with create_model
  `overrides`; of those the reference mirrors only in_channels) with `variables` on the
  same random batch, in eval mode, and returns the largest absolute logit difference."""
  import jax
  import torch

  if arch not in PYTORCH_REFERENCE:
    raise UserError(f'--verify compares with the PyTorch model that {arch} mirrors, and '
                    f'{arch} mirrors none in torchvision or timm; convert without --verify.')
  overrides = layout_overrides(overrides)
  in_channels = overrides.pop('in_channels', 3)
  if overrides:
    raise UserError(f'--verify compares with the PyTorch {arch}, which has no counterpart '
                    f'for {overrides}; convert without --verify.')
  num_classes = num_classes_of({k: tuple(v.shape) for k, v in state_dict.items()})
  reference = torch_reference_model(arch, num_classes, in_channels)
  tensors = {k: torch.as_tensor(to_numpy(v)) for k, v in state_dict.items()}
  result = reference.load_state_dict(tensors, strict=False)
  missing = [k for k in result.missing_keys if not k.endswith(NUM_BATCHES_TRACKED)]
  if missing or result.unexpected_keys:
    raise UserError(f'The {arch} reference model does not take these weights: missing '
                     f'{missing}, unexpected {result.unexpected_keys}.')
  images = np.random.default_rng(seed).standard_normal(
      (batch_size, in_channels, image_size, image_size)).astype(np.float32)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(images)).numpy()
  model = run_dir.model_from_config({'name': arch, 'num_classes': num_classes,
                                     'in_channels': in_channels})
  got = jax.jit(functools.partial(model.apply, train=False))(
      dict(variables), images.transpose(0, 2, 3, 1))
  return float(np.max(np.abs(np.asarray(got) - expected)))
