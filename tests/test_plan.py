"""resnet_jax.plan: TPU steps compiled with libtpu's compile-only devices, no TPU needed.

The figures are checked against what they must be independently of XLA: a replicated
state's bytes plus one device's share of the batch are the step's arguments.
"""

import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, load_config, tiny_digits_config
from resnet_jax import plan
from resnet_jax.models.resnet import MEMORY_SAVING
from resnet_jax.errors import UserError
from resnet_jax.train import memory_saving, parallel, step_cost
from resnet_jax.train.build import build_run

pytestmark = pytest.mark.skipif(
    __import__('importlib').util.find_spec('libtpu') is None,
    reason="needs libtpu: pip install 'resnet_jax[tpu]'")


def _state_bytes(config, devices) -> int:
  parts = build_run(config, parallel.create_mesh(devices), 10, 1, steps_per_epoch=10)
  state = jax.eval_shape(parts.init_state, jax.random.PRNGKey(0))
  for leaf in jax.tree.leaves(state):  # what train.py places: a full copy on each chip
    assert leaf.sharding.is_fully_replicated
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def test_figures_are_the_compiled_steps():
  """One host of 4 chips and 4 hosts of 16 chips at the same batch per chip: the same
  per-chip program (a replicated state, a batch sharded over all chips of all hosts)."""
  plans = {}
  for topology, chips, hosts in [('v5e:2x2', 4, 1), ('v5e:4x4', 16, 4)]:
    devices = plan.topology_devices(topology)
    config = tiny_digits_config(batch_size=8 * chips, eval_batch_size=4 * chips)
    result = plans[topology] = plan.plan_run(config, devices, topology)
    assert (result.chips, result.hosts, result.devices) == (chips, hosts, chips)
    train, evaluate = result.steps
    assert (train.batch_per_device, evaluate.batch_per_device) == (8, 4)
    # The whole state plus 8 images (8x8x1 uint8) and labels: more with TPU tile padding.
    assert train.memory.argument_size_in_bytes >= _state_bytes(config, devices) + 8 * 68
    assert train.memory.alias_size_in_bytes > 0  # the donated state is reused
    assert evaluate.memory.alias_size_in_bytes == 0
    assert train.flops > evaluate.flops > 0
    assert train.cycles > evaluate.cycles > 0
    report = plan.format_report(result)
    assert f'{chips} chips (TPU v5 lite), {hosts} host(s)' in report
    for step in (train, evaluate):
      m = step.memory
      for figure in (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                     m.alias_size_in_bytes):
        assert step_cost.size_text(figure) in report
      assert step.total_bytes == (m.argument_size_in_bytes + m.output_size_in_bytes
                                  - m.alias_size_in_bytes + m.temp_size_in_bytes
                                  + m.generated_code_size_in_bytes + 2 * step.input_bytes)
      assert f'{step_cost.size_text(step.total_bytes)} of 14.90 GiB' in report
      per_chip = step.batch_per_device / (step.cycles / 1.5e9)  # v5e's clock
      assert (f'{step.cycles / 1.5e6:,.1f} ms per step, {per_chip:,.0f} images/s per chip, '
              f'{per_chip * chips:,.0f} per slice') in report
    assert "libtpu's cost model, not a measurement" in report
    assert result.fits
  one_host, four_hosts = (plans[t].steps[0].memory for t in ('v5e:2x2', 'v5e:4x4'))
  assert one_host.argument_size_in_bytes == four_hosts.argument_size_in_bytes


def _compile_for_v5e(fn, *shapes):
  device = plan.topology_devices('v5e:2x2')[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(shape, np.dtype('bfloat16'), sharding=sharding)
          for shape in shapes]
  return jax.jit(fn).lower(*args).compile().as_text()


