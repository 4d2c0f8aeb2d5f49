"""Training images/second: the project's train step against PyTorch, side by side.

    python benchmarks/train_throughput.py                      # CPU defaults
    python benchmarks/train_throughput.py --models resnet50 --batch 256 --dtype bfloat16
    python benchmarks/train_throughput.py --models resnet50 --batch 256 --dtype bfloat16 \
        --real-data   # also the JAX step fed by the real input pipeline

Both frameworks train the same architecture (torchvision's for the ImageNet family, a
PyTorch CIFAR ResNet defined below for the CIFAR nets) with SGD + momentum on the same
synthetic batch, size and precision, using the same threads; on a GPU PyTorch runs
channels_last with cuDNN's autotuning on, as XLA autotunes its convolutions. The JAX step
normalizes uint8 pixels on the device, as in train.py; PyTorch gets float images,
normalized before the step as its DataLoader workers would. After warm-up the two are
timed in alternating rounds; the table gives the median of each and the ratio
JAX / PyTorch (above 1: JAX is faster). With --real-data the JAX step is also timed fed
by the project's ImageNet training pipeline (decode JPEG, inception crop, flip, resize;
copies two steps ahead, as train.py does) over JPEG files the script writes: if that
figure falls short of the synthetic one, the input pipeline is the bottleneck. --real-data
also times each input pipeline alone on those files (tf.data, DALI on the CPU if installed,
torchvision's DataLoader; alternating rounds, as benchmarks/input_pipeline.py) and prints
the host cores each needs to feed --feed-rate images/s (default: an 8-GPU node at 3,000
images/s per GPU).
"""

import argparse
import importlib.util
import math
import os
import statistics
import tempfile
import time

import jax
import torch
import torchvision

import input_pipeline
from common import image_size, jax_runner, write_jpegs
from resnet_jax.train import host_memory

DEFAULT_BATCH = {'cifar_resnet20': 128, 'cifar_resnet56': 128, 'resnet18': 32, 'resnet50': 16}


# --- PyTorch reference nets -------------------------------------------------------------


