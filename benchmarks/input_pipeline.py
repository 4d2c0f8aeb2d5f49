"""ImageNet preprocessing throughput: images/second and per CPU core, side by side.

    python benchmarks/input_pipeline.py [--images 512] [--batch 64] [--rounds 3]
        [--modes train eval train_v2]

Over the same JPEG files, with the same output size (224), times the project's tf.data
pipeline, its DALI pipeline (CPU decoding here; if `nvidia-dali-cuda120` is installed)
and torchvision's ImageFolder in a DataLoader with one worker per core, for training
(decode, inception crop, flip, resize) and evaluation (resize to 256, center crop 224).
All deliver uint8 batches, to be normalized on the device. Mode 'train_v2' is the
training transform of torchvision's V2 recipe (random resized crop to 176, flip,
TrivialAugmentWide, normalize, random erasing with p=0.1): tf.data with
auto_augment='ta_wide', random_erase=0.1 (uint8; it normalizes on the device) against
torchvision's reference transforms (float32 normalized, as erasing comes after the
normalization there); DALI refuses these keys. Two sets of files:
'synthetic' (500x375, quality 90, smooth content plus noise) and 'photos' (crops and
scalings of scikit-image's sample photographs, 400-600 pixels, quality 75-95; needs
scikit-image). The pipelines alternate rounds; each round starts after the batches a
pipeline had ready (tf.data and DALI start a fresh stream each round, torchvision's
persistent workers drain what they prefetched while the others ran). The table gives
each round's rate, the median, per core and the ratio to torchvision; and, as the host may
be shared, images per CPU-second the pipeline's processes used in the timed batches (this
process's threads, plus the DataLoader's worker processes), a per-core figure that other
users' load changes less.
"""

import argparse
import importlib.util
import itertools
import os
import statistics
import tempfile
import time

import psutil
import torch  # before TensorFlow: importing triton after TensorFlow segfaults
import torchvision
from torchvision import transforms

from common import folder_pipeline, write_jpegs, write_photo_jpegs

SIZE = 224
V2_SIZE = 176  # torchvision's V2 recipe trains at 176
V2_ERASE = 0.1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cpu_seconds(worker_pids=()):
  """CPU seconds used so far by this process and the given worker processes."""
  total = time.process_time()
  for pid in worker_pids:
    times = psutil.Process(pid).cpu_times()
    total += times.user + times.system
  return total


def timed(stream, batch, batches, skip, worker_pids=()):
  """(img/s, img per CPU-second) over `batches` batches of `stream`, after `skip` batches
  (the ones made while the stream started, or while other pipelines were timed)."""
  for _ in range(skip):
    next(stream)
  start, cpu_start = time.perf_counter(), cpu_seconds(worker_pids)
  for _ in range(batches):
    next(stream)
  images = batches * batch
  return (images / (time.perf_counter() - start),
          images / (cpu_seconds(worker_pids) - cpu_start))


def project_round(root, kind, mode, batch, batches):
  """One round of the project's pipeline `kind` ('tf.data' or 'dali'): a fresh stream."""
  if mode == 'train_v2':
    pipeline = folder_pipeline(root, batch, V2_SIZE, kind, auto_augment='ta_wide',
                               random_erase=V2_ERASE)
  else:
    pipeline = folder_pipeline(root, batch, SIZE, kind)
  if mode != 'eval':
    stream = pipeline.train_batches()
  else:  # passes over the files, as an evaluation makes
    _, make = pipeline.eval_batches('train', batch)
    stream = itertools.chain.from_iterable(make() for _ in itertools.count())
  rate = timed(stream, batch, batches, skip=os.cpu_count())
  del stream
  return rate


