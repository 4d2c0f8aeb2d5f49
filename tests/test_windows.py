"""Strided windows against torch's unfold: both formulations, padding and output shape."""

import numpy as np
import pytest
import torch

from resnet_jax.models import windows


@pytest.mark.parametrize('kernel_size, strides, size', [(3, 1, (5, 6)), (3, 2, (8, 7)),
                                                        (7, 2, (9, 10)), (1, 2, (5, 4))])
def test_windows_match_torch_unfold(kernel_size, strides, size):
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  padding = windows.torch_padding(kernel_size)
  out_h, out_w = windows.output_shape(x, kernel_size, strides, padding)
  unfolded = torch.nn.functional.unfold(torch.tensor(x.transpose(0, 3, 1, 2)), kernel_size,
                                        padding=kernel_size // 2, stride=strides)
  # (n, c * k * k, out_h * out_w) -> (n, out_h, out_w, k, k, c)
  expected = unfolded.numpy().reshape(2, 3, kernel_size, kernel_size, out_h, out_w)
  expected = expected.transpose(0, 4, 5, 2, 3, 1)
  gathered = windows.gathered_windows(x, kernel_size, strides, padding)
  np.testing.assert_array_equal(gathered, expected)
  views = windows.window_views(x, kernel_size, strides, padding)
  stacked = np.stack(views, axis=3).reshape(expected.shape)
  np.testing.assert_array_equal(stacked, expected)


def test_window_views_pad_with_the_given_value():
  x = np.zeros((1, 2, 2, 1), np.float32)
  corner = windows.window_views(x, 3, 2, windows.torch_padding(3), pad_value=-np.inf)[0]
  assert corner.shape == (1, 1, 1, 1) and corner[0, 0, 0, 0] == -np.inf
