"""TPU memory and compile time of our train step against the Flax ImageNet example's,
compiled ahead of time for TPU topologies from this machine (libtpu, no TPU needed).

    python benchmarks/tpu_aot.py [--topologies v5e:2x2 v5p:2x2x1] [--batches 256 128]
        [--models resnet50 resnet50_keep flax_resnet50 resnet152 resnet152_scan ...]

Ours is what `python -m resnet_jax.plan` compiles (configs/imagenet_resnet50.py through
`build_run`, bfloat16, the default model settings); `resnet50_keep` is the same with
`elementwise_remat=False` (the backward pass keeps BatchNorm and ReLU outputs instead of
recomputing them), `resnet50_elementwise_remat` with `elementwise_remat=True`,
`resnet50_remat` with `remat=True` (the memory-saving settings). The reference
is the Flax example's ResNet and train step (google/flax examples/imagenet), written here
to the same architecture and numerics: 'SAME' max-pool, auto-named nn.Conv/nn.BatchNorm in
bfloat16, zero-initialized last BN scale of each block, L2 penalty on every weight with
ndim > 1 added to the loss, SGD with Nesterov momentum 0.9 over a warmup+cosine schedule,
bfloat16 images as its input pipeline makes them. The example pmaps its step; here both
steps are jitted over the same mesh with the state replicated, the batch sharded and the
state donated.

The estimated time is libtpu's cost model (`step_cost.op_cycles`: the sum of the compiled
program's "estimated_cycles" over the chip's clock), not a measurement; "time / Flax"
divides it by the Flax step's. `--by-op` also prints where each step's cycles go, the
ops grouped by the jax operation they come from.

HBM per chip is XLA's accounting of the compiled program (arguments + outputs - donated +
temporaries, no program code), as benchmarks/memory.py counts it; "/ Flax" divides it by
the Flax step's at the same depth, batch and topology in the same run. Traffic is XLA's
estimate of the bytes the step reads and writes (`cost_analysis()['bytes accessed']`).
The "largest batch" column is a linear fit through the first two batch sizes, an
estimate to confirm with `python -m resnet_jax.plan --max-batch`. `--stage-sizes` and
`--image-size` shrink every model (a quick check of the script itself).
"""

import argparse
import functools
import os
import re
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnet_jax import plan  # noqa: E402  (sets libtpu's environment before jax loads)
from resnet_jax.train import step_cost  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.training import train_state  # noqa: E402

from resnet_jax.configs import imagenet_resnet50  # noqa: E402
from resnet_jax.train import parallel  # noqa: E402


# --- The Flax example's ResNet-50, to the same architecture (our code) ---------------------

class FlaxBottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 x4, BN after each, projection when the shape changes."""
  width: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.width, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.width, (3, 3), (self.strides,) * 2)(y)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(4 * self.width, (1, 1))(y))
    if x.shape != y.shape:
      x = self.conv(4 * self.width, (1, 1), (self.strides,) * 2, name='conv_proj')(x)
      x = self.norm(name='norm_proj')(x)
    return nn.relu(x + y)


class FlaxResNet(nn.Module):
  """7x7/2 stem with 3-pixel padding, 'SAME' 3x3/2 max-pool, bottleneck stages, a Dense
  head; convs and BN compute in `dtype` (auto-named, as the example leaves them)."""
  stage_sizes: Sequence[int]
  num_classes: int = 1000
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        x = FlaxBottleneck(64 * 2**stage, 2 if stage and not block else 1, conv, norm)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return jnp.asarray(x, self.dtype)


class FlaxState(train_state.TrainState):
  batch_stats: Any = None


def flax_train_step(state, batch, learning_rate_fn, weight_decay=1e-4):
  """The example's step: cross-entropy + 0.5 * wd * sum of squared weights (ndim > 1)."""

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     batch['image'], mutable=['batch_stats'])
    labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
    loss = optax.softmax_cross_entropy(logits, labels).mean()
    penalty = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params) if w.ndim > 1)
    return loss + 0.5 * weight_decay * penalty, (updates['batch_stats'], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
             'learning_rate': learning_rate_fn(state.step)}
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def flax_schedule(base_lr=0.4, warmup_steps=5 * 1251, total_steps=90 * 1251):
  """Linear warmup to `base_lr`, then cosine to 0 (the example's schedule)."""
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  cosine = optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def plan_flax(stage_sizes, devices, per_device: int, image_size: int) -> 'step_cost.StepPlan':
  mesh = parallel.create_mesh(devices)
  model = FlaxResNet(stage_sizes)
  lr = flax_schedule()
  tx = optax.sgd(lr, momentum=0.9, nesterov=True)
  image = (image_size, image_size, 3)

  def init(rng):
    variables = model.init(rng, jnp.ones((1, *image), jnp.bfloat16), train=False)
    return FlaxState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                            batch_stats=variables['batch_stats'])

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state = jax.eval_shape(jax.jit(init, out_shardings=replicated), jax.random.PRNGKey(0))
  batch_size = per_device * len(devices)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, *image), jnp.bfloat16, sharding=sharded),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded)}
  step = jax.jit(functools.partial(flax_train_step, learning_rate_fn=lr),
                 in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                 donate_argnums=0)
  return step_cost.compile_step('train', step, (state, batch), per_device,
                           per_device * (np.prod(image) * 2 + 4))


def plan_ours(name: str, stage_sizes, devices, per_device: int, image_size: int,
              **overrides) -> 'step_cost.StepPlan':
  config = imagenet_resnet50.get_config()
  config.model = name
  config.model_overrides = ml_collections.ConfigDict(
      {'zero_init_residual': True, 'stage_sizes': tuple(stage_sizes), **overrides})
  config.image_size = image_size
  config.batch_size = config.eval_batch_size = per_device * len(devices)
  return plan.plan_run(config, devices, steps=('train',)).steps[0]


RESNET50, RESNET152 = (3, 4, 6, 3), (3, 8, 36, 3)
# name: (depth, how to compile it for (stage_sizes, devices, batch per chip, image size))
MODELS = {
    'resnet50': (RESNET50, functools.partial(plan_ours, 'resnet50')),
    'resnet50_keep': (RESNET50, functools.partial(plan_ours, 'resnet50',
                                                  elementwise_remat=False)),
    'resnet50_elementwise_remat': (RESNET50, functools.partial(plan_ours, 'resnet50',
                                                               elementwise_remat=True)),
    'resnet50_remat': (RESNET50, functools.partial(plan_ours, 'resnet50', remat=True)),
    'flax_resnet50': (RESNET50, plan_flax),
    'resnet152': (RESNET152, functools.partial(plan_ours, 'resnet152')),
    'resnet152_scan': (RESNET152, functools.partial(plan_ours, 'resnet152', scan_blocks=True)),
    'flax_resnet152': (RESNET152, plan_flax),
}


def step_bytes(step) -> int:
  m = step.memory
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def largest_batch(points, capacity) -> str:
  """The per-chip batch where a line through (batch, bytes) points meets `capacity`."""
  if len(points) < 2:
    return '-'
  (b0, m0), (b1, m1) = sorted(points)[:2]
  per_image = (m1 - m0) / (b1 - b0)
  return f'~{int((capacity - (m0 - per_image * b0)) / per_image)}'


