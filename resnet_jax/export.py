"""Export a checkpoint for serving: uint8 pixels in, float32 logits out, any batch size.

  python -m resnet_jax.export --checkpoint ckpt/ --output model.jaxexport
  python -m resnet_jax.export --pretrained resnet50.tv2_in1k --output r50.jaxexport
  python -m resnet_jax.export --checkpoint ckpt/ --output r50_savedmodel --format saved_model

The exported function takes NHWC uint8 pixels at the model's image size and does the
normalization itself, so a server only decodes, resizes and crops. The weights are
baked in as constants; it is lowered for CPU and CUDA unless --platforms says otherwise.

Formats:
  - jax_export (default): OUTPUT holds the bytes of `jax.export.Exported.serialize()`;
    load them with jax alone: `jax.export.deserialize(open(OUTPUT, 'rb').read()).call(x)`.
    OUTPUT.json, next to it, is the input contract (`contract()`), with the sha256 of
    OUTPUT.
  - saved_model: a TensorFlow SavedModel directory (via jax2tf) whose 'serving_default'
    signature maps `pixels` (uint8, [batch, H, W, C]) to `logits`; the contract is
    assets.extra/resnet_jax_contract.json inside it.
An existing output is replaced only with --overwrite and only if export wrote it (an
artifact whose contract names its sha256, or a SavedModel directory holding only what
TensorFlow writes and our contract): never the current directory or one holding the
checkpoint. The new output is written beside it and swapped in (resnet_jax.outputs).
--platforms takes names among cpu, cuda, rocm and tpu.
The image size, the normalization and the resize and crop a server must do come from the
checkpoint's input spec (`resnet_jax.input_spec`): a pretrained name's own (its weights'
metadata), a training workdir's run, else ImageNet's at 224 (resize 256); the contract
states them under 'preprocessing' and 'normalization'.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from resnet_jax import outputs
from resnet_jax.accelerators import quiet_libtpu_without_tpu
from resnet_jax.errors import UserError

CONTRACT_FORMAT = 'resnet_jax.serving/1'
CONTRACT_SUFFIX = '.json'
SAVED_MODEL_CONTRACT = Path('assets.extra') / 'resnet_jax_contract.json'
TENSORFLOW_MISSING = ("--format saved_model needs TensorFlow, which is not installed; "
                      "install it with `pip install 'resnet_jax[train]'` (or tensorflow-cpu).")
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # the platforms jax.export lowers for
# What tf.saved_model.save writes at the top of a SavedModel directory, and our contract.
SAVED_MODEL_ENTRIES = {'saved_model.pb', 'variables', 'assets', 'fingerprint.pb',
                       SAVED_MODEL_CONTRACT.parts[0]}


def checked_platforms(platforms: Sequence[str]) -> Tuple[str, ...]:
  """`platforms` as a tuple, or one UserError unless they are distinct names among
  PLATFORMS, at least one (an artifact lowered for none runs nowhere)."""
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if not platforms or unknown or len(set(platforms)) != len(platforms):
    given = ','.join(platforms)
    raise UserError(f'--platforms {given!r}: name one or more distinct platforms among '
                    f'{", ".join(PLATFORMS)}, comma-separated (e.g. --platforms cpu,cuda).')
  return platforms


def _preprocessing(spec) -> Dict[str, Any]:
  """What a server does to an image before the function: the spec's resize and crop."""
  size = spec.crop_size
  if spec.resize_size is None:
    steps = f'resize the image to {size}x{size} ({spec.interpolation}, antialiased)'
  else:
    steps = (f'resize the shorter side to {spec.resize_size} ({spec.interpolation}, '
             f'antialiased; the longer side truncated), center-crop {size}x{size}')
  fields = {k: v for k, v in spec.to_json().items() if k not in ('mean', 'std')}
  return {**fields, 'steps': steps + ', as uint8 pixels'}


def contract(model, model_config: Dict[str, Any], spec, batch: Optional[int], dtype: str,
             platforms: Sequence[str]) -> Dict[str, Any]:
  """The artifact's input contract: what to feed it and what it returns."""
  size = spec.crop_size
  return {
      'format': CONTRACT_FORMAT,
      'model': model_config,
      'input': {'name': 'pixels', 'dtype': 'uint8', 'layout': 'NHWC', 'range': [0, 255],
                'shape': [batch, size, size, model.in_channels]},
      'preprocessing': _preprocessing(spec),
      'normalization': {'name': spec.statistics_name(), 'mean': list(spec.mean),
                        'std': list(spec.std),
                        'formula': '(pixels / 255 - mean) / std, done inside the function'},
      'output': {'name': 'logits', 'dtype': 'float32', 'shape': [batch, model.num_classes]},
      'num_classes': model.num_classes,
      'compute_dtype': dtype,
      'platforms': list(platforms),
  }


