"""Will a run fit a TPU pod? Compile its steps for the pod's chips, from any machine.

    python -m resnet_jax.plan --config configs/imagenet_resnet50.py --topology v5e:4x4 \\
        [--config.KEY=VALUE ...] [--max-batch]

libtpu (`pip install 'resnet_jax[tpu]'`) compiles for the compile-only devices of a TPU
topology (`jax.experimental.topologies`) on a machine without a TPU. The run is built by
`build_run`, the function train.py calls, over a mesh of all chips of all hosts, so the
train and eval steps compiled here are the programs train.py would run there; the report
is XLA's own accounting of each compiled program (`memory_analysis`, `cost_analysis`)
and libtpu's cost-model estimate of its time (`op_cycles`: an estimate, not a measurement).
Exit status: 0 when the run fits, 2 when it does not, 1 for bad input.
"""

import os

# libtpu reads these when it loads: a machine that is no TPU VM has no metadata server to
# ask for the accelerator and the workers, and without them libtpu logs errors to stderr.
# ALLOW_MULTIPLE_LIBTPU_LOAD: compiling needs no exclusive TPU, so no lockfile either.
# topology_devices sets them just before libtpu loads: importing this module changes nothing.
_LIBTPU_ENV = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_ACCELERATOR_TYPE': 'v5litepod-4',
               'TPU_WORKER_HOSTNAMES': 'localhost', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
               'TPU_STDERR_LOG_LEVEL': '3', 'TPU_MIN_LOG_LEVEL': '3',
               'TF_CPP_MIN_LOG_LEVEL': '3'}

import importlib.util  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import List, NamedTuple, Optional, Sequence, Tuple  # noqa: E402

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from resnet_jax.errors import UserError  # noqa: E402
from resnet_jax.models.resnet import MEMORY_SAVING  # noqa: E402
from resnet_jax.train import config_schema, parallel  # noqa: E402
from resnet_jax.train.build import build_run  # noqa: E402
from resnet_jax.train.memory_saving import (SAFETY_MARGIN, choose_memory_saving,  # noqa: E402
                                            memory_saving_of, with_overrides)
from resnet_jax.train.step_cost import (BATCHES_AHEAD, CLOCK_HZ, GiB, StepPlan,  # noqa: E402
                                        compile_run_step, estimated_seconds, size_text)

# HBM per chip, from Google's Cloud TPU system architecture pages (checked 2026-12-03):
# v4 32 GiB (cloud.google.com/tpu/docs/v4), v5e 16 GB (cloud.google.com/tpu/docs/v5e),
# v5p 95 GB (cloud.google.com/tpu/docs/v5p), v6e 32 GB (cloud.google.com/tpu/docs/v6e).
# The pages that say GB are read as 10^9 bytes, the smaller reading. Keys are jax's
# device_kind of each generation.
HBM_PER_CHIP = {'TPU v4': 32 * GiB, 'TPU v5 lite': 16 * 10**9, 'TPU v5': 95 * 10**9,
                'TPU v6 lite': 32 * 10**9}

TOPOLOGY_FORMS = ('v4:AxBxC (e.g. v4:2x2x2), v5e:AxB (e.g. v5e:2x2, v5e:4x4), v5p:AxBxC '
                  '(e.g. v5p:2x2x1), v6e:AxB (e.g. v6e:2x2)')

# Classes and channels of the datasets whose builders say so; other datasets (synthetic,
# image folders, other TFDS names) take config.num_classes and config.in_channels.
KNOWN_DATASETS = {'imagenet2012': (1000, 3), 'imagenette': (10, 3), 'cifar10': (10, 3),
                  'cifar100': (100, 3), 'digits': (10, 1), 'mnist': (10, 1),
                  'fashion_mnist': (10, 1)}


class RunPlan(NamedTuple):
  topology: str
  device_kind: str
  devices: int
  chips: int
  hosts: int
  capacity: int  # HBM per device
  classes_from: str
  steps: List[StepPlan]
  memory_saving: str = ''  # what memory_saving='auto' chose and why, when the config asked

  @property
  def usable(self) -> float:
    return self.capacity * (1 - SAFETY_MARGIN)

  @property
  def fits(self) -> bool:
    return all(s.fits(self.usable) for s in self.steps)


def topology_devices(name: str) -> list:
  """The compile-only devices of every chip of every host of TPU topology `name`."""
  if not re.fullmatch(r'v(4|5e|5p|6e):\d+(x\d+){1,2}', name or ''):  # before installing
    raise UserError(f'Unknown topology {name!r}: use one of {TOPOLOGY_FORMS}.')
  if importlib.util.find_spec('libtpu') is None:
    raise UserError("Planning for a TPU needs libtpu, which is not installed: "
                    "pip install 'resnet_jax[tpu]' (the extra pins the libtpu that matches "
                    "this jax).")
  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  jax.config.update('jax_platforms', 'cpu')  # never take a real TPU from a running job
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).split('\n')[0]
    raise UserError(f'libtpu does not accept topology {name!r} ({message}); use one of '
                    f'{TOPOLOGY_FORMS}, with chip counts of a real slice.') from None