class TorchCifarBlock(torch.nn.Module):
  """The paper's basic block with shortcut option A (as in the widely used reference)."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.pad = planes - in_planes
    self.stride = stride

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x[:, :, ::self.stride, ::self.stride]
    if self.pad:
      shortcut = torch.nn.functional.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad // 2))
    return torch.relu(out + shortcut)


def torch_cifar_resnet(depth, num_classes=10):
  n = (depth - 2) // 6
  layers, in_planes = [], 16
  for planes, stride in ((16, 1), (32, 2), (64, 2)):
    for i in range(n):
      layers.append(TorchCifarBlock(in_planes, planes, stride if i == 0 else 1))
      in_planes = planes
  return torch.nn.Sequential(
      torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
      *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, num_classes))


def torch_model(name):
  if name.startswith('cifar_resnet'):
    return torch_cifar_resnet(int(name[len('cifar_resnet'):]))
  return getattr(torchvision.models, name)()


# --- the two timed loops ----------------------------------------------------------------


def torch_runner(name, batch, size, dtype, device, compiled):
  model = torch_model(name).to(device)
  memory_format = torch.channels_last if device == 'cuda' else torch.contiguous_format
  model = model.to(memory_format=memory_format).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  images = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
  labels = torch.randint(0, 10 if name.startswith('cifar') else 1000, (batch,), device=device)
  amp_dtype = torch.bfloat16 if dtype == 'bfloat16' else None

  def step():
    with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  step = torch.compile(step) if compiled else step

  def run(steps):
    for _ in range(steps):
      loss = step()
    loss.item()  # waits for the device

  return run


def images_per_second(run, steps, batch):
  start = time.perf_counter()
  run(steps)
  return steps * batch / (time.perf_counter() - start)


def measure(runners, batch, steps, rounds):
  """Warm every runner up, then time them in alternating rounds; medians per runner."""
  for run in runners.values():
    run(2)
  results = {label: [] for label in runners}
  for _ in range(rounds):
    for label, run in runners.items():
      results[label].append(images_per_second(run, steps, batch))
  return {label: statistics.median(r) for label, r in results.items()}


def compare(name, args, device, image_folder):
  """Times `name` in JAX and PyTorch (and fed by the input pipeline over JPEG files
  written to `image_folder`, with --real-data) and prints its table rows."""
  size = image_size(name)
  batch = args.batch or DEFAULT_BATCH.get(name, 32)
  runners = {'jax': jax_runner(name, batch, size, args.dtype),
             'torch': torch_runner(name, batch, size, args.dtype, device, False)}
  if args.torch_compile:
    runners['torch.compile'] = torch_runner(name, batch, size, args.dtype, device, True)
  if args.real_data and size == 224:  # one epoch for all rounds; a tenth is held out
    write_jpegs(image_folder, batch * (args.steps * args.rounds + 4) * 10 // 9 + 10)
    runners['jax, real data'] = jax_runner(name, batch, size, args.dtype, image_folder)
  result = measure(runners, batch, args.steps, args.rounds)
  for label in [k for k in result if not k.startswith('jax')]:
    print(f'| {name} ({label}) | {batch} | {size} | {result["jax"]:.1f} | '
          f'{result[label]:.1f} | {result["jax"] / result[label]:.2f} |', flush=True)
  if 'jax, real data' in result:
    print(f'| {name} (JAX fed by the input pipeline) | {batch} | {size} | '
          f'{result["jax, real data"]:.1f} | | {result["jax, real data"] / result["jax"]:.2f}'
          f' of synthetic |', flush=True)


def print_feeding_cores(image_folder, args):
  """Per pipeline: training images/s per host core on `image_folder`, and the cores it
  needs for --feed-rate."""
  kinds = ['tf.data'] + (['dali'] if importlib.util.find_spec('nvidia.dali') else [])
  options = argparse.Namespace(batch=args.feed_batch, batches=args.feed_batches,
                               rounds=args.rounds)
  rates = input_pipeline.measure(image_folder, True, options, kinds)
  cores = os.cpu_count()
  print(f'\nHost cores to feed {args.feed_rate} img/s (training transform, 224x224, '
        f'{cores} cores measured)')
  print('| pipeline | img/s per core | cores needed | img per CPU-s | cores needed (CPU-s) |')
  print('|---|---:|---:|---:|---:|')
  for kind, values in rates.items():
    walls, cpus = zip(*values)
    per_core, per_cpu_second = statistics.median(walls) / cores, statistics.median(cpus)
    print(f'| {kind} | {per_core:.0f} | {math.ceil(args.feed_rate / per_core)} | '
          f'{per_cpu_second:.0f} | {math.ceil(args.feed_rate / per_cpu_second)} |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+',
                      default=['cifar_resnet20', 'cifar_resnet56', 'resnet18', 'resnet50'])
  parser.add_argument('--batch', type=int, default=None, help='default: per model, CPU-sized')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=5, help='steps per timed round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--torch-compile', action='store_true', help='also torch.compile')
  parser.add_argument('--real-data', action='store_true',
                      help='also JAX fed by the input pipeline over JPEG files (224x224 models)')
  parser.add_argument('--feed-rate', type=float, default=24000,
                      help='with --real-data: img/s to feed (8 GPUs x 3000 img/s)')
  parser.add_argument('--feed-batch', type=int, default=64,
                      help='with --real-data: batch size of the input pipelines alone')
  parser.add_argument('--feed-batches', type=int, default=10,
                      help='with --real-data: timed batches per round of each input pipeline')
  args = parser.parse_args()
  if args.real_data and importlib.util.find_spec('tensorflow') is None:
    parser.error("--real-data times the project's tf.data pipeline, which needs TensorFlow: "
                 "pip install -e '.[train]', or leave --real-data out.")
  if host_memory.cpu_only_host():
    host_memory.keep_freed_memory()  # as train.py does; PyTorch runs in this process too

  device = 'cuda' if torch.cuda.is_available() and jax.default_backend() == 'gpu' else 'cpu'
  torch.set_num_threads(os.cpu_count())
  torch.backends.cudnn.benchmark = True  # autotuned convolutions, as XLA's are
  print(f'jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), '
        f'torch {torch.__version__} ({device}, {torch.get_num_threads()} threads), '
        f'dtype {args.dtype}')
  print('| model | batch | image | JAX img/s | PyTorch img/s | JAX / PyTorch |')
  print('|---|---:|---:|---:|---:|---:|')
  with tempfile.TemporaryDirectory() as scratch:  # JPEG files for --real-data
    for name in args.models:
      compare(name, args, device, os.path.join(scratch, name))
    if args.real_data:
      folder = os.path.join(scratch, 'feeding')
      write_jpegs(folder, max(256, args.feed_batch * 8))
      print_feeding_cores(folder, args)


if __name__ == '__main__':
  main()
