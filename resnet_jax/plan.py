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
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple  # noqa: E402

from resnet_jax.errors import UserError  # noqa: E402

GiB = 2**30

# HBM per chip, from Google's Cloud TPU system architecture pages (checked 2026-12-03):
# v4 32 GiB (cloud.google.com/tpu/docs/v4), v5e 16 GB (cloud.google.com/tpu/docs/v5e),
# v5p 95 GB (cloud.google.com/tpu/docs/v5p), v6e 32 GB (cloud.google.com/tpu/docs/v6e).
# The pages that say GB are read as 10^9 bytes, the smaller reading. Keys are jax's
# device_kind of each generation.
HBM_PER_CHIP = {'TPU v4': 32 * GiB, 'TPU v5 lite': 16 * 10**9, 'TPU v5': 95 * 10**9,
                'TPU v6 lite': 32 * 10**9}

# Clock of each generation, to turn libtpu's estimated cycles into seconds: peak bf16
# FLOP/s per chip (the same pages as HBM_PER_CHIP) over the FLOPs its matrix units do per
# clock (2 per cell of each MXU per cycle). v4: 275 TFLOP/s, 2 TensorCores of 4 MXUs of
# 128x128 -> 275e12 / (8 * 128**2 * 2) = 1.05 GHz. v5e: 197 TFLOP/s, 4 MXUs of 128x128 ->
# 1.50 GHz. v5p: 459 TFLOP/s, 2 TensorCores of 4 MXUs of 128x128 -> 1.75 GHz. v6e:
# 918 TFLOP/s; its page names two 256x256 MXUs, which would need 3.5 GHz, but libtpu's
# own model runs a 4096^3 bf16 matmul at 455k FLOPs per cycle (v5e: 127k of 131k), more
# than two such MXUs could (262k): four, 524,288 FLOPs per cycle -> 1.75 GHz. Each
# generation's figure was checked that way (2026-12-06: v4 117k of 131k per TensorCore,
# the device jax sees there; v5p 252k of 262k); libtpu's cycles are a device's.
CLOCK_HZ = {'TPU v4': 1.05e9, 'TPU v5 lite': 1.5e9, 'TPU v5': 1.75e9, 'TPU v6 lite': 1.75e9}

# The share of HBM a plan leaves free: XLA's figures are exact for the program, but the
# TPU runtime keeps part of HBM for itself (libtpu offers 15.75 GiB of a v5e's 16 GiB to
# programs) and saving a checkpoint or evaluating next to a donated state may need more.
SAFETY_MARGIN = 0.10

# train.py copies this many batches to the devices ahead of the step that takes them
# (parallel.device_batches); they sit next to the step's own buffers.
BATCHES_AHEAD = 2

TOPOLOGY_FORMS = ('v4:AxBxC (e.g. v4:2x2x2), v5e:AxB (e.g. v5e:2x2, v5e:4x4), v5p:AxBxC '
                  '(e.g. v5p:2x2x1), v6e:AxB (e.g. v6e:2x2)')

# Classes and channels of the datasets whose builders say so; other datasets (synthetic,
# image folders, other TFDS names) take config.num_classes and config.in_channels.
KNOWN_DATASETS = {'imagenet2012': (1000, 3), 'imagenette': (10, 3), 'cifar10': (10, 3),
                  'cifar100': (100, 3), 'digits': (10, 1), 'mnist': (10, 1),
                  'fashion_mnist': (10, 1)}


class StepPlan(NamedTuple):
  """One compiled step: its figures per device, or the compiler's out-of-memory message."""
  name: str
  batch_per_device: int
  trace_s: float
  compile_s: float
  memory: Optional[object]  # jax's CompiledMemoryStats; None when it did not compile
  flops: Optional[float]
  input_bytes: int  # one batch's share of a device (images + labels)
  error: str = ''
  bytes_accessed: Optional[float] = None  # XLA's estimate of the step's memory traffic
  cycles: Optional[int] = None  # libtpu's estimate of the step's cycles (`program_cycles`)
  cycles_note: str = ''  # what that estimate leaves out, if anything
  ops: Sequence['OpCycles'] = ()  # the ops that estimate sums

  @property
  def total_bytes(self) -> Optional[int]:
    """HBM per device: arguments + outputs - donated (aliased) + temporaries + code +
    the batches train.py holds ahead."""
    m = self.memory
    if m is None:
      return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes
            + BATCHES_AHEAD * self.input_bytes)

  def fits(self, usable: float) -> bool:
    """Whether the step compiled and its `total_bytes` stay within `usable` bytes."""
    return self.total_bytes is not None and self.total_bytes <= usable


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
  if importlib.util.find_spec('libtpu') is None:
    raise UserError("Planning for a TPU needs libtpu, which is not installed: "
                    "pip install 'resnet_jax[tpu]' (the extra pins the libtpu that matches "
                    "this jax).")
  for key, value in _LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # never take a real TPU from a running job
  if not re.fullmatch(r'v(4|5e|5p|6e):\d+(x\d+){1,2}', name or ''):
    raise UserError(f'Unknown topology {name!r}: use one of {TOPOLOGY_FORMS}.')
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