def classes_and_channels(config):
  """(num_classes, channels, where they came from) for config.dataset."""
  if config.dataset in KNOWN_DATASETS:
    return (*KNOWN_DATASETS[config.dataset], f'the {config.dataset} dataset')
  return config.num_classes, config.in_channels, 'config.num_classes, config.in_channels'


def plan_run(config, devices: Sequence, topology: str = '', steps=('train', 'eval')
             ) -> RunPlan:
  """Builds the run of `config` over all `devices` as train.py would and compiles its
  steps; raises UserError for a config train.py would refuse. memory_saving='auto' is
  chosen as train.py would choose it on these devices (`choose_memory_saving`)."""
  config_schema.check_config(config, len(devices))
  mesh = parallel.create_mesh(devices)
  num_classes, channels, classes_from = classes_and_channels(config)
  said = []
  config, chosen = choose_memory_saving(
      config, lambda trial: plan_run(trial, devices, topology, ('train',)).steps[0],
      plan_capacity(devices), said.append)
  # The schedule's length does not change the program's buffers.
  parts = build_run(config, mesh, num_classes, channels, steps_per_epoch=1000)
  plans = [chosen if name == 'train' and chosen else
           compile_run_step(name, config, parts, mesh, channels) for name in steps]
  return RunPlan(topology, devices[0].device_kind, len(devices), chip_count(devices),
                 len({d.process_index for d in devices}), plan_capacity(devices),
                 classes_from, plans, ' '.join(said))


def chip_count(devices) -> int:
  """The chips that `devices` span (on some TPUs each TensorCore of a chip is a device)."""
  return len({tuple(d.coords) for d in devices}) if hasattr(devices[0], 'coords') else len(devices)


def images_per_chip(step: StepPlan, device_kind: str, devices_per_chip: int) -> Optional[float]:
  """Images/s per chip by libtpu's estimate of `step`'s time on a `device_kind` chip that
  holds `devices_per_chip` devices, or None where there is no estimate."""
  seconds = estimated_seconds(step.cycles, device_kind)
  return None if seconds is None else step.batch_per_device / seconds * devices_per_chip


def plan_capacity(devices) -> int:
  """HBM per device (a chip, or a TensorCore where each is its own device)."""
  return HBM_PER_CHIP.get(devices[0].device_kind, 0) * chip_count(devices) // len(devices)