def serving_function(model, variables, mean: Sequence[float], std: Sequence[float]) -> Callable:
  """uint8 NHWC pixels -> float32 logits, normalized with `mean` and `std`, with `variables`
  closed over (baked in)."""
  import jax.numpy as jnp
  from resnet_jax.data.normalization import normalize_with

  def serve(pixels):
    logits = model.apply(variables, normalize_with(pixels, mean, std), train=False)
    return logits.astype(jnp.float32)
  return serve


def _input_spec(batch: Optional[int], contract_: Dict[str, Any]):
  import jax
  import jax.numpy as jnp
  _, height, width, channels = contract_['input']['shape']
  size = jax.export.symbolic_shape('b')[0] if batch is None else batch
  return jax.ShapeDtypeStruct((size, height, width, channels), jnp.uint8)


# --------------------------------------------------------------------------- writers


def _is_jax_export(output: Path) -> bool:
  """Whether `output` and OUTPUT.json are an artifact and the contract naming its sha256."""
  contract_path = Path(str(output) + CONTRACT_SUFFIX)
  if any(p.is_symlink() or not p.is_file() for p in (output, contract_path)):
    return False
  try:
    sidecar = json.loads(contract_path.read_text())
    return (sidecar['format'] == CONTRACT_FORMAT
            and sidecar['sha256'] == hashlib.sha256(output.read_bytes()).hexdigest())
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _is_saved_model(output: Path) -> bool:
  """Whether `output` is a SavedModel directory write_saved_model wrote: only its entries,
  and our contract inside."""
  if output.is_symlink() or not output.is_dir():
    return False
  try:
    entries = set(os.listdir(output))
    contract_ = json.loads((output / SAVED_MODEL_CONTRACT).read_text())
    return ('saved_model.pb' in entries and entries <= SAVED_MODEL_ENTRIES
            and contract_['format'] == CONTRACT_FORMAT)
  except (OSError, ValueError, KeyError, TypeError):
    return False


# What export writes, and so may replace with --overwrite.
KINDS = {
    'jax_export': outputs.Kind(
        tool='export', is_ours=_is_jax_export, companions=(CONTRACT_SUFFIX,),
        description=f'an artifact file and, beside it, its OUTPUT{CONTRACT_SUFFIX} contract '
                    f'naming its sha256'),
    'saved_model': outputs.Kind(
        tool='export', is_ours=_is_saved_model,
        description=f'a SavedModel directory holding only what TensorFlow writes and '
                    f'{SAVED_MODEL_CONTRACT}'),
}


def write_jax_export(serve, contract_: Dict[str, Any], output: Path,
                     overwrite: bool = False) -> None:
  """OUTPUT (serialized jax.export.Exported) and OUTPUT.json (the contract), swapped in
  together once both are written (the contract last)."""
  import jax
  exported = jax.export.export(jax.jit(serve), platforms=contract_['platforms'])(
      _input_spec(contract_['input']['shape'][0], contract_))
  data = exported.serialize()
  sidecar = {**contract_, 'sha256': hashlib.sha256(data).hexdigest()}

  def write(target: Path) -> None:
    target.write_bytes(bytes(data))
    Path(str(target) + CONTRACT_SUFFIX).write_text(json.dumps(sidecar, indent=2) + '\n')
  outputs.write_atomically(output, write, KINDS['jax_export'], overwrite)


def write_saved_model(serve, contract_: Dict[str, Any], output: Path,
                      overwrite: bool = False) -> None:
  """A SavedModel directory with a 'serving_default' signature pixels -> logits."""
  try:
    import tensorflow as tf
  except ImportError:
    raise UserError(TENSORFLOW_MISSING) from None
  from jax.experimental import jax2tf

  batch, height, width, channels = contract_['input']['shape']
  converted = jax2tf.convert(serve, with_gradient=False,
                             polymorphic_shapes=[f'({batch or "b"}, {height}, {width}, '
                                                 f'{channels})'],
                             native_serialization_platforms=contract_['platforms'])
  module = tf.Module()
  module.serve = tf.function(
      lambda pixels: {'logits': converted(pixels)}, autograph=False,
      input_signature=[tf.TensorSpec([batch, height, width, channels], tf.uint8, name='pixels')])

  def write(directory: Path) -> None:
    tf.saved_model.save(module, str(directory), signatures={'serving_default': module.serve})
    (directory / SAVED_MODEL_CONTRACT).parent.mkdir(exist_ok=True)
    (directory / SAVED_MODEL_CONTRACT).write_text(json.dumps(contract_, indent=2) + '\n')
  outputs.write_atomically(output, write, KINDS['saved_model'], overwrite)


# ---------------------------------------------------------------------------- export


