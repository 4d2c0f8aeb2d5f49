"""Peak memory of one train step, with and without rematerialization.

    python benchmarks/memory.py [--batch 32] [--models resnet50 resnet152 cifar_resnet110]

Device figures are XLA's own accounting of the compiled step (arguments + outputs +
temporaries - donated aliases), the memory the step needs on any backend (on the CPU the
device is the host). The last line gives this process's peak resident set, compiles
included.
"""

import argparse
import resource

from common import image_size, lowered_train_step, versions


def step_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['resnet50', 'resnet152', 'cifar_resnet110'])
  parser.add_argument('--batch', type=int, default=32)
  args = parser.parse_args()
  print(versions(), f'batch {args.batch}')
  print('| model | step memory MiB | with remat MiB | remat / plain | temporaries MiB | '
        'with remat MiB |')
  print('|---|---:|---:|---:|---:|---:|')
  for name in args.models:
    compiled = [lowered_train_step(name, args.batch, image_size(name), scan_blocks=True,
                                   remat=remat).compile() for remat in (False, True)]
    total = [step_bytes(c) / 2**20 for c in compiled]
    temp = [c.memory_analysis().temp_size_in_bytes / 2**20 for c in compiled]
    print(f'| {name} | {total[0]:.0f} | {total[1]:.0f} | {total[1] / total[0]:.2f} | '
          f'{temp[0]:.0f} | {temp[1]:.0f} |', flush=True)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  print(f'host peak resident set of this process: {peak:.0f} MiB')


if __name__ == '__main__':
  main()