def compile_step(name: str, fn, args, batch_per_device: int, input_bytes: int) -> StepPlan:
  """Lowers and compiles `fn(*args)`; an out-of-HBM compile is a plan that does not fit."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  lowered = fn.lower(*args)
  traced = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return StepPlan(name, batch_per_device, traced - start, time.perf_counter() - traced,
                    None, None, input_bytes, str(e).split('\n')[0])
  done = time.perf_counter()
  cost = compiled.cost_analysis() or {}  # keys missing where XLA does not say
  ops, note = op_cycles(compiled.as_text())
  return StepPlan(name, batch_per_device, traced - start, done - traced,
                  compiled.memory_analysis(), cost.get('flops'), input_bytes,
                  bytes_accessed=cost.get('bytes accessed'),
                  cycles=sum(op.cycles * op.count for op in ops) if ops else None,
                  cycles_note=note, ops=ops)


# --- libtpu's estimate of a program's time --------------------------------------------------

class OpCycles(NamedTuple):
  """One op of a compiled program with libtpu's estimate of its cycles."""
  name: str  # the HLO instruction, e.g. 'convolution_add_fusion.3'
  opcode: str  # 'fusion', 'copy', 'all-reduce', ...
  op_name: str  # the jax op it came from (its metadata), e.g. 'jit(step)/.../reduce_sum'
  cycles: int  # per execution
  count: int  # executions per run of the program (loop trip counts multiplied)


# Ops that do no work of their own (or, for async copies, overlap the ones that do) and
# carry no estimate; any other op without one is named in `op_cycles`' note.
_FREE_OPS = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all',
             'partition-id', 'replica-id', 'opt-barrier', 'copy-start', 'copy-done', 'while',
             'call', 'conditional', 'add-dependency'}
_COMPUTATION = re.compile(r'^(ENTRY )?%?([^\s(]+) \(.*\{$')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%?([^\s=]+) = (.*)$')


def op_cycles(hlo_text: str) -> Tuple[List[OpCycles], str]:
  """libtpu's cost-model estimate of each op a compiled TPU program runs, and a note.

  `hlo_text` is `compiled.as_text()` of a program compiled for a TPU. libtpu writes its
  estimate of each top-level op's time into the op's backend config
  (`"estimated_cycles":"N"`); a fusion's estimate covers the ops fused into it, so fused
  computations are not entered. From the entry computation, the bodies of `while` loops
  count `known_trip_count` times (once, and said so in the note, when the loop carries
  none), `call`s once and a `conditional` by its costliest branch. Returns ([] and a note)
  for a program without estimates (not compiled for a TPU). The note also names the ops
  that carry no estimate (counted as 0 cycles) beyond those that do no work
  (`_FREE_OPS`, scalar ops).
  """
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith('}'):
      current = None
    elif current is not None and _INSTRUCTION.match(line):
      current.append(_INSTRUCTION.match(line).groups())
  if entry is None or '"estimated_cycles"' not in hlo_text:
    return [], 'no estimated_cycles in the program (not compiled for a TPU)'
  unestimated, unknown_loops = {}, []

  def walk(computation: str, count: int, ops: list) -> int:
    """Appends the ops of `computation`, run `count` times, to `ops`; returns cycles."""
    total = 0
    for name, rest in computations.get(computation, []):
      opcode = _opcode(rest)
      cycles = re.search(r'"estimated_cycles":"(\d+)"', rest)
      if cycles:
        ops.append(OpCycles(name, opcode, _attribute(rest, r'op_name="([^"]*)"'),
                            int(cycles.group(1)), count))
        total += int(cycles.group(1)) * count
      elif opcode not in _FREE_OPS and not re.match(r'\w+\[\]', rest):  # scalars: no work
        unestimated[opcode] = unestimated.get(opcode, 0) + count
      if opcode == 'while':
        trips = _trip_count(rest, computation, computations)
        if trips is None:
          unknown_loops.append(name)
          trips = 1
        total += walk(_attribute(rest, r'condition=%?([^\s,]+)'), count * (trips + 1), ops)
        total += walk(_attribute(rest, r'body=%?([^\s,]+)'), count * trips, ops)
      elif opcode == 'call':
        total += walk(_attribute(rest, r'to_apply=%?([^\s,]+)'), count, ops)
      elif opcode == 'conditional':  # the costliest branch
        best, best_ops = 0, []
        for branch in _branches(rest):
          branch_ops = []
          cycles = walk(branch, count, branch_ops)
          if cycles >= best:
            best, best_ops = cycles, branch_ops
        ops += best_ops
        total += best
    return total

  ops = []
  walk(entry, 1, ops)
  notes = []
  if unknown_loops:
    notes.append(f'loops of unknown trip count counted once: {", ".join(unknown_loops)}')
  if unestimated:
    notes.append('ops without an estimate, counted as 0: ' + ', '.join(
        f'{opcode} x{n}' for opcode, n in sorted(unestimated.items())))
  return ops, '; '.join(notes)


