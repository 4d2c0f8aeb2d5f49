"""Layer-by-layer summary of a zoo model: output shapes, parameters and GFLOPs.

    python -m resnet_jax.summary resnet50 --image-size 224 [--depth 2]

Shapes are printed as C x H x W, as torchvision users read them. GFLOPs follow
torchvision's convention: multiply-accumulates of the convolutions and the fc, per image
(with those of the SE/ECA attentions' convolutions of the channel means).
"""

import argparse
import dataclasses
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import attention, convolution, zoo


@dataclasses.dataclass
class LayerRow:
  path: str
  kind: str
  output_shape: Tuple[int, ...]
  params: int


def _macs(module: nn.Module, inputs, output) -> int:
  """Multiply-accumulates of one conv or dense call, per image."""
  if isinstance(module, convolution.Conv):
    in_channels = inputs[0].shape[-1] // module.groups
    return int(np.prod(output.shape[1:])) * module.kernel_size ** 2 * in_channels
  if isinstance(module, (nn.Dense, attention.PointwiseConv)):
    return int(np.prod(output.shape[1:])) * inputs[0].shape[-1]
  if isinstance(module, attention.ChannelConv):
    return int(np.prod(output.shape[1:])) * module.kernel_size
  return 0


def _param_counts(params) -> Dict[str, int]:
  """Parameters under every module path ('layer1', 'layer1.0', 'layer1.0.conv1', ...)."""
  counts: Dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path[:-1]]
    for depth in range(1, len(names) + 1):
      key = '.'.join(names[:depth])
      counts[key] = counts.get(key, 0) + int(np.prod(leaf.shape))
  return counts


def summarize(name: str, image_size: int = 224,
              **overrides: Any) -> Tuple[List[LayerRow], int, float]:
  """Returns (rows for every module call, total parameters, GFLOPs per image).

  The model is walked unrolled (scan_blocks=False) so every block is seen and counted. One
  shape evaluation of `init` gives all three: init runs the forward pass it creates the
  variables in, so the shapes and multiply-accumulates are recorded on the way (a second
  evaluation of `apply` would double the cost, minutes over the zoo).
  """
  model = zoo.create_model(name, **{**overrides, 'scan_blocks': False})
  x = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
  rows: List[LayerRow] = []
  macs = [0]

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not module.path:
      return next_fun(*args, **kwargs)
    row = LayerRow('.'.join(module.path), type(module).__name__, (), 0)
    rows.append(row)  # before the call, so parents precede their children
    output = next_fun(*args, **kwargs)
    row.output_shape = tuple(output.shape[1:])
    macs[0] += _macs(module, args, output)
    return output

  def init(x):
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), x)

  counts = _param_counts(jax.eval_shape(init, x)['params'])
  for row in rows:
    row.params = counts.get(row.path, 0)
  return rows, sum(counts[k] for k in counts if '.' not in k), macs[0] / 1e9


def _chw(shape: Tuple[int, ...]) -> str:
  if len(shape) == 3:
    shape = (shape[2], shape[0], shape[1])
  return 'x'.join(map(str, shape))


def format_table(rows: List[LayerRow], depth: int) -> str:
  shown = [r for r in rows if r.path.count('.') < depth]
  width = max(len(r.path) + 2 * r.path.count('.') for r in shown) + 2
  lines = [f'{"layer":<{width}}{"type":<18}{"output (CxHxW)":>18}{"params":>14}']
  lines += [f'{"  " * r.path.count(".") + r.path:<{width}}{r.kind:<18}'
            f'{_chw(r.output_shape):>18}{r.params:>14,}' for r in shown]
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', help=f'one of: {", ".join(zoo.list_models())}')
  parser.add_argument('--image-size', type=int, default=None,
                      help='input height and width (default 224, or 32 for CIFAR models)')
  parser.add_argument('--num-classes', type=int, default=None)
  parser.add_argument('--depth', type=int, default=2,
                      help='nesting shown: 1 = stem and stages, 2 = blocks, 3 = layers')
  args = parser.parse_args(argv)
  if args.depth < 1:
    parser.error(f'--depth {args.depth}: pass 1 (stem and stages) or more.')
  if args.model not in zoo.MODELS:
    parser.error(f'unknown model {args.model!r}; valid names: {", ".join(zoo.list_models())}')
  size = args.image_size
  if size is None:
    size = 32 if args.model.startswith('cifar') else 224
  overrides = {} if args.num_classes is None else {'num_classes': args.num_classes}
  try:  # the options and image size are the user's; a ValueError past here is a bug
    model = zoo.create_model(args.model, **overrides)
    model.check_input(jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32))
  except ValueError as e:
    parser.error(str(e))
  rows, total, gflops = summarize(args.model, size, **overrides)
  print(format_table(rows, args.depth))
  print(f'\n{args.model} at {size}x{size}: {total:,} parameters, {gflops:.3f} GFLOPs '
        '(multiply-accumulates per image, torchvision convention)')


if __name__ == '__main__':
  main()