def _cycles_by_computation(hlo_text):
  """{computation name: sum of the estimated_cycles of its lines}, by hand."""
  sums, name = {}, None
  for line in hlo_text.splitlines():
    if line.endswith('{') and not line.startswith(' '):
      name = line.replace('ENTRY ', '').split(' ')[0].lstrip('%')
      sums[name] = 0
    elif name and '"estimated_cycles":"' in line:
      sums[name] += int(line.split('"estimated_cycles":"')[1].split('"')[0])
  return sums


def test_estimated_cycles_are_the_programs_sum_with_loops_counted_by_trips():
  """A matmul run 3 times in a loop and a reduction after it: the entry computation's
  cycles plus 3x the loop body's and 4x its condition's, summed here line by line."""
  def f(x, w):
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), x).sum()

  text = _compile_for_v5e(f, (256, 512), (512, 512))
  sums = _cycles_by_computation(text)
  entry = text.split('ENTRY ')[1].split(' ')[0].lstrip('%')
  body, condition = (text.split(f'{key}=')[1].split(',')[0].lstrip('%')
                     for key in ('body', 'condition'))
  ops, note = step_cost.op_cycles(text)
  assert sums[body] > 0 and sums[entry] > 0
  assert sum(op.cycles * op.count for op in ops) == (
      sums[entry] + 3 * sums[body] + 4 * sums[condition])
  assert {op.count for op in ops} == {1, 3} and 'unknown trip count' not in note
  no_loop = _compile_for_v5e(lambda x, w: jnp.tanh(x @ w).sum(), (256, 512), (512, 512))
  ops, _ = step_cost.op_cycles(no_loop)
  no_loop_entry = no_loop.split('ENTRY ')[1].split(' ')[0].lstrip('%')
  assert sum(op.cycles for op in ops) == _cycles_by_computation(no_loop)[no_loop_entry] > 0


def test_no_estimate_off_the_tpu():
  text = jax.jit(lambda x: x * 2).lower(np.ones(4, np.float32)).compile().as_text()
  assert step_cost.op_cycles(text) == ([], 'no estimated_cycles in the program (not compiled for a '
                                      'TPU)')
  assert step_cost.estimated_seconds(None, 'TPU v5 lite') is None


