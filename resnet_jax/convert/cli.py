"""The command line: `python -m resnet_jax.convert --input IN --output OUT [--arch A]`."""

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from resnet_jax import input_spec
from resnet_jax.train import checkpoint_format, run_dir
from resnet_jax.accelerators import quiet_libtpu_without_tpu
from resnet_jax.convert.conversion import flax_to_torch, torch_to_flax
from resnet_jax.convert.files import (WEIGHT_SUFFIXES, check_output, read_torch_weights,
                                      write_atomically, write_torch_weights)
from resnet_jax.convert.verify import max_logit_difference
from resnet_jax.errors import UserError
from resnet_jax.models.torch_names import layout_overrides, num_classes_of
from resnet_jax.models.zoo import PYTORCH_REFERENCE


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m resnet_jax.convert',
      description='Convert ResNet weights: a PyTorch file (.pth/.pt/.bin/.safetensors) '
                  'becomes a resnet_jax checkpoint directory, and a checkpoint directory '
                  '(converted, or a training workdir) becomes a PyTorch file.')
  parser.add_argument('--arch', help='zoo name, e.g. resnet50 (needed for PyTorch input; '
                      'for a checkpoint directory it defaults to its model.json). '
                      f'With a PyTorch reference: {", ".join(PYTORCH_REFERENCE)}.')
  parser.add_argument('--input', required=True, type=Path,
                      help='PyTorch weights file, or a checkpoint directory')
  parser.add_argument('--output', required=True, type=Path,
                      help='checkpoint directory, or a .pth/.pt/.bin/.safetensors file')
  parser.add_argument('--pretrained-name', metavar='NAME',
                      help='PyTorch input: the pretrained name these weights are (e.g. '
                           'timm/resnet50d.ra4_e3600_r224_in1k, resnet_jax.list_pretrained()); '
                           'its preprocessing is written as the input spec. Without it: '
                           'torchvision\'s ImageNet transform (resize 256, crop 224)')
  parser.add_argument('--verify', action='store_true',
                      help='compare logits with the PyTorch reference model on a random batch')
  parser.add_argument('--tolerance', type=_tolerance, default=1e-4,
                      help='largest max-abs logit difference --verify accepts (default 1e-4)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing output, only if it is one convert writes (a '
                           'directory of model.json and variables/, or a weights file); it '
                           'is swapped out once the new output is complete')
  parser.add_argument('--allow-nonfinite', action='store_true',
                      help='convert weights holding NaN or inf (refused by default: they '
                           'come from a diverged run or a damaged file). Tensors that are '
                           'not floating point (complex, integer, bool) are always refused')
  parser.add_argument('--raw_weights', action='store_true',
                      help='with a training workdir: its trained weights, not its weight EMA '
                           '(used by default when the run kept one)')
  return parser