def time_columns(step, devices, flax_cycles) -> str:
  """Estimated M cycles, ms per step, images/s per chip and time / Flax's, as columns."""
  seconds = step_cost.estimated_seconds(step.cycles, devices[0].device_kind)
  if seconds is None:
    return '- | - | - | - |'
  per_chip = plan.images_per_chip(step, devices[0].device_kind,
                                  len(devices) // plan.chip_count(devices))
  ratio = f'{step.cycles / flax_cycles:.2f}x' if flax_cycles else '-'
  return (f'{step.cycles / 1e6:.1f} | {seconds * 1e3:.1f} | {per_chip:,.0f} | {ratio} |')


def op_group(op) -> str:
  """The jax operation an op comes from, and whether it is BatchNorm's (module 'bn*' or a
  projection's norm): 'conv_general_dilated', 'bn reduce_sum', 'add', ..."""
  path = op.op_name.split('/')
  primitive = re.sub(r'\[.*', '', path[-1]) if op.op_name else f'({op.opcode})'
  norm = any(re.fullmatch(r'(bn\d*|BatchNorm_\d+|norm_proj|downsample)', p.split('.')[0])
             for p in path[:-1])
  if primitive == 'reduce_sum' and norm:
    return 'bn reduce_sum'
  return primitive


def print_by_op(step, top: int = 12):
  groups = {}
  for op in step.ops:
    cycles, count = groups.get(op_group(op), (0, 0))
    groups[op_group(op)] = (cycles + op.cycles * op.count, count + op.count)
  print(f'    {"ops (by jax operation)":<28} {"M cycles":>9} {"ops":>5}')
  for name, (cycles, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f'    {name:<28} {cycles / 1e6:9.2f} {count:5d}')
  if step.cycles_note:
    print(f'    ({step.cycles_note})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topologies', nargs='+', default=['v5e:2x2'])
  parser.add_argument('--batches', nargs='+', type=int, default=[256, 128])
  parser.add_argument('--models', nargs='+', default=['resnet50', 'flax_resnet50'],
                      choices=sorted(MODELS))
  parser.add_argument('--stage-sizes', nargs='+', type=int,
                      help='blocks per stage for every model (default: each its own)')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--by-op', action='store_true',
                      help="print each step's estimated cycles grouped by jax operation")
  args = parser.parse_args()
  print(f'jax {jax.__version__}, libtpu compile-only; HBM per chip = arguments + outputs - '
        'donated + temporaries', flush=True)
  print('| topology | model | batch/chip | compile s | HBM GiB/chip | of chip | / Flax | '
        'traffic GB/step | largest batch/chip (est., 90% of HBM) | est. M cycles | '
        'est. ms/step | est. img/s/chip | time / Flax |')
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|', flush=True)
  for topology in args.topologies:
    devices = plan.topology_devices(topology)
    capacity = plan.HBM_PER_CHIP[devices[0].device_kind]
    flax_bytes, flax_cycles = {}, {}  # (depth, batch per chip) -> the Flax step's
    for name in sorted(args.models, key=lambda name: not name.startswith('flax')):
      stage_sizes, compile_step = MODELS[name]
      stage_sizes = tuple(args.stage_sizes or stage_sizes)
      points = []
      for per_device in args.batches:
        start = time.perf_counter()
        step = compile_step(stage_sizes, devices, per_device, args.image_size)
        seconds = time.perf_counter() - start
        if step.memory is None:
          print(f'| {topology} | {name} | {per_device} | {seconds:.0f} | out of HBM | - | - | '
                f'- | - | <!-- {step.error} -->', flush=True)
          continue
        used = step_bytes(step)
        points.append((per_device, used))
        if name.startswith('flax'):
          flax_bytes[stage_sizes, per_device] = used
          flax_cycles[stage_sizes, per_device] = step.cycles
        reference = flax_bytes.get((stage_sizes, per_device))
        ratio = f'{used / reference:.2f}x' if reference else '-'
        estimate = largest_batch(points, 0.9 * capacity) if len(points) == 2 else ''
        print(f'| {topology} | {name} | {per_device} | {step.compile_s:.0f} | '
              f'{used / 2**30:.2f} | {used / capacity:.0%} | {ratio} | '
              f'{step.bytes_accessed / 1e9:.1f} | {estimate} | '
              + time_columns(step, devices, flax_cycles.get((stage_sizes, per_device))),
              flush=True)
        if args.by_op:
          print_by_op(step)


if __name__ == '__main__':
  main()