def torchvision_transform(mode):
  """torchvision's transform for `mode`; 'train_v2' as its classification references'
  ClassificationPresetTrain builds the V2 recipe's (bilinear, TA-wide, erasing 0.1)."""
  if mode == 'train_v2':
    bilinear = transforms.InterpolationMode.BILINEAR
    return transforms.Compose([
        transforms.RandomResizedCrop(V2_SIZE, interpolation=bilinear, antialias=True),
        transforms.RandomHorizontalFlip(), transforms.TrivialAugmentWide(interpolation=bilinear),
        transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float),
        transforms.Normalize(MEAN, STD), transforms.RandomErasing(V2_ERASE)])
  if mode == 'train':
    crop = [transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip()]
  else:
    crop = [transforms.Resize(round(SIZE / 0.875)), transforms.CenterCrop(SIZE)]
  return transforms.Compose(crop + [transforms.PILToTensor()])


def torchvision_stream(root, mode, batch):
  dataset = torchvision.datasets.ImageFolder(root, torchvision_transform(mode))
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
  loader = iter(torch.utils.data.DataLoader(dataset, batch, sampler=sampler,
                                            num_workers=os.cpu_count(), persistent_workers=True,
                                            # fork after TensorFlow's threads start crashes
                                            multiprocessing_context='spawn'))
  return loader, [worker.pid for worker in loader._workers]  # pylint: disable=protected-access


def measure(root, mode, args, kinds):
  """{pipeline: [(img/s, img per CPU-second) per round]}, the pipelines alternating
  rounds."""
  loader, worker_pids = torchvision_stream(root, mode, args.batch)
  prefetched = 2 * os.cpu_count()  # DataLoader's prefetch_factor per worker
  rates = {kind: [] for kind in kinds + ['torchvision']}
  for _ in range(args.rounds):
    for kind in kinds:
      rates[kind].append(project_round(root, kind, mode, args.batch, args.batches))
    rates['torchvision'].append(timed(loader, args.batch, args.batches, skip=prefetched,
                                      worker_pids=worker_pids))
  return rates


MODE_NAMES = {'train': 'training', 'eval': 'evaluation',
              'train_v2': "torchvision V2 recipe's training"}


def print_table(name, mode, rates, cores):
  print(f'\n{name} JPEGs, {MODE_NAMES[mode]} transform')
  print('| pipeline | img/s per round | median img/s | img/s per core | / torchvision '
        '| img per CPU-s per round | median img per CPU-s | / torchvision |')
  print('|---|---|---:|---:|---:|---|---:|---:|')
  theirs = [statistics.median(column) for column in zip(*rates['torchvision'])]
  for kind, values in rates.items():
    label = ('torchvision DataLoader' if kind == 'torchvision' else
             f'resnet_jax ({kind}{", CPU" if kind == "dali" else ""})')
    walls, cpus = zip(*values)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f'| {label} | {" / ".join(f"{v:.0f}" for v in walls)} | {wall:.0f} | '
          f'{wall / cores:.0f} | {wall / theirs[0]:.2f} | '
          f'{" / ".join(f"{v:.0f}" for v in cpus)} | {cpu:.0f} | {cpu / theirs[1]:.2f} |',
          flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20, help='timed batches per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--files', nargs='+', default=['synthetic', 'photos'],
                      choices=['synthetic', 'photos'])
  parser.add_argument('--modes', nargs='+', default=['train', 'eval'], choices=list(MODE_NAMES))
  args = parser.parse_args()
  cores = os.cpu_count()
  kinds = ['tf.data'] + (['dali'] if importlib.util.find_spec('nvidia.dali') else [])
  if 'photos' in args.files and importlib.util.find_spec('skimage') is None:
    parser.error("'photos' needs scikit-image (pip install scikit-image), or --files synthetic.")
  print(f'{cores} CPU cores, {args.images} JPEGs per set, batch {args.batch}, '
        f'{args.batches} batches per round; load average before: {os.getloadavg()[0]:.1f}')
  for name in args.files:
    with tempfile.TemporaryDirectory() as root:
      (write_jpegs if name == 'synthetic' else write_photo_jpegs)(root, args.images)
      for mode in args.modes:
        # DALI does not apply auto_augment / random_erase (config_schema refuses them).
        rates = measure(root, mode, args, kinds if mode != 'train_v2' else ['tf.data'])
        print_table(name, mode, rates, cores)
  print(f'\nload average after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
