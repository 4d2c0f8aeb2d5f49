"""The GPU check for a lent device: one table of speed, memory, largest batch and parity.

    python benchmarks/gpu_check.py [--batch 256] [--steps 10] [--out DIR]
    python benchmarks/gpu_check.py --tiny [--variants default torch ...]   # toy sizes, CPU

In one run, about 6 minutes on an H100 (a time budget skips what is left, saying so):
* ResNet-50 train steps in bfloat16 at --batch, images/second and peak device memory:
  resnet_jax's default step and each memory-saving setting (`elementwise_remat` False and
  True, `remat`), the Flax ImageNet example's step (benchmarks/tpu_aot.py's, to its
  architecture and numerics), PyTorch AMP bfloat16 channels_last, eager and torch.compile
  (benchmarks/train_throughput.py's). Each runs in its own process, so its peak memory
  (jax: `memory_stats()['peak_bytes_in_use']`, torch: `max_memory_allocated()`) is its own;
  the rate is the median of --rounds timed rounds after two warm-up steps.
* The largest batch of resnet_jax's default step: --batch and twice it, then where the line
  through the points meets the limit, then bisection to a multiple of 32, by XLA's accounting of the compiled program (arguments + outputs -
  donated + temporaries, as benchmarks/memory.py counts) against the memory jax may use
  (`bytes_limit`, with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95); the found batch then runs.
* Float32 logits of a torchvision ResNet-50 (random weights, random BatchNorm statistics)
  converted to resnet_jax: on the GPU against the CPU (within 1e-3, at 'highest' matmul
  precision and, for information, at the default one, which may use TF32).

The table goes to stdout and to DIR/gpu_check.md (DIR: --out, else $OUT, else the current
directory). Nothing here imports TensorFlow: the device image has none.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

# name: the train step it times (a resnet_jax override set, the Flax example, or PyTorch).
# In this order, so that a spent time budget skips the least needed; a resnet_jax setting
# that is the default's is not timed twice.
VARIANTS = {  # --variants name: (table label, kind, options)
    'default': ('resnet_jax default', 'jax', {}),
    'flax': ('Flax example', 'flax', {}),
    'torch': ('PyTorch AMP channels_last, eager', 'torch', {'compiled': False}),
    'torch.compile': ('PyTorch AMP channels_last, torch.compile', 'torch', {'compiled': True}),
    'elementwise_remat=False': ('resnet_jax elementwise_remat=False', 'jax',
                                {'elementwise_remat': False}),
    'elementwise_remat=True': ('resnet_jax elementwise_remat=True', 'jax',
                               {'elementwise_remat': True}),
    'remat': ('resnet_jax remat=True', 'jax', {'remat': True}),
}
MEMORY_FIELDS = ('elementwise_remat', 'remat', 'scan_blocks')
RESULT = 'RESULT '  # a worker's last line: RESULT {json}
TENSORFLOW_SEEN = []  # the workers that found TensorFlow imported (the device has none)
MEM_FRACTION = '0.95'


def sizes(tiny: bool) -> dict:
  """Model, image size and stage sizes: ResNet-50 at 224, or a toy one on the CPU."""
  if tiny:
    return {'jax_model': 'resnet50', 'stage_sizes': (1, 1, 1, 1), 'torch_model': 'resnet18',
            'arch': 'resnet18', 'image': 32}
  return {'jax_model': 'resnet50', 'stage_sizes': (3, 4, 6, 3), 'torch_model': 'resnet50',
          'arch': 'resnet50', 'image': 224}


# --- workers (each in its own process) ------------------------------------------------------

def timed_rounds(run, batch, steps, rounds):
  """(compile+first step s, [img/s per round]) after two warm-up steps."""
  start = time.perf_counter()
  run(1)
  first = time.perf_counter() - start
  run(1)
  rates = []
  for _ in range(rounds):
    start = time.perf_counter()
    run(steps)
    rates.append(steps * batch / (time.perf_counter() - start))
  return first, rates


def jax_device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  return f'{device.platform} {device.device_kind}, jax {jax.__version__}'


def jax_peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def flax_runner(batch, size, stage_sizes):
  """The Flax example's step (tpu_aot's model, schedule and step) on one synthetic batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import tpu_aot  # pylint: disable=g-import-not-at-top
  model, lr = tpu_aot.FlaxResNet(tuple(stage_sizes)), tpu_aot.flax_schedule()
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), jnp.ones((1, size, size, 3), jnp.bfloat16))
  state = tpu_aot.FlaxState.create(apply_fn=model.apply, params=variables['params'],
                                   tx=optax.sgd(lr, momentum=0.9, nesterov=True),
                                   batch_stats=variables['batch_stats'])
  step = jax.jit(functools.partial(tpu_aot.flax_train_step, learning_rate_fn=lr),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.bfloat16)
  data = {'image': images, 'label': jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)}
  holder = [state]

  def run(steps):
    for _ in range(steps):
      holder[0], metrics = step(holder[0], data)
    jax.block_until_ready(metrics)

  return run


