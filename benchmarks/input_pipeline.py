"""ImageNet training preprocessing throughput: images/second and per CPU core.

    python benchmarks/input_pipeline.py [--images 512] [--batch 64]

Writes a folder of real JPEG files (500x375, quality 90, smooth synthetic content so that
decoding costs what a photo costs), then times the project's tf.data training pipeline
(decode JPEG, inception crop, flip, resize to 224) against torchvision's ImageFolder +
RandomResizedCrop + flip + PILToTensor in a DataLoader with one worker per core, both
over the same files. Both deliver uint8 batches, to be normalized on the device.
"""

import argparse
import os
import tempfile
import time

import torch  # before TensorFlow: importing triton after TensorFlow segfaults
import torchvision
from torchvision import transforms

from common import folder_pipeline, write_jpegs


def images_per_second(stream, batch, batches):
  """Steady-state rate: the first batches, made while the workers started up side by side
  and ready at once, are not timed."""
  for _ in range(os.cpu_count()):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * batch / (time.perf_counter() - start)


def time_project(root, batch, batches):
  stream = folder_pipeline(root, batch, 224).train_batches()
  rate = images_per_second(stream, batch, batches)
  stream.close()
  return rate


def time_torchvision(root, batch, batches):
  transform = transforms.Compose([
      transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
      transforms.PILToTensor()])
  dataset = torchvision.datasets.ImageFolder(root, transform)
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
  loader = iter(torch.utils.data.DataLoader(dataset, batch, sampler=sampler,
                                            num_workers=os.cpu_count(), persistent_workers=True,
                                            # fork after TensorFlow's threads start crashes
                                            multiprocessing_context='spawn'))
  return images_per_second(loader, batch, batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20)
  args = parser.parse_args()
  cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    ours = time_project(root, args.batch, args.batches)
    theirs = time_torchvision(root, args.batch, args.batches)
  print(f'{cores} CPU cores, {args.images} JPEGs of 500x375, batch {args.batch}')
  print('| pipeline | img/s | img/s per core |')
  print('|---|---:|---:|')
  print(f'| resnet_jax (tf.data) | {ours:.0f} | {ours / cores:.0f} |')
  print(f'| torchvision DataLoader ({cores} workers) | {theirs:.0f} | {theirs / cores:.0f} |')
  print(f'ratio resnet_jax / torchvision: {ours / theirs:.2f}')


if __name__ == '__main__':
  main()
