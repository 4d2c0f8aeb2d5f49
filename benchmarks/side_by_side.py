"""Two source trees of resnet_jax side by side: train-step ms and compile seconds, alternating.

    python benchmarks/side_by_side.py OLD_TREE NEW_TREE --model resnet50 --batch 16
    python benchmarks/side_by_side.py OLD_TREE NEW_TREE --compile-only \
        --model resnet152 --batch 2 --size 64 --scan --rounds 3

OLD_TREE is e.g. `git worktree add /tmp/old main` (or `git archive main | tar -x -C
/tmp/old`). Each tree runs in its own process with PYTHONPATH=tree, one synthetic batch,
the train step train.py compiles (as benchmarks/common.py builds it). For step time the
two processes stay up and take turns: each round times `--steps` steps of one, then of the
other, so a change in the machine's load hits both; the table gives the median ms of each
and NEW / OLD. With --compile-only each round starts a fresh process per tree (a cold
compile, cache off), alternating. Figures go to benchmarks/RESULTS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args):
  """In a tree's process: compile, then time `steps` steps per line read on stdin."""
  import jax
  sys.path.insert(0, os.path.join(os.environ['PYTHONPATH'], 'benchmarks'))
  jax.config.update('jax_enable_compilation_cache', False)
  if args.compile_only:  # only what the oldest trees' benchmarks/common.py already has
    from common import abstract_train_state, lowered_train_step
    _, state = abstract_train_state(args.model, args.batch, args.size, scan_blocks=args.scan)
    start = time.perf_counter()
    lowered_train_step(args.model, args.batch, args.size, state).compile()
    print(f'compile {time.perf_counter() - start:.3f}', flush=True)
    return
  from common import jax_runner
  run = jax_runner(args.model, args.batch, args.size, scan_blocks=args.scan)
  run(2)  # compile and warm up
  print('ready', flush=True)
  for line in sys.stdin:
    start = time.perf_counter()
    run(int(line))
    print(f'{1000 * (time.perf_counter() - start) / int(line):.2f}', flush=True)


def _start(tree, args):
  flags = ['--model', args.model, '--batch', str(args.batch), '--size', str(args.size)]
  flags += ['--scan'] * args.scan + ['--compile-only'] * args.compile_only
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
  return subprocess.Popen([sys.executable, __file__, 'worker', 'worker', *flags, '--worker'],
                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=HERE)


def _read(process, prefix=''):
  line = process.stdout.readline()
  if not line.startswith(prefix):
    raise RuntimeError(f'worker said {line!r}; run it alone to see its error')
  return float(line[len(prefix):])


def compile_seconds(trees, args):
  seconds = [[] for _ in trees]
  for _ in range(args.rounds):
    for figures, tree in zip(seconds, trees):
      process = _start(tree, args)
      figures.append(_read(process, 'compile '))
      process.wait()
  return seconds


def step_ms(trees, args):
  processes = [_start(tree, args) for tree in trees]  # by position: the trees may be one
  for process in processes:
    if process.stdout.readline() != 'ready\n':
      raise RuntimeError('worker failed; run it alone to see its error')
  ms = [[] for _ in trees]
  for _ in range(args.rounds):
    for figures, process in zip(ms, processes):
      process.stdin.write(f'{args.steps}\n')
      process.stdin.flush()
      figures.append(_read(process))
  for process in processes:
    process.stdin.close()
    process.wait()
  return ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('old')
  parser.add_argument('new')
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--scan', action='store_true', help='scan_blocks=True')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='steps per round')
  parser.add_argument('--compile-only', action='store_true')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  trees = (args.old, args.new)
  figures = (compile_seconds if args.compile_only else step_ms)(trees, args)
  unit = 'compile s' if args.compile_only else 'ms/step'
  print(f'{args.model}, batch {args.batch}, {args.size}x{args.size}, scan={args.scan}, '
        f'{args.rounds} alternating rounds')
  print(f'| tree | {unit} (median) | each round |\n|---|---:|---|')
  for tree, each in zip(trees, figures):
    print(f'| {tree} | {statistics.median(each):.2f} | {", ".join(f"{x:.2f}" for x in each)} |')
  ratio = statistics.median(figures[1]) / statistics.median(figures[0])
  print(f'new / old: {ratio:.3f}')


if __name__ == '__main__':
  main()