def largest_fitting(fits, start: int) -> int:
  """The largest size for which `fits(size)` holds (0 if not even 1 does), assuming it
  holds up to some size and not past it: doubling or halving from `start`, then
  bisection, over multiples of 8 once past 8 (the batch sizes TPUs tile well)."""
  low, high, size = 0, None, max(1, start)
  while True:
    if fits(size):
      low = size
    else:
      high = size
    if high is None:  # still growing
      size *= 2
    elif low == 0:  # still shrinking
      if high == 1:
        return 0
      size = high // 2
    else:
      step = 8 if low >= 8 else 1
      size = max(low + step, (low + (high - low) // 2) // step * step)
      if size >= high:
        return low


def max_batch(config, devices: Sequence, topology: str = '', log=print,
              known: Optional[StepPlan] = None):
  """(largest per-device train batch that fits, compiles, seconds), by compiling the
  train step at each batch `largest_fitting` tries; `known`, a train step already
  planned, is not compiled again."""
  start, compiles = time.perf_counter(), 0
  usable = plan_capacity(devices) * (1 - SAFETY_MARGIN)

  def fits(per_device: int) -> bool:
    nonlocal compiles
    step, how = known, 'planned above'
    if known is None or known.batch_per_device != per_device:
      compiles += 1
      trial = config.copy_and_resolve_references()
      trial.batch_size = per_device * len(devices)
      step = plan_run(trial, devices, topology, steps=('train',)).steps[0]
      how = f'compiled in {step.compile_s:.0f} s'
    rate = images_per_chip(step, devices[0].device_kind, len(devices) // chip_count(devices))
    speed = f', est. {rate:,.0f} images/s per chip' if rate else ''
    log(f'  per-device batch {per_device}: '
        + (f'{size_text(step.total_bytes)}{speed}' if step.memory else 'out of HBM')
        + f', {how} -> {"fits" if step.fits(usable) else "does not fit"}')
    return step.fits(usable)

  best = largest_fitting(fits, config.batch_size // len(devices))
  return best, compiles, time.perf_counter() - start


def _gib(n) -> str:
  return f'{n / GiB:.2f}'


def format_report(plan: RunPlan) -> str:
  """The report: the topology, then per step its times, HBM per device and FLOPs."""
  per_chip = plan.devices // plan.chips
  lines = [f'{plan.topology}: {plan.chips} chips ({plan.device_kind}'
           + (f', {per_chip} devices each' if per_chip > 1 else '')
           + f'), {plan.hosts} host(s); classes and channels from {plan.classes_from}.',
           f'HBM per device: {_gib(plan.capacity)} GiB, planned to use at most '
           f'{_gib(plan.usable)} GiB ({SAFETY_MARGIN:.0%} kept free).']
  if plan.memory_saving:
    lines.append(plan.memory_saving)
  for s in plan.steps:
    lines.append(f'{s.name} step, batch {s.batch_per_device} per device: trace '
                 f'{s.trace_s:.1f} s, compile {s.compile_s:.1f} s')
    if s.memory is None:
      lines.append(f'  does not fit: {s.error}')
      continue
    m = s.memory
    lines += [f'  arguments      {size_text(m.argument_size_in_bytes):>11}',
              f'  outputs        {size_text(m.output_size_in_bytes):>11}'
              f'  (of which {size_text(m.alias_size_in_bytes)} reuse donated arguments)',
              f'  temporaries    {size_text(m.temp_size_in_bytes):>11}',
              f'  program code   {size_text(m.generated_code_size_in_bytes):>11}',
              f'  batches ahead  {size_text(BATCHES_AHEAD * s.input_bytes):>11}',
              f'  total          {size_text(s.total_bytes):>11} of {_gib(plan.capacity)} GiB '
              f'({s.total_bytes / plan.capacity:.0%})',
              '  FLOPs per step per device: '
              + (f'{s.flops / 1e9:,.1f} G' if s.flops is not None else 'not reported')]
    lines += estimate_lines(s, plan)
  return '\n'.join(lines)


def images_per_second(step: StepPlan, plan: RunPlan) -> Optional[Tuple[float, float]]:
  """(images/s per chip, per slice) by libtpu's estimate of `step`'s time, or None."""
  per_chip = images_per_chip(step, plan.device_kind, plan.devices // plan.chips)
  return None if per_chip is None else (per_chip, per_chip * plan.chips)


def estimate_lines(step: StepPlan, plan: RunPlan) -> List[str]:
  """The step's time by libtpu's cost model, labelled as the estimate it is."""
  rates = images_per_second(step, plan)
  if rates is None:
    return [f'  estimated time: not available ({step.cycles_note or plan.device_kind})']
  clock = CLOCK_HZ[plan.device_kind]
  lines = [f'  estimated time (libtpu\'s cost model, not a measurement): '
           f'{step.cycles / 1e6:,.1f} M cycles at {clock / 1e9:.2f} GHz = '
           f'{step.cycles / clock * 1e3:,.1f} ms per step, {rates[0]:,.0f} images/s per '
           f'chip, {rates[1]:,.0f} per slice']
  if step.cycles_note:
    lines.append(f'    ({step.cycles_note})')
  return lines


def advice(config, plan: RunPlan) -> str:
  """What to change when the run does not fit, as flags to add to the same command (a
  running workdir resumes with them: they are execution settings)."""
  del plan
  overrides = {k: v for k, v in dict(config.model_overrides).items() if v is not None}
  saving = memory_saving_of(config) or (
      'full' if overrides.get('remat') else
      'elementwise' if overrides.get('elementwise_remat') else 'none')
  flag = '--config.model_overrides.memory_saving={}'.format
  tips = []
  if saving == 'none':
    tips.append(f'keep only convolution outputs for the backward pass: '
                f'{flag("elementwise")} (recomputes BatchNorm and ReLU outputs: ~0.8x '
                f'the HBM for a few % more time, benchmarks/RESULTS.md)')
  if saving in ('none', 'elementwise'):
    tips.append(f'rematerialize blocks: {flag("full")} (about 2x less activation memory '
                f'for ~30% more compute); {flag("auto")} lets the run pick the fastest '
                f'that fits, --compare shows each')
  if config.dtype == 'float32':
    tips.append('compute in bfloat16: --config.dtype=bfloat16 (params stay float32)')
  tips.append('a smaller batch: --config.batch_size=N (--max-batch finds the largest '
              'per-device batch that fits)')
  if overrides.get('scan_blocks'):
    tips.append('unrolled stages: --config.model_overrides.scan_blocks=False (a scanned '
                'stage keeps more for the backward pass, benchmarks/RESULTS.md)')
  return 'To fit:\n' + '\n'.join(f'  - {t}' for t in tips)


def verdict(config, plan: RunPlan) -> str:
  if plan.fits:
    worst = max(s.total_bytes for s in plan.steps)
    return (f'Fits: {size_text(worst)} of the {_gib(plan.usable)} GiB planned per device.')
  return 'Does not fit.\n' + advice(config, plan)


def compare(config, devices: Sequence, topology: str = '', log=print
            ) -> List[Tuple[str, bool, RunPlan]]:
  """(memory_saving, scan_blocks, its plan of the train step) of each variant of
  `config`'s run, fastest memory saving first: one compile each. A model that cannot
  scan its blocks (pruned widths) gets the unscanned rows, and the log says why."""
  rows = []
  for scan in (False, True):
    for name in MEMORY_SAVING:
      trial = with_overrides(config, memory_saving=name, scan_blocks=scan, remat=None,
                             elementwise_remat=None)
      try:
        rows.append((name, scan, plan_run(trial, devices, topology, ('train',))))
      except UserError as e:
        if not scan:
          raise
        log(f'  no scan_blocks=True rows: {e}')
        return rows
      log(f'  compiled memory_saving={name!r}, scan_blocks={scan} in '
          f'{rows[-1][2].steps[0].compile_s:.0f} s')
  return rows


def format_comparison(rows: Sequence[Tuple[str, bool, RunPlan]]) -> str:
  """The variants' train steps side by side: HBM per chip, whether it fits, and libtpu's
  estimate of the time (an estimate, not a measurement); the fastest that fits marked."""
  first = rows[0][2]
  per_chip = first.devices // first.chips
  speeds = [(images_per_second(p.steps[0], p) or (0,))[0] if p.fits else -1
            for _, _, p in rows]
  best = speeds.index(max(speeds)) if max(speeds) > 0 else None
  lines = [f'Train step variants on {first.topology} ({first.device_kind}), batch '
           f'{first.steps[0].batch_per_device} per device; HBM per chip of '
           f'{_gib(first.capacity * per_chip)} GiB, fits = within '
           f'{_gib(first.usable * per_chip)} GiB ({SAFETY_MARGIN:.0%} kept free); est. = '
           "libtpu's cost-model estimate, not a measurement.",
           f'{"memory_saving":<14}{"scan_blocks":<13}{"HBM/chip":>11}{"fits":>6}'
           f'{"est. ms/step":>14}{"est. img/s/chip":>17}']
  for i, (name, scan, p) in enumerate(rows):
    step = p.steps[0]
    seconds = estimated_seconds(step.cycles, p.device_kind)
    rate = images_per_second(step, p)
    memory = size_text(step.total_bytes * per_chip) if step.memory else 'out of HBM'
    mark = '  <- fastest that fits' if i == best else ''
    lines.append(f'{name:<14}{str(scan):<13}{memory:>11}{"yes" if p.fits else "no":>6}'
                 + (f'{seconds * 1e3:>14,.2f}{rate[0]:>17,.0f}' if seconds else
                    f'{"n/a":>14}{"n/a":>17}') + mark)
  return '\n'.join(lines)


# --- The command line ---------------------------------------------------------------------

from absl import app, flags  # noqa: E402

from resnet_jax.configs import config_path  # noqa: E402
from resnet_jax.train.command_line import define_config_flag, parse_flags  # noqa: E402


def _define_flags():
  define_config_flag(config_path('default'),
                     'Training configuration file (as for train.py).')
  flags.DEFINE_string('topology', None, f'TPU topology: {TOPOLOGY_FORMS}.')
  flags.DEFINE_bool('max-batch', False, 'Also find the largest per-device train batch '
                    'that fits (compiles several times).')
  flags.DEFINE_bool('compare', False, 'Instead of the plan, compile the train step of '
                    'each memory_saving setting (none, elementwise, full) with scan_blocks off '
                    'and on, and print their HBM and estimated time side by side.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  try:
    if not FLAGS.topology:
      raise UserError(f'Pass --topology: {TOPOLOGY_FORMS}.')
    devices = topology_devices(FLAGS.topology)
    if FLAGS.compare:
      print('Compiling the train step of each variant:', flush=True)
      rows = compare(FLAGS.config, devices, FLAGS.topology,
                     log=lambda s: print(s, flush=True))
      print(format_comparison(rows))
      sys.exit(0 if any(p.fits for _, _, p in rows) else 2)
    plan = plan_run(FLAGS.config, devices, FLAGS.topology)
    print(format_report(plan))
    print(verdict(FLAGS.config, plan), flush=True)
    if FLAGS['max-batch'].value:
      print('Searching the largest per-device train batch that fits:', flush=True)
      best, compiles, seconds = max_batch(FLAGS.config, devices, FLAGS.topology,
                                          log=lambda s: print(s, flush=True),
                                          known=plan.steps[0])
      print(f'Largest per-device batch that fits: {best or "none"} (global '
            f'{best * len(devices)}); {compiles} compiles in {seconds:.0f} s.')
  except UserError as e:
    sys.exit(f'Error: {e}')
  if not plan.fits:
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
