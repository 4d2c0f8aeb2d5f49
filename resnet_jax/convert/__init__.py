"""Convert ResNet weights between PyTorch (torchvision, timm) and resnet_jax.

The rule is the one our parameter names were chosen for: join the Flax path with '.'
and rename the leaf. Convolution kernels go HWIO <-> OIHW, dense kernels are transposed,
BatchNorm `scale` is torch's `weight` and `mean`/`var` are `running_mean`/`running_var`.
torch's `num_batches_tracked` has no Flax counterpart: it is dropped on import and
written as 0 on export.

  python -m resnet_jax.convert --arch resnet50 --input resnet50.pth --output ckpt/ --verify
  python -m resnet_jax.convert --input ckpt/ --output resnet50.safetensors

A checkpoint directory's model.json overrides (in_channels, stage_sizes, ...) shape the
exported layout, so a training workdir of any zoo model exports. Nothing is converted with
a silent loss: tensors that are not dense floats (complex, integer, bool, sparse; the
integer `num_batches_tracked` excepted) are refused, and so are NaN/inf values unless
--allow-nonfinite. The output is written next to its place and swapped in when complete;
--overwrite replaces only what convert writes (a directory of model.json and variables/,
or a weights file), never the current directory or one holding the input; the rule and the
swap are resnet_jax.outputs', shared with export.

This package is the only one that imports torch, and only inside the functions that need it:
conversion.py (state_dicts both ways), files.py (weight files, what convert replaces),
verify.py (the PyTorch reference), cli.py; the name rule is resnet_jax.models.torch_names.
"""

from resnet_jax.convert.cli import main
from resnet_jax.convert.conversion import (check_convertible, check_finite, flax_to_torch,
                                           strip_prefix, torch_to_flax)
from resnet_jax.convert.files import (WEIGHT_SUFFIXES, check_output, read_torch_weights,
                                      write_atomically, write_torch_weights)
from resnet_jax.convert.verify import max_logit_difference, torch_reference_model
from resnet_jax.models.torch_names import layout_overrides, suggest_arch, torch_layout
from resnet_jax.models.zoo import PYTORCH_REFERENCE as TORCH_ARCHS