def export(checkpoint: Path, output: Path, fmt: str = 'jax_export', dtype: str = 'float32',
           batch: Optional[int] = None, platforms: Sequence[str] = ('cpu', 'cuda'),
           overwrite: bool = False, spec=None, raw_weights: bool = False) -> Dict[str, Any]:
  """Writes the serving artifact of `checkpoint` to `output`; returns its contract. An
  existing output is replaced only with `overwrite` and only if export wrote it. `spec`
  (an InputSpec) defaults to the checkpoint's own (`input_spec.of_checkpoint`). A
  training workdir's weight EMA is exported when the run kept one, unless `raw_weights`."""
  import jax.numpy as jnp
  from resnet_jax import input_spec
  from resnet_jax.train.checkpoint_format import load_model
  from resnet_jax.train.run_dir import read_model_config

  platforms = checked_platforms(platforms)
  outputs.check_output(Path(output), KINDS[fmt], [checkpoint], overwrite)
  model_config = read_model_config(checkpoint)
  model, variables = load_model(checkpoint, raw_weights, dtype=jnp.dtype(dtype))
  if spec is None:
    spec = input_spec.of_checkpoint(checkpoint, model.num_classes, model.in_channels)
  spec.check_channels(model.in_channels)
  contract_ = contract(model, model_config, spec, batch, dtype, platforms)
  serve = serving_function(model, variables, spec.mean, spec.std)
  writer = write_saved_model if fmt == 'saved_model' else write_jax_export
  writer(serve, contract_, output, overwrite)
  return contract_


def _check_args(args) -> None:
  """Raises one UserError for a missing checkpoint, bad platforms, an output export may
  not write (resnet_jax.outputs' rule), or an unwritable one."""
  if args.checkpoint is not None and not args.checkpoint.is_dir():
    raise UserError(f'--checkpoint {args.checkpoint} is not a directory; pass a converted '
                    f'checkpoint or a training workdir.')
  checked_platforms(args.platforms)
  if args.pretrained:
    from resnet_jax.pretrained import cache_dir
    source = cache_dir(args.pretrained)
  else:
    source = args.checkpoint
  outputs.check_output(args.output, KINDS[args.format], [source], args.overwrite)
  if args.format == 'saved_model':
    try:
      import tensorflow  # noqa: F401 pylint: disable=unused-import
    except ImportError:
      raise UserError(TENSORFLOW_MISSING) from None
  parent = args.output.absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'Cannot create the folder of --output {args.output}: {e}.') from None
  if not os.access(parent, os.W_OK):
    raise UserError(f'--output {args.output}: {parent} is not writable; choose another path.')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m resnet_jax.export',
      description='Export a checkpoint as a self-contained serving function: uint8 NHWC '
                  'pixels in, float32 logits out (normalization included).')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', type=Path,
                      help='checkpoint directory (converted, or a training workdir)')
  source.add_argument('--pretrained', help='pretrained weights by name, e.g. resnet50.tv2_in1k')
  parser.add_argument('--output', required=True, type=Path,
                      help='the artifact: a file (jax_export) or a directory (saved_model)')
  parser.add_argument('--format', choices=('jax_export', 'saved_model'), default='jax_export',
                      help='jax_export (load with jax.export.deserialize) or a TensorFlow '
                           'SavedModel via jax2tf')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype (the weights are stored as in the checkpoint)')
  parser.add_argument('--batch', default='any',
                      help="'any' (a symbolic batch dimension) or a fixed batch size")
  parser.add_argument('--platforms', default='cpu,cuda', type=_platform_list,
                      help=f'comma-separated platforms to lower for: {", ".join(PLATFORMS)}')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing output, only if it is one export writes; '
                           'it is swapped out once the new output is complete')
  parser.add_argument('--raw_weights', action='store_true',
                      help='with a training workdir: its trained weights, not its weight EMA '
                           '(used by default when the run kept one)')
  return parser


def _platform_list(value: str) -> Tuple[str, ...]:
  return tuple(p.strip() for p in value.split(',') if p.strip())


def _batch(parser, value: str) -> Optional[int]:
  if value == 'any':
    return None
  if not value.isdigit() or int(value) < 1:
    parser.error(f"--batch {value}: pass 'any' or a positive integer.")
  return int(value)


def main(argv=None) -> int:
  """Entry point of `python -m resnet_jax.export`."""
  quiet_libtpu_without_tpu()
  parser = _parser()
  args = parser.parse_args(argv)
  batch = _batch(parser, args.batch)
  try:
    _check_args(args)
    checkpoint, spec = args.checkpoint, None
    if args.pretrained:
      from resnet_jax.pretrained import ensure_cached, input_spec
      checkpoint, spec = ensure_cached(args.pretrained), input_spec(args.pretrained)
    result = export(checkpoint, args.output, args.format, args.dtype, batch, args.platforms,
                    args.overwrite, spec, args.raw_weights)
  except (UserError, OSError) as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  shape = ['batch' if d is None else d for d in result['input']['shape']]
  normalization = result['normalization']
  print(f'wrote {args.output}: uint8 {shape} '
        f'({normalization["name"] or (normalization["mean"], normalization["std"])} '
        f'normalization) -> float32 logits [{shape[0]}, {result["num_classes"]}]')
  print(f'  feed it: {result["preprocessing"]["steps"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