def _trip_count(rest: str, computation: str, computations: dict) -> Optional[int]:
  """A while loop's trip count: its `known_trip_count`, else N - C for the loops jax's
  scans and fori_loops make, whose condition is `counter < constant(N)` and whose
  counter starts at a constant C; None when neither is found."""
  known = _attribute(rest, r'"known_trip_count":\{"n":"(\d+)"')
  if known:
    return int(known)
  condition = dict(computations.get(_attribute(rest, r'condition=%?([^\s,]+)'), []))
  compare = [r for r in condition.values() if _opcode(r) == 'compare' and 'direction=LT' in r]
  if len(compare) != 1:
    return None
  counter, limit = _operands(compare[0])
  index = _attribute(condition.get(counter, ''), r'index=(\d+)')
  limit = _constant(condition.get(limit, ''))
  around = dict(computations[computation])
  init = _operands(around.get(_operands(rest)[0], ''))
  if limit is None or not index or int(index) >= len(init):
    return None
  start = _constant(around.get(init[int(index)], ''), around)
  return None if start is None else limit - start


def _operands(rest: str) -> List[str]:
  """The operand names of an instruction's right-hand side."""
  call = _after_shape(rest)
  return re.findall(r'%([^\s,()]+)', call[call.find('('):call.find(')')])


def _constant(rest: str, instructions: Optional[dict] = None) -> Optional[int]:
  """The integer a `constant` holds, looking through `copy`s within `instructions`."""
  while instructions is not None and _opcode(rest) == 'copy':
    rest = instructions.get(_operands(rest)[0], '')
  value = _attribute(rest, r'\bconstant\((-?\d+)\)')
  return int(value) if _opcode(rest) == 'constant' and value else None


def _branches(rest: str) -> List[str]:
  """The branch computations of a conditional instruction."""
  listed = _attribute(rest, r'branch_computations=\{([^}]*)\}')
  if listed:
    return [name.strip().lstrip('%') for name in listed.split(',')]
  return re.findall(r'(?:true|false)_computation=%?([^\s,]+)', rest)


def _opcode(rest: str) -> str:
  """The opcode of an instruction's right-hand side, `shape opcode(operands), ...`."""
  return _after_shape(rest).split('(', 1)[0]


def _after_shape(rest: str) -> str:
  """An instruction's right-hand side from its opcode on: past its shape, which is one
  word or, for a tuple, parentheses holding spaces and more parentheses."""
  if not rest.startswith('('):
    return rest.split(' ', 1)[-1]
  depth = 0
  for i, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return rest[i + 1:].strip()
  return ''


def _attribute(rest: str, pattern: str) -> str:
  found = re.search(pattern, rest)
  return found.group(1) if found else ''


def estimated_seconds(cycles: Optional[int], device_kind: str) -> Optional[float]:
  """libtpu's estimated cycles of a step as seconds on `device_kind`'s clock."""
  clock = CLOCK_HZ.get(device_kind)
  return cycles / clock if cycles and clock else None