def throughput_worker(args) -> dict:
  """Times one VARIANTS entry at --batch; its img/s per round and peak memory."""
  _, kind, options = VARIANTS[args.variant]
  size = sizes(args.tiny)
  if kind == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    from train_throughput import torch_runner  # pylint: disable=g-import-not-at-top
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
      torch.backends.cudnn.benchmark = True
    elif options['compiled'] and args.tiny:  # dynamo's tracing, not a C++ build on a CPU
      torch_runner = _eager_backend(torch_runner)
    run = torch_runner(size['torch_model'], args.batch, size['image'], 'bfloat16', device,
                       options['compiled'])
    first, rates = timed_rounds(run, args.batch, args.steps, args.rounds)
    peak = torch.cuda.max_memory_allocated() if device == 'cuda' else None
    name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  else:
    if kind == 'flax':
      run = flax_runner(args.batch, size['image'], size['stage_sizes'])
    else:
      from common import jax_runner  # pylint: disable=g-import-not-at-top
      run = jax_runner(size['jax_model'], args.batch, size['image'], 'bfloat16',
                       stage_sizes=size['stage_sizes'], **options)
    first, rates = timed_rounds(run, args.batch, args.steps, args.rounds)
    peak = jax_peak_bytes()
    name = jax_device_name()
  return {'first_s': first, 'rates': rates, 'peak_bytes': peak, 'device': name}


def _eager_backend(torch_runner):
  """torch_runner whose torch.compile uses dynamo's 'eager' backend (the --tiny CPU run)."""
  import torch  # pylint: disable=g-import-not-at-top

  def runner(*args):
    compile_ = torch.compile
    torch.compile = functools.partial(compile_, backend='eager')
    try:
      return torch_runner(*args)
    finally:
      torch.compile = compile_

  return runner


