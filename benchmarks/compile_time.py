"""Seconds to compile the train step, with and without scanning the blocks of each stage.

    python benchmarks/compile_time.py [--models resnet50 resnet152 cifar_resnet110]

The compilation cache is disabled here so every figure is a cold compile.
"""

import argparse
import time

import jax

from common import abstract_train_state, image_size, lowered_train_step, versions


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['resnet50', 'resnet152', 'cifar_resnet110'])
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  print(versions())
  print('| model | trace+lower s (unrolled) | compile s (unrolled) | trace+lower s (scan) '
        '| compile s (scan) | speed-up |')
  print('|---|---:|---:|---:|---:|---:|')
  for name in args.models:
    seconds = []
    for scan in (False, True):
      size = image_size(name)
      _, state = abstract_train_state(name, args.batch, size, scan_blocks=scan)
      start = time.perf_counter()  # the step only: the state's shapes are traced above
      lowered = lowered_train_step(name, args.batch, size, state)
      lowered_at = time.perf_counter()
      lowered.compile()
      seconds += [lowered_at - start, time.perf_counter() - lowered_at]
    print(f'| {name} | {seconds[0]:.1f} | {seconds[1]:.1f} | {seconds[2]:.1f} | '
          f'{seconds[3]:.1f} | {(seconds[0] + seconds[1]) / (seconds[2] + seconds[3]):.1f}x |',
          flush=True)


if __name__ == '__main__':
  main()