def plan_run(config, devices: Sequence, topology: str = '', steps=('train', 'eval')
             ) -> RunPlan:
  """Builds the run of `config` over all `devices` as train.py would and compiles its
  steps; raises UserError for a config train.py would refuse. memory_saving='auto' is
  chosen as train.py would choose it on these devices (`choose_memory_saving`)."""
  from resnet_jax.train import config_schema, parallel  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
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
  return RunPlan(topology, devices[0].device_kind, len(devices), _chips(devices),
                 len({d.process_index for d in devices}), plan_capacity(devices),
                 classes_from, plans, ' '.join(said))


def compile_run_step(name: str, config, parts, mesh, channels: int) -> StepPlan:
  """The 'train' or 'eval' step of a run's `parts` (`build_run`), compiled for its state
  and the batches of `config` over `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.build import abstract_batch  # pylint: disable=g-import-not-at-top
  state = jax.eval_shape(parts.init_state, jax.random.PRNGKey(config.seed))
  batch_size = config.batch_size if name == 'train' else config.eval_batch_size
  batch = abstract_batch(config, mesh, channels, batch_size, eval_mask=name == 'eval')
  per_device = batch_size // mesh.devices.size
  input_bytes = per_device * sum(x.dtype.itemsize * int(x.size) // batch_size
                                 for x in batch.values())
  fn = parts.train_fn if name == 'train' else parts.eval_fn
  return compile_step(name, fn, (state, batch), per_device, input_bytes)


# --- memory saving: the fastest setting that fits -----------------------------------------

def memory_saving_of(config) -> Optional[str]:
  """config.model_overrides.memory_saving, None when the config leaves it unset."""
  return dict(config.model_overrides or {}).get('memory_saving')


def with_overrides(config, **values):
  """A copy of `config` with these config.model_overrides set (None: not overridden)."""
  trial = config.copy_and_resolve_references()
  with trial.unlocked():
    for key, value in values.items():
      trial.model_overrides[key] = value
  return trial


def choose_memory_saving(config, compile_train: Callable[[object], StepPlan],
                         capacity: Optional[float], log=print
                         ) -> Tuple[object, Optional[StepPlan]]:
  """(config with memory_saving='auto' replaced by the setting chosen, the chosen train
  step as `compile_train(that config)` compiled it, or None when nothing was compiled).

  The choice is the first of `MEMORY_SAVING` (fastest first: 'none', 'elementwise',
  'full') whose train step fits `capacity` bytes per device less `SAFETY_MARGIN`; when
  none does, the one that needs least. Without a capacity (CPU devices report none) it
  is the fastest, compiled by no one. Logs one line saying which and why. A config that
  does not ask for 'auto' comes back as it is."""
  from resnet_jax.models.resnet import MEMORY_SAVING, MEMORY_SAVING_AUTO  # pylint: disable=g-import-not-at-top
  if memory_saving_of(config) != MEMORY_SAVING_AUTO:
    return config, None
  names = list(MEMORY_SAVING)
  if not capacity:
    log(f"memory_saving='auto' chose {names[0]!r}, the fastest: these devices report no "
        f"memory limit.")
    return with_overrides(config, memory_saving=names[0]), None
  usable, tried = capacity * (1 - SAFETY_MARGIN), []
  for name in names:
    tried.append((name, compile_train(with_overrides(config, memory_saving=name))))
    if tried[-1][1].fits(usable):
      break
  needs = lambda step: (_size(step.total_bytes) if step.memory  # noqa: E731
                        else 'more than the compiler could fit')
  name, step = tried[-1]
  why = f'the fastest that fits: its train step needs {needs(step)} per device'
  if not step.fits(usable):  # none fits: the one that needs least
    name, step = min(tried, key=lambda t: t[1].total_bytes or float('inf'))
    why = f'which needs the least, though none fits: {needs(step)} per device'
  log(f"memory_saving='auto' chose {name!r}, {why}, of {_size(usable)} usable "
      f"({1 - SAFETY_MARGIN:.0%} of {_size(capacity)})"
      + ''.join(f'; {n!r} needs {needs(s)}' for n, s in tried if n != name) + '.')
  return with_overrides(config, memory_saving=name), step


def device_capacity(devices) -> Optional[int]:
  """The bytes a program may use on each of this process's `devices` (the least of them),
  as their runtime says (`memory_stats()['bytes_limit']`); None where none says (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  limits = []
  for device in devices:
    if device.process_index != jax.process_index():
      continue  # only this process's devices report their memory
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}  # platforms without memory statistics
    if stats.get('bytes_limit'):
      limits.append(int(stats['bytes_limit']))
  return min(limits) if limits else None