def _tolerance(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0 <= value < math.inf:  # NaN failed every check, inf passed every one
    raise argparse.ArgumentTypeError(f'{text!r}: pass a finite number >= 0, e.g. 1e-4')
  return value


def _check_paths(parser, args) -> bool:
  """Validates --input/--output; returns True for PyTorch -> Flax."""
  if not args.input.exists():
    parser.error(f'--input {args.input} does not exist.')
  to_flax = args.input.is_file()
  if to_flax and args.input.suffix not in WEIGHT_SUFFIXES:
    parser.error(f'--input {args.input}: expected a {"/".join(WEIGHT_SUFFIXES)} file or '
                 f'a checkpoint directory.')
  if to_flax and not args.arch:
    parser.error('--arch is required to convert PyTorch weights, e.g. --arch resnet50.')
  if args.pretrained_name and not to_flax:
    parser.error('--pretrained-name goes with PyTorch input (a checkpoint directory keeps '
                 'its own input_spec.json).')
  if args.arch:
    from resnet_jax.models import create_model
    try:
      create_model(args.arch)
    except ValueError as e:
      parser.error(str(e))
  if not to_flax and args.output.suffix not in WEIGHT_SUFFIXES:
    parser.error(f'--output {args.output}: exporting a checkpoint directory needs a '
                 f'{"/".join(WEIGHT_SUFFIXES)} file name.')
  try:
    check_output(args.output, [args.input], args.overwrite)
  except UserError as e:
    parser.error(str(e))
  return to_flax


def _named_input_spec(args) -> Optional[dict]:
  """The input_spec.json of --pretrained-name (whose architecture must be --arch), or None
  without it; checked before any weights are read."""
  from resnet_jax import pretrained
  if not args.pretrained_name:
    return None
  spec = pretrained.input_spec(args.pretrained_name)  # a UserError for unknown names
  arch = pretrained.table()[args.pretrained_name]['arch']
  if arch != args.arch:
    raise UserError(f'--pretrained-name {args.pretrained_name} is weights of {arch}, not of '
                    f'--arch {args.arch}; pass --arch {arch}.')
  return spec.to_json()


def _check_named_classes(name: Optional[str], num_classes: int) -> None:
  """A UserError when the weights' classifier is not that of the pretrained name."""
  from resnet_jax import pretrained
  expected = name and pretrained.table()[name]['num_classes']
  if expected and expected != num_classes:
    raise UserError(f'--input has a {num_classes}-class fc, but {name} classifies '
                    f'{expected} classes: these are not its weights.')


def _read_and_convert(args, to_flax: bool, progress):
  """(arch, create_model overrides, torch state_dict, Flax variables, a function writing
  the output to a path)."""
  progress.set_description('reading')
  if to_flax:
    spec = _named_input_spec(args)
    arch, state_dict = args.arch, read_torch_weights(args.input)
    progress.update()
    progress.set_description('converting')
    variables = torch_to_flax(state_dict, arch, args.allow_nonfinite)
    config = {'name': arch, 'num_classes': num_classes_of(
        {k: tuple(v.shape) for k, v in state_dict.items()})}
    _check_named_classes(args.pretrained_name, config['num_classes'])
    spec = spec or input_spec.converted_default(config['num_classes']).to_json()
    write = lambda path: checkpoint_format.save_converted(variables, config, path, spec)
    return arch, {}, state_dict, variables, write
  model_config = run_dir.read_model_config(args.input)
  arch, overrides = args.arch or model_config['name'], layout_overrides(model_config)
  variables = checkpoint_format.load_variables(args.input, args.raw_weights)
  progress.update()
  progress.set_description('converting')
  state_dict = flax_to_torch(variables, arch, args.allow_nonfinite, **overrides)
  return arch, overrides, state_dict, variables, lambda path: write_torch_weights(state_dict,
                                                                                  path)


def _convert(args, to_flax: bool, progress) -> Optional[float]:
  """Converts, verifies if asked, and writes unless verification failed; returns the
  max abs logit difference (None without --verify)."""
  arch, overrides, state_dict, variables, write = _read_and_convert(args, to_flax, progress)
  progress.update()
  difference = None
  if args.verify:
    progress.set_description('verifying')
    difference = max_logit_difference(state_dict, variables, arch, **overrides)
  progress.update()
  if difference is None or difference <= args.tolerance:
    progress.set_description('writing')
    write_atomically(args.output, write, args.overwrite)
  progress.update()
  return difference


def main(argv=None) -> int:
  """Entry point of `python -m resnet_jax.convert` and `resnet-jax-convert`."""
  from tqdm import tqdm

  parser = _parser()
  args = parser.parse_args(argv)
  quiet_libtpu_without_tpu()
  to_flax = _check_paths(parser, args)
  try:
    # disable=None: a progress bar on a terminal, silence in logs and pipes.
    with tqdm(total=4, disable=None, file=sys.stderr) as progress:
      difference = _convert(args, to_flax, progress)
  except (UserError, OSError) as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  if difference is not None:
    ok = difference <= args.tolerance
    print(f'max abs logit difference vs PyTorch: {difference:.3g} '
          f'({"ok" if ok else "FAILED"}, tolerance {args.tolerance:g})')
    if not ok:
      parser.exit(1, f'{parser.prog}: error: verification failed; nothing was written.\n')
  print(f'wrote {args.output}')
  return 0