def program_bytes(batch, size) -> int:
  """XLA's accounting of resnet_jax's default train step at `batch`, compiled only."""
  from common import lowered_train_step  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  m = lowered_train_step(size['jax_model'], batch, size['image'], dtype=jnp.bfloat16,
                         stage_sizes=size['stage_sizes']).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def largest_batch_worker(args) -> dict:
  """The largest multiple of 32 (2 with --tiny) whose compiled default step fits the memory
  jax may use (`bytes_limit`; --limit-mib; with --tiny on a CPU, the memory of 2.5 x --batch
  more images than --batch, by the first two points): --batch and twice it, then the batch
  where the line through the last two points meets the limit (memory grows linearly with
  the batch), bisecting once a batch does not fit."""
  import jax  # pylint: disable=g-import-not-at-top
  size = sizes(args.tiny)
  unit, deadline = (2 if args.tiny else 32), time.monotonic() + args.budget_s
  tried = {batch: program_bytes(batch, size) for batch in (args.batch, 2 * args.batch)}
  limit = (args.limit_mib * 2**20 if args.limit_mib else
           (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit'))
  if not limit and args.tiny:
    limit = tried[args.batch] + 2.5 * (tried[2 * args.batch] - tried[args.batch])
  if not limit:
    return {'error': 'no memory limit known on this device (give --limit-mib)'}
  fitting = [batch for batch, used in tried.items() if used <= limit]
  low = max(fitting, default=0)
  high = min((batch for batch in tried if batch not in fitting), default=None)

  def estimate():
    (b0, m0), (b1, m1) = sorted(tried.items())[-2:]
    per_image = (m1 - m0) / (b1 - b0)
    return int((limit - m0) / per_image + b0) // unit * unit if per_image > 0 else 0

  while (high is None or high - low > unit) and time.monotonic() < deadline:
    if high is None:  # the line's batch, or the next one where the line says low is it
      guess = max(estimate(), low + unit)
    else:
      guess = (low + high) // 2 // unit * unit
    tried[guess] = program_bytes(guess, size)
    low, high = (guess, high) if tried[guess] <= limit else (low, guess)
  return {'batch': low, 'limit_bytes': limit, 'bytes': tried.get(low),
          'tried': {str(k): v for k, v in sorted(tried.items())},
          'complete': high is not None and high - low <= unit}


def parity_worker(args) -> dict:
  """Max |logit difference| of a converted torchvision model: GPU against CPU (float32)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from resnet_jax import create_model  # pylint: disable=g-import-not-at-top
  from resnet_jax.convert import torch_reference_model, torch_to_flax  # pylint: disable=g-import-not-at-top
  size = sizes(args.tiny)
  torch.manual_seed(0)
  reference = torch_reference_model(size['arch'])
  for module in reference.modules():  # BatchNorm statistics that change the logits
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.uniform_(-0.5, 0.5)
      module.running_var.uniform_(0.5, 2.0)
      module.weight.data.uniform_(0.5, 1.5)
  variables = torch_to_flax(reference.state_dict(), size['arch'])
  model = create_model(size['arch'])
  images = np.random.default_rng(0).standard_normal(
      (4, size['image'], size['image'], 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  def logits(device, precision):
    with jax.default_device(device), jax.default_matmul_precision(precision):
      apply = jax.jit(functools.partial(model.apply, train=False))
      return np.asarray(apply(jax.device_put(variables, device), jax.device_put(images, device)))

  accelerator, cpu = jax.devices()[0], jax.devices('cpu')[0]
  on_cpu = logits(cpu, 'highest')
  return {'device': accelerator.device_kind,
          'highest': float(np.max(np.abs(logits(accelerator, 'highest') - on_cpu))),
          'default': float(np.max(np.abs(logits(accelerator, 'default') - on_cpu))),
          'cpu_vs_torch': float(np.max(np.abs(on_cpu - expected))),
          'logit_scale': float(np.max(np.abs(expected)))}


WORKERS = {'throughput': throughput_worker, 'largest_batch': largest_batch_worker,
           'parity': parity_worker}


# --- the parent: runs each worker in a process, prints and writes the table ----------------

def in_process(args, task, timeout, **extra) -> dict:
  """Runs worker `task` in a fresh Python process; its result, or {'error': ...}."""
  argv = [sys.executable, os.path.abspath(__file__), '--worker', task, '--batch',
          str(args.batch), '--steps', str(args.steps), '--rounds', str(args.rounds),
          '--budget-s', str(int(timeout * 0.8))]
  argv += ['--tiny'] * args.tiny + (['--limit-mib', str(args.limit_mib)] if args.limit_mib else [])
  argv += [x for key, value in extra.items() for x in (f'--{key}', str(value))]
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=MEM_FRACTION)
  if args.tiny:
    env.setdefault('JAX_PLATFORMS', 'cpu')
  if task == 'largest_batch':  # compiled only: skip autotuning the convolutions
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0').strip()
  try:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'over its {timeout:.0f} s'}
  lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
  if not lines:
    reason = (done.stderr.strip().splitlines() or ['no output'])[-1]
    return {'error': f'exit {done.returncode}: {reason[:160]}'}
  result = json.loads(lines[-1][len(RESULT):])
  if result.get('tensorflow'):
    TENSORFLOW_SEEN.append(f'{task} {extra}')
  return result


def gib(value) -> str:
  return '-' if value is None else f'{value / 2**30:.2f}'


def rate_text(rate) -> str:
  """Images/second, to the unit on a GPU, to 2 digits for the toy CPU rates."""
  return f'{rate:.0f}' if rate >= 100 else f'{rate:.2g}'


def mib(value) -> str:
  return f'{value / 2**20:.1f}'


def same_as_default(options, tiny) -> bool:
  """Whether resnet_jax `options` build the default's step (its memory-saving fields)."""
  import resnet_jax  # pylint: disable=g-import-not-at-top  (no device is touched)
  name = sizes(tiny)['jax_model']
  default, model = resnet_jax.create_model(name), resnet_jax.create_model(name, **options)
  return all(getattr(model, f, None) == getattr(default, f, None) for f in MEMORY_FIELDS)


def throughput_rows(args, deadline) -> tuple:
  """(table rows, device name) of every VARIANTS entry, each in its own process."""
  rows, reference, device = [], None, ''
  for variant in args.variants:
    name, kind, options = VARIANTS[variant]
    left = deadline - time.monotonic()
    if kind == 'jax' and options and same_as_default(options, args.tiny):
      rows.append(f'| {name} | = resnet_jax default | | | |')
      continue
    if left < 20:
      rows.append(f'| {name} | skipped: time budget spent | | | |')
      continue
    result = in_process(args, 'throughput', min(left, args.variant_timeout_s),
                        variant=variant)
    if 'error' in result:
      rows.append(f'| {name} | {result["error"]} | | | |')
      continue
    rate = statistics.median(result['rates'])
    reference = rate if variant == 'default' else reference
    device = device or result['device']
    rows.append(f'| {name} | {rate_text(rate)} '
                f'({" / ".join(rate_text(r) for r in result["rates"])}) '
                f'| {f"{rate / reference:.2f}" if reference else "-"} | '
                f'{gib(result["peak_bytes"])} | {result["first_s"]:.0f} |')
  return rows, device


def largest_batch_line(args, deadline) -> str:
  found = in_process(args, 'largest_batch', max(30, deadline - time.monotonic()))
  if 'error' in found:
    return f'Largest batch: {found["error"]}'
  ran = 'not run: time budget spent'
  if found['batch'] and deadline + 60 - time.monotonic() > 30:  # 3 steps, with autotuning
    confirm = in_process(args, 'throughput', deadline + 60 - time.monotonic(),
                         variant='default', batch=found['batch'],
                         steps=1 if args.tiny else 3, rounds=1)
    ran = (f'ran at {rate_text(statistics.median(confirm["rates"]))} img/s, peak '
           f'{gib(confirm["peak_bytes"])} GiB' if 'error' not in confirm else
           f'did not run: {confirm["error"]}')
  tried = ', '.join(f'{b}: {mib(v)}' for b, v in found['tried'].items())
  return (f'Largest batch of resnet_jax default: {found["batch"]} '
          f'({"" if found["complete"] else "search cut short; "}XLA MiB at each batch tried: '
          f'{tried}; limit {mib(found["limit_bytes"])} MiB); {ran}')


def parity_line(args, timeout) -> str:
  parity = in_process(args, 'parity', timeout)
  if 'error' in parity:
    return f'Converted-model parity: {parity["error"]}'
  verdict = 'PASS' if parity['highest'] <= 1e-3 else 'FAIL'
  return (f'Converted torchvision {sizes(args.tiny)["arch"]}, float32 logits (max |logit| '
          f'{parity["logit_scale"]:.2f}), {parity["device"]} against CPU: max |diff| '
          f'{parity["highest"]:.2e} at highest precision ({verdict}, limit 1e-3), '
          f'{parity["default"]:.2e} at default precision; CPU against torch '
          f'{parity["cpu_vs_torch"]:.2e}')


def report(args) -> str:
  """Runs everything within about --budget-s and returns the table (markdown). This
  process touches no device: the workers have it to themselves."""
  start = time.monotonic()
  size, model = sizes(args.tiny), 'toy ResNet' if args.tiny else 'ResNet-50'
  # The last 190 s (on a GPU): 80 s to search the largest batch, 60 to run it, 50 parity.
  rows, device = throughput_rows(args, start + args.budget_s - 190 * (not args.tiny))
  largest = largest_batch_line(args, start + args.budget_s - 110 * (not args.tiny))
  parity = parity_line(args, max(45, start + args.budget_s - time.monotonic()))
  return '\n'.join([
      f'# gpu_check: {device}, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}', '',
      f'{model} train step, bfloat16, batch {args.batch}, image {size["image"]}, '
      f'{args.steps} steps x {args.rounds} rounds', '',
      '| step | img/s median (rounds) | / resnet_jax default | peak GiB | '
      'compile + first step s |', '|---|---:|---:|---:|---:|', *rows, '', largest, '',
      parity, '', f'TensorFlow imported: {"; ".join(TENSORFLOW_SEEN) or "by no worker"}. '
      f'({time.monotonic() - start:.0f} s)'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', default=bool(os.environ.get('GPU_CHECK_TINY')),
                      help='toy sizes, for a CPU (also env GPU_CHECK_TINY=1)')
  parser.add_argument('--batch', type=int, default=None, help='default 256 (--tiny: 4)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--budget-s', type=float, default=None,
                      help='wall-clock budget, default 450 (--tiny: 3600); what is left after '
                      'it is skipped')
  parser.add_argument('--variant-timeout-s', type=float, default=None,
                      help='the most one timed step may take, default 150 (--tiny: 900)')
  parser.add_argument('--limit-mib', type=int, default=None,
                      help='memory limit of the largest-batch search (default: the device)')
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS),
                      help='the train steps to time (default: all)')
  parser.add_argument('--variant', choices=sorted(VARIANTS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.batch = args.batch or (4 if args.tiny else 256)
  args.steps = args.steps or (1 if args.tiny else 10)
  args.budget_s = args.budget_s or (3600 if args.tiny else 450)
  args.variant_timeout_s = args.variant_timeout_s or (900 if args.tiny else 150)
  if args.worker:
    result = WORKERS[args.worker](args)
    result['tensorflow'] = 'tensorflow' in sys.modules
    print(RESULT + json.dumps(result), flush=True)
    return
  table = report(args)
  print(table, flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'gpu_check.md'), 'w') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  main()