def build_run_that_fits(config, mesh, num_classes: int, channels: int,
                        steps_per_epoch: int, log=print):
  """`build_run` of `config` over `mesh`, with memory_saving='auto' chosen for the
  devices' memory (`choose_memory_saving`, `device_capacity`). The run keeps the parts
  whose train step was compiled to choose: jit reuses that program for the loop's steps
  (the same jitted function, shapes and shardings), so the choice costs the compiles of
  the faster settings that did not fit, and none more."""
  from resnet_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
  built = {}

  def compile_train(trial) -> StepPlan:
    built[memory_saving_of(trial)] = build_run(trial, mesh, num_classes, channels,
                                               steps_per_epoch)
    return compile_run_step('train', trial, built[memory_saving_of(trial)], mesh, channels)

  config, step = choose_memory_saving(config, compile_train,
                                      device_capacity(list(mesh.devices.flat)), log)
  if step is None:  # nothing compiled: not 'auto', or devices without a memory limit
    return build_run(config, mesh, num_classes, channels, steps_per_epoch)
  return built[memory_saving_of(config)]


def _chips(devices) -> int:
  return len({tuple(d.coords) for d in devices}) if hasattr(devices[0], 'coords') else len(devices)


def plan_capacity(devices) -> int:
  """HBM per device (a chip, or a TensorCore where each is its own device)."""
  return HBM_PER_CHIP.get(devices[0].device_kind, 0) * _chips(devices) // len(devices)


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
    seconds = estimated_seconds(step.cycles, devices[0].device_kind)
    speed = (f', est. {step.batch_per_device / seconds * len(devices) / _chips(devices):,.0f}'
             ' images/s per chip' if seconds else '')
    log(f'  per-device batch {per_device}: '
        + (f'{_size(step.total_bytes)}{speed}' if step.memory else 'out of HBM')
        + f', {how} -> {"fits" if step.fits(usable) else "does not fit"}')
    return step.fits(usable)

  best = largest_fitting(fits, config.batch_size // len(devices))
  return best, compiles, time.perf_counter() - start


def _gib(n) -> str:
  return f'{n / GiB:.2f}'


def _size(n) -> str:
  """Bytes as GiB, or MiB below 1 GiB."""
  return f'{n / GiB:.2f} GiB' if n >= GiB else f'{n / 2**20:.2f} MiB'


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
    lines += [f'  arguments      {_size(m.argument_size_in_bytes):>11}',
              f'  outputs        {_size(m.output_size_in_bytes):>11}'
              f'  (of which {_size(m.alias_size_in_bytes)} reuse donated arguments)',
              f'  temporaries    {_size(m.temp_size_in_bytes):>11}',
              f'  program code   {_size(m.generated_code_size_in_bytes):>11}',
              f'  batches ahead  {_size(BATCHES_AHEAD * s.input_bytes):>11}',
              f'  total          {_size(s.total_bytes):>11} of {_gib(plan.capacity)} GiB '
              f'({s.total_bytes / plan.capacity:.0%})',
              '  FLOPs per step per device: '
              + (f'{s.flops / 1e9:,.1f} G' if s.flops is not None else 'not reported')]
    lines += estimate_lines(s, plan)
  return '\n'.join(lines)


def images_per_second(step: StepPlan, plan: RunPlan) -> Optional[Tuple[float, float]]:
  """(images/s per chip, per slice) by libtpu's estimate of `step`'s time, or None."""
  seconds = estimated_seconds(step.cycles, plan.device_kind)
  if seconds is None:
    return None
  per_device = step.batch_per_device / seconds
  return per_device * plan.devices / plan.chips, per_device * plan.devices


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
    return (f'Fits: {_size(worst)} of the {_gib(plan.usable)} GiB planned per device.')
  return 'Does not fit.\n' + advice(config, plan)


def compare(config, devices: Sequence, topology: str = '', log=print
            ) -> List[Tuple[str, bool, RunPlan]]:
  """(memory_saving, scan_blocks, its plan of the train step) of each variant of
  `config`'s run, fastest memory saving first: one compile each. A model that cannot
  scan its blocks (pruned widths) gets the unscanned rows, and the log says why."""
  from resnet_jax.models.resnet import MEMORY_SAVING  # pylint: disable=g-import-not-at-top
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
    memory = _size(step.total_bytes * per_chip) if step.memory else 'out of HBM'
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
