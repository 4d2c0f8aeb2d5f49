"""Cost of train.py's check of an image folder before the first step, per 1000 JPEGs.

    python benchmarks/file_check.py [--images 2000] [--rounds 3]

Writes a folder of 500x375 JPEGs (benchmarks/common.write_jpegs) and times, in alternating
rounds over the same files (in the page cache), `FolderSource.check_files` (headers only,
in threads) against a full TensorFlow decode of every file, the check it replaced.
"""

import argparse
import tempfile
import time

from common import write_jpegs

from resnet_jax.data import sources


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    source = sources.FolderSource(root)
    # pylint: disable=protected-access
    paths = [str(p) for split in ('train', 'test') for p in source._files(split)[0]]
    per_1000 = lambda seconds: f'{1000 * seconds * 1000 / len(paths):7.0f}'
    print(f'{len(paths)} files; ms per 1000 files')
    print('| round | header check (check_files) | full decode |')
    print('|---:|---:|---:|')
    for round_ in range(1, args.rounds + 1):
      start = time.perf_counter()
      source.check_files(('train', 'test'))
      checked = time.perf_counter() - start
      start = time.perf_counter()
      sources._find_problems(paths, lambda p: sources.decode_problem(p, 3))
      decoded = time.perf_counter() - start
      print(f'| {round_} | {per_1000(checked)} | {per_1000(decoded)} |')


if __name__ == '__main__':
  main()
