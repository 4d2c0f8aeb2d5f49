"""What the backward pass keeps: memory and speed of one train step for each remat setting.

    python benchmarks/memory.py [--batch 32] [--models resnet50 resnet152 cifar_resnet110]
        [--time --steps 3 --rounds 3]

Three settings of the model: the default (elementwise_remat=False: the backward pass
keeps BatchNorm and ReLU outputs), `elementwise` (elementwise_remat=True: it keeps
convolution outputs and recomputes the elementwise rest) and `remat=True` (it recomputes
whole blocks). Memory figures are XLA's own accounting of the compiled step (arguments +
outputs + temporaries - donated aliases), the memory the step needs on any backend (on
the CPU the device is the host). With --time the three steps are also timed on this
backend in alternating rounds (median milliseconds per step). The last line gives this
process's peak resident set, compiles included.
"""

import argparse
import itertools
import resource
import statistics
import time

import jax

from common import image_size, jax_runner, lowered_train_step, versions

SETTINGS = {'default': {}, 'elementwise': dict(elementwise_remat=True),
            'remat': dict(remat=True)}


def step_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def milliseconds_per_step(name, batch, steps, rounds):
  """Median ms per step of each setting, timed in alternating rounds after a warm-up."""
  runners = {label: jax_runner(name, batch, image_size(name), scan_blocks=True, **overrides)
             for label, overrides in SETTINGS.items()}
  times = {label: [] for label in runners}
  for run in runners.values():
    run(1)
  for _, (label, run) in itertools.product(range(rounds), runners.items()):
    start = time.perf_counter()
    run(steps)
    times[label].append((time.perf_counter() - start) * 1000 / steps)
  return {label: statistics.median(t) for label, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['resnet50', 'resnet152', 'cifar_resnet110'])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--time', action='store_true', help='also time the three steps')
  parser.add_argument('--steps', type=int, default=3, help='with --time: steps per round')
  parser.add_argument('--rounds', type=int, default=3, help='with --time: timed rounds')
  args = parser.parse_args()
  print(versions(), f'batch {args.batch}')
  print('| model | default MiB | elementwise MiB | remat MiB | elementwise / default | '
        'remat / default |')
  print('|---|---:|---:|---:|---:|---:|')
  for name in args.models:
    total = {label: step_bytes(lowered_train_step(name, args.batch, image_size(name),
                                                  scan_blocks=True, **overrides).compile())
             / 2**20 for label, overrides in SETTINGS.items()}
    print(f'| {name} | {total["default"]:.0f} | {total["elementwise"]:.0f} | '
          f'{total["remat"]:.0f} | {total["elementwise"] / total["default"]:.2f} | '
          f'{total["remat"] / total["default"]:.2f} |',
          flush=True)
  if args.time:
    print(f'\nms per step on {jax.default_backend()} (median of {args.rounds} alternating '
          f'rounds of {args.steps} steps)')
    print('| model | default | elementwise | remat | elementwise / default | '
          'remat / default |')
    print('|---|---:|---:|---:|---:|---:|')
    for name in args.models:
      ms = milliseconds_per_step(name, args.batch, args.steps, args.rounds)
      print(f'| {name} | {ms["default"]:.1f} | {ms["elementwise"]:.1f} | '
            f'{ms["remat"]:.1f} | {ms["elementwise"] / ms["default"]:.2f} | '
            f'{ms["remat"] / ms["default"]:.2f} |', flush=True)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  print(f'host peak resident set of this process: {peak:.0f} MiB')


if __name__ == '__main__':
  main()