def _run_plan(*args, **env_vars):
  env = dict(os.environ, PYTHONPATH=str(REPO), **env_vars)
  return subprocess.run([sys.executable, '-m', 'resnet_jax.plan', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.cli
def test_too_big_does_not_fit():
  """1024 images of 512x512 per chip: the compiler refuses, fast, and the verdict says
  what to change; the exit status is 2, and libtpu's log lines stay out of stderr."""
  result = _run_plan('--config', 'configs/default.py', '--topology', 'v5e:2x2',
                     '--config.image_size=512', '--config.batch_size=4096',
                     '--config.eval_batch_size=4096')
  assert result.returncode == 2, result.stderr
  assert 'Does not fit' in result.stdout and 'memory_saving=full' in result.stdout
  assert 'exceeds available HBM' in result.stdout
  assert result.stderr == ''


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(plan.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError, match=r"pip install 'resnet_jax\[tpu\]'"):
    plan.topology_devices('v5e:2x2')
  with pytest.raises(UserError, match='Unknown topology'):  # not 'install libtpu' first
    plan.topology_devices('v9:2x2')


@pytest.mark.parametrize('name', ['tpu9', 'v5e', 'v5e:3x3'])
def test_bad_topology_lists_the_forms(name):
  with pytest.raises(UserError, match=r'v5e:2x2.*v5p:2x2x1'):
    plan.topology_devices(name)


def test_batch_not_divisible_over_the_chips():
  with pytest.raises(UserError, match='multiple of the number of devices'):
    plan.plan_run(tiny_digits_config(batch_size=30), plan.topology_devices('v5e:2x2'))


@pytest.mark.parametrize('limit,start', [(0, 4), (1, 4), (5, 1), (37, 4), (300, 256), (96, 512)])
def test_largest_fitting(limit, start):
  tried = []
  found = plan.largest_fitting(lambda size: tried.append(size) or size <= limit, start)
  expected = limit if limit < 8 else limit // 8 * 8  # multiples of 8 past 8
  assert found == expected and max(tried) <= 2 * max(limit, start) and len(tried) < 12


def test_max_batch_searches_from_the_planned_step_without_compiling_it_again(monkeypatch):
  """The search's wiring, on steps whose memory grows by 1/4 GiB per example (no compile)."""
  devices = plan.topology_devices('v5e:2x2')
  usable = 16 * 10**9 * (1 - memory_saving.SAFETY_MARGIN)

  def step(per_device):
    memory = type('Memory', (), dict(argument_size_in_bytes=0, output_size_in_bytes=0,
                                      alias_size_in_bytes=0, generated_code_size_in_bytes=0,
                                      temp_size_in_bytes=per_device * step_cost.GiB // 4))
    # libtpu's estimate: 1.5 G cycles, one second on v5e's clock, whatever the batch.
    return step_cost.StepPlan('train', per_device, 0.0, 1.0, memory, 1.0, 0, cycles=1.5e9)

  compiled = []

  def fake_plan_run(config, devices, topology, steps):
    compiled.append(config.batch_size // len(devices))
    return plan.RunPlan(topology, '', 4, 4, 1, 0, '', [step(compiled[-1])])

  monkeypatch.setattr(plan, 'plan_run', fake_plan_run)
  logged = []
  best, compiles, _ = plan.max_batch(tiny_digits_config(batch_size=4 * 4), devices, 'v5e:2x2',
                                     log=logged.append, known=step(4))
  assert best == int(usable // (step_cost.GiB / 4)) // 8 * 8 == 48 and compiles == len(compiled)
  assert 4 not in compiled
  assert logged[0] == ('  per-device batch 4: 1.00 GiB, est. 4 images/s per chip, '
                       'planned above -> fits')


def test_max_pool_gradient_keeps_no_padded_copies_on_tpu():
  """The stem's max pool compiled for a TPU: its gradient needs no more than one copy of
  the input beside it (the nine-view form, kept for CPU, held padded copies: 1.8x)."""
  from resnet_jax.models import pooling  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh(plan.topology_devices('v5e:2x2')[:1])
  x = jax.ShapeDtypeStruct((8, 112, 112, 64), np.dtype('bfloat16'),
                           sharding=parallel.replicated(mesh))
  grad = jax.jit(jax.grad(lambda x: pooling.max_pool_3x3_s2(x).astype(np.float32).sum()))
  temporaries = grad.lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temporaries <= x.size * 2, temporaries  # 0 bytes here; 23 MB with the views


@pytest.mark.cli
def test_installed_wheel_plans_with_its_packaged_config(tmp_path):
  """`pip install .` ships the configs: a wheel built from a copy of the sources, installed
  into a folder, plans its own configs/default.py from outside the source tree."""
  import shutil  # pylint: disable=g-import-not-at-top
  source, wheels, site = tmp_path / 'source', tmp_path / 'wheels', tmp_path / 'site'
  shutil.copytree(REPO / 'resnet_jax', source / 'resnet_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(REPO / name, source / name)
  pip = [sys.executable, '-m', 'pip', '-q']
  subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels),
                  str(source)], check=True, timeout=300)
  subprocess.run([*pip, 'install', '--no-deps', '--target', str(site),
                  *map(str, wheels.glob('*.whl'))], check=True, timeout=300)
  config = site / 'resnet_jax' / 'configs' / 'default.py'
  env = dict(os.environ, PYTHONPATH=str(site))
  where = subprocess.run([sys.executable, '-c', 'import resnet_jax; print(resnet_jax.__file__)'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(site)), where.stdout  # the wheel, not the source tree
  result = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.plan', '--config', str(config), '--topology',
       'v5e:2x2'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and 'Fits:' in result.stdout, result.stdout + result.stderr
  assert str(REPO) not in result.stdout + result.stderr


# --- memory_saving='auto' and --compare --------------------------------------------------

@pytest.mark.slow  # five TPU compiles
def test_plan_with_auto_reports_its_choice_and_compiles_it_once(monkeypatch):
  """memory_saving='auto' on a v5e chip: the fastest ('none') fits, and its train step is
  compiled once; on a chip too small for any setting, the plan takes the one that needs
  least, says none fits, and does not fit."""
  devices = plan.topology_devices('v5e:2x2')
  config = memory_saving.with_overrides(tiny_digits_config(batch_size=32, eval_batch_size=16),
                               memory_saving='auto')
  compiled, compile_step = [], step_cost.compile_step
  monkeypatch.setattr(step_cost, 'compile_step',
                      lambda name, *args: compiled.append(name) or compile_step(name, *args))
  result = plan.plan_run(config, devices, 'v5e:2x2')
  train = result.steps[0]
  assert compiled == ['train', 'eval'] and result.fits
  assert (f"memory_saving='auto' chose 'none', the fastest that fits: its train step needs "
          f"{step_cost.size_text(train.total_bytes)} per device") in plan.format_report(result)
  compiled.clear()
  monkeypatch.setattr(plan, 'plan_capacity', lambda devices: train.total_bytes // 2)
  small = plan.plan_run(config, devices, 'v5e:2x2')
  assert compiled == ['train'] * len(MEMORY_SAVING) + ['eval'] and not small.fits
  assert 'though none fits' in small.memory_saving
  chosen = re.search(r"chose '(\w+)'", small.memory_saving).group(1)
  for name in MEMORY_SAVING:  # the others' sizes are named, and none is smaller
    if name != chosen:
      needs = re.search(f"'{name}' needs ([\\d.]+) MiB", small.memory_saving).group(1)
      assert float(needs) >= small.steps[0].total_bytes / 2**20 - 0.01


def _readme_compare_command():
  text = (REPO / 'README.md').read_text()
  blocks = re.findall(r'```bash\n(.*?)```', text, re.S)
  line = next(line for block in blocks for line in block.splitlines() if '--compare' in line)
  return shlex.split(line)


@pytest.mark.cli
def test_readme_compare_prints_each_variant_as_compiled_alone():
  """The README's --compare command: one row per memory_saving setting, scan_blocks off
  and on; a row holds what the train step compiled alone here, with the remat fields set
  directly, needs and takes by libtpu's estimate; the fastest row that fits is marked."""
  args = _readme_compare_command()
  assert args[:3] == ['python', '-m', 'resnet_jax.plan']
  # The same XLA passes as this process (conftest), so both compile the same program.
  result = _run_plan(*args[3:], JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  assert result.returncode == 0, result.stdout + result.stderr
  assert "libtpu's cost-model estimate, not a measurement" in result.stdout
  rows = [line.split() for line in result.stdout.splitlines()
          if line.split()[:1] and line.split()[0] in MEMORY_SAVING]
  assert [row[:2] for row in rows] == [[name, str(scan)] for scan in (False, True)
                                       for name in MEMORY_SAVING]
  speeds = [float(row[6].replace(',', '')) for row in rows]
  assert [row[7:] for row in rows].count(['<-', 'fastest', 'that', 'fits']) == 1
  assert rows[speeds.index(max(speeds))][7:] == ['<-', 'fastest', 'that', 'fits']
  config = load_config('default')
  stage_sizes = next(a for a in args if 'stage_sizes' in a).split('=')[1]
  config.model_overrides.stage_sizes = eval(stage_sizes)  # pylint: disable=eval-used
  config.model_overrides.elementwise_remat = config.model_overrides.scan_blocks = True
  devices = plan.topology_devices('v5e:2x2')
  alone = plan.plan_run(config, devices, 'v5e:2x2', ('train',))
  step = alone.steps[0]
  seconds = step_cost.estimated_seconds(step.cycles, alone.device_kind)
  assert rows[4][2:6] == [*step_cost.size_text(step.total_bytes).split(), 'yes', f'{seconds * 1e3:.2f}']
