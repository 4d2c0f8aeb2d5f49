"""The benchmark scripts run and print their tables (at toy sizes: the figures themselves
are measured by hand and recorded in benchmarks/RESULTS.md, never asserted here)."""

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

NUMBER = r'(\d+(?:\.\d+)?)'


def run_benchmark(script, *args, timeout=600):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='true')  # compile fast, as the tests do
  result = subprocess.run([sys.executable, str(REPO / 'benchmarks' / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def table_rows(output, label):
  """The numbers of each table row whose first cell starts with `label`."""
  rows = [line.split('|')[2:-1] for line in output.splitlines()
          if line.startswith(f'| {label}')]
  return [[float(cell) for cell in re.findall(NUMBER, ' '.join(row))] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize('name, size, options', [
    ('cifar_resnet20', 32, ['--dtype', 'bfloat16']),
    ('resnet18', 224, ['--real-data']),  # JPEG files through the ImageNet pipeline
])
def test_train_throughput_compares_with_pytorch(name, size, options):
  output = run_benchmark('train_throughput.py', '--models', name, '--batch', '2',
                         '--steps', '1', '--rounds', '1', '--feed-batch', '4',
                         '--feed-batches', '2', *options)
  [(batch, image, jax_rate, torch_rate, ratio)] = table_rows(output, f'{name} (torch)')
  assert (batch, image) == (2, size) and jax_rate > 0 and torch_rate > 0
  # The rates are printed to 0.05 and the ratio to 0.005.
  low, high = (jax_rate - 0.05) / (torch_rate + 0.05), (jax_rate + 0.05) / (torch_rate - 0.05)
  assert low - 0.005 <= ratio <= high + 0.005
  if '--real-data' in options:
    [(_, _, fed_rate, fraction)] = table_rows(output, f'{name} (JAX fed by the input pipeline)')
    assert fed_rate > 0 and fraction > 0
    for pipeline in ('tf.data', 'torchvision'):
      [(per_core, cores, per_cpu_second, cpu_cores)] = table_rows(output, pipeline)
      assert per_core > 0 and cores >= 24000 / (per_core + 0.5)
      assert per_cpu_second > 0 and cpu_cores >= 24000 / (per_cpu_second + 0.5)


@pytest.mark.slow
def test_compile_time_and_memory_tables():
  compile_rows = table_rows(run_benchmark('compile_time.py', '--models', 'cifar_resnet20',
                                          '--batch', '2'), 'cifar_resnet20')
  [(unrolled_trace, unrolled, scan_trace, scan, speedup)] = compile_rows
  assert min(unrolled_trace, unrolled, scan_trace, scan) > 0
  # Seconds are printed to 0.05 (so each sum to 0.1) and the speed-up to 0.05.
  unrolled_total, scan_total = unrolled_trace + unrolled, scan_trace + scan
  low = (unrolled_total - 0.1) / (scan_total + 0.1)
  high = (unrolled_total + 0.1) / (scan_total - 0.1)
  assert low - 0.05 <= speedup <= high + 0.05
  output = run_benchmark('memory.py', '--models', 'cifar_resnet20', '--batch', '2', '--time',
                         '--steps', '1', '--rounds', '1')
  [memory, milliseconds] = table_rows(output, 'cifar_resnet20')
  default, elementwise, remat, elementwise_ratio, remat_ratio = memory
  assert 0 < remat <= elementwise <= default  # each setting keeps less than the one before
  for ratio, mib in ((elementwise_ratio, elementwise), (remat_ratio, remat)):  # MiB to 0.5
    assert ((mib - 0.5) / (default + 0.5) - 0.005 <= ratio
            <= (mib + 0.5) / (default - 0.5) + 0.005)
  assert min(milliseconds) > 0


@pytest.mark.slow
def test_input_pipeline_compares_with_torchvision():
  output = run_benchmark('input_pipeline.py', '--images', '16', '--batch', '4',
                         '--batches', '2', '--rounds', '1', '--files', 'synthetic',
                         '--modes', 'train', 'eval', 'train_v2')
  for mode in ('training', 'evaluation', "torchvision V2 recipe's training"):
    table = output[output.index(f'synthetic JPEGs, {mode} transform'):]
    [(ours, ours_median, ours_per_core, ratio, cpu, _, _)] = table_rows(
        table, 'resnet_jax (tf.data)')[:1]
    [(theirs, _, _, one, their_cpu, _, cpu_one)] = table_rows(table, 'torchvision DataLoader')[:1]
    assert ours == ours_median > 0 and theirs > 0 and one == cpu_one == 1
    assert cpu > 0 and their_cpu > 0
    assert ours_per_core == pytest.approx(ours / os.cpu_count(), abs=1)
    assert ratio == pytest.approx(ours / theirs, abs=0.01 + 0.5 * ours / theirs ** 2)


@pytest.mark.slow
def test_file_check_times_the_header_check_and_a_full_decode():
  output = run_benchmark('file_check.py', '--images', '20', '--rounds', '2')
  for round_ in (1, 2):
    [(checked, decoded)] = table_rows(output, f'{round_} |')
    assert checked > 0 and decoded > 0


@pytest.mark.slow
def test_tpu_aot_compares_with_the_flax_example():
  pytest.importorskip('libtpu')
  output = run_benchmark('tpu_aot.py', '--topologies', 'v5e:2x2', '--batches', '4', '2',
                         '--models', 'resnet50', 'flax_resnet50', '--stage-sizes', '1', '1',
                         '--image-size', '64')
  rows = [[cell.strip() for cell in line.split('|')[2:-1]] for line in output.splitlines()
          if line.startswith('| v5e:2x2 |')]
  by_model = {(model, int(batch)): cells for model, batch, *cells in rows}
  assert sorted(by_model) == [('flax_resnet50', 2), ('flax_resnet50', 4), ('resnet50', 2),
                              ('resnet50', 4)]
  for (model, batch), (compile_s, hbm, share, ratio, traffic, largest, cycles, ms, per_chip,
                       time_ratio) in by_model.items():
    # libtpu's estimate: M cycles at v5e's 1.5 GHz, 4 chips of one device each.
    per_chip, cycles = float(per_chip.replace(',', '')), float(cycles)  # to 0.1 M cycles
    assert abs(float(ms) - cycles / 1.5) <= 0.05 + 0.05 / 1.5
    assert abs(per_chip - batch * 1.5e3 / cycles) <= per_chip * 0.05 / cycles + 1
    flax_cycles = float(by_model['flax_resnet50', batch][6])
    expected = cycles / flax_cycles  # each printed to 0.05 M cycles, the ratio to 0.005
    assert abs(float(time_ratio.rstrip('x')) - expected) <= expected * (
        0.05 / cycles + 0.05 / flax_cycles) + 0.005
    flax_hbm = float(by_model['flax_resnet50', batch][1])
    hbm = float(hbm)
    assert float(compile_s) >= 0 and hbm > 0 and float(traffic) > 0
    # GiB are printed to 0.005, the ratio to 0.005.
    low, high = (hbm - 0.005) / (flax_hbm + 0.005), (hbm + 0.005) / max(flax_hbm - 0.005, 1e-9)
    assert low - 0.005 <= float(ratio.rstrip('x')) <= high + 0.005
    if batch == 2:  # the second batch gives the linear estimate of the largest batch
      assert int(largest.lstrip('~')) > 4


@pytest.mark.slow
def test_gpu_check_runs_at_toy_sizes_without_tensorflow(tmp_path):
  """benchmarks/gpu_check.py --tiny (the CPU rehearsal of the device check): each step
  timed in its own process, the largest-batch search, converted-model parity, the table
  written to --out, and no worker importing TensorFlow (the device image has none)."""
  output = run_benchmark('gpu_check.py', '--tiny', '--out', str(tmp_path),
                         '--variants', 'default', 'flax', 'torch', 'torch.compile',
                         'elementwise_remat=False', timeout=1800)  # a process each: minutes
  assert (tmp_path / 'gpu_check.md').read_text().strip() == output.strip()
  for label in ('resnet_jax default', 'Flax example', 'PyTorch AMP channels_last, eager',
                'PyTorch AMP channels_last, torch.compile'):
    [(median, *rounds, _, compile_s)] = table_rows(output, label + ' |')
    assert median > 0 and len(rounds) == 3 and compile_s >= 0
  # A setting equal to the default is not timed again.
  assert '| resnet_jax elementwise_remat=False | = resnet_jax default |' in output
  # Largest batch (a limit of 14 images' memory by the first two points, on a CPU; XLA's
  # CPU memory is not linear in the batch, so the answer lies between the second point, 8,
  # which fits by construction, and 16): every batch tried at or below it fits the limit,
  # every one above does not, and the next even batch was tried (the search is complete).
  # MiB are printed to 0.05.
  line = next(l for l in output.splitlines() if l.startswith('Largest batch'))
  largest = int(re.match(r'Largest batch of resnet_jax default: (\d+) \(XLA', line)[1])
  tried = {int(b): float(m) for b, m in re.findall(r'(\d+): ([\d.]+)', line.split('tried:')[1])}
  limit = float(re.search(r'limit ([\d.]+) MiB', line)[1])
  assert 8 <= largest <= 16 and largest + 2 in tried and 'ran at' in line
  for batch, mib in tried.items():
    assert mib <= limit + 0.05 if batch <= largest else mib > limit - 0.05
  assert 'PASS' in output and 'TensorFlow imported: by no worker' in output


@pytest.mark.slow
@pytest.mark.parametrize('options', [[], ['--compile-only']])
def test_side_by_side_alternates_two_trees(options):
  output = run_benchmark('side_by_side.py', str(REPO), str(REPO), '--model', 'cifar_resnet20',
                         '--batch', '2', '--size', '32', '--rounds', '2', '--steps', '1',
                         *options)
  rows = table_rows(output, str(REPO))
  assert len(rows) == 2 and all(len(row) == 3 and min(row) > 0 for row in rows)
  median, first, second = rows[1]
  assert min(first, second) <= median <= max(first, second)
  [ratio] = re.findall(rf'new / old: {NUMBER}', output)
  assert abs(float(ratio) - rows[1][0] / rows[0][0]) < 0.01
