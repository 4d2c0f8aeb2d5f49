"""What a compiled train or eval step costs per device: XLA's memory and FLOPs accounting
and libtpu's cost-model estimate of its cycles (`op_cycles`: an estimate, not a
measurement). The planner reports these figures; the trainer compiles through
`compile_run_step` when memory_saving='auto' has to choose."""

import re
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax

from resnet_jax.train.build import abstract_batch

GiB = 2**30

# Clock of each generation, to turn libtpu's estimated cycles into seconds: peak bf16
# FLOP/s per chip (the pages of `resnet_jax.plan.HBM_PER_CHIP`) over the FLOPs its matrix units do per
# clock (2 per cell of each MXU per cycle). v4: 275 TFLOP/s, 2 TensorCores of 4 MXUs of
# 128x128 -> 275e12 / (8 * 128**2 * 2) = 1.05 GHz. v5e: 197 TFLOP/s, 4 MXUs of 128x128 ->
# 1.50 GHz. v5p: 459 TFLOP/s, 2 TensorCores of 4 MXUs of 128x128 -> 1.75 GHz. v6e:
# 918 TFLOP/s; its page names two 256x256 MXUs, which would need 3.5 GHz, but libtpu's
# own model runs a 4096^3 bf16 matmul at 455k FLOPs per cycle (v5e: 127k of 131k), more
# than two such MXUs could (262k): four, 524,288 FLOPs per cycle -> 1.75 GHz. Each
# generation's figure was checked that way (2026-12-06: v4 117k of 131k per TensorCore,
# the device jax sees there; v5p 252k of 262k); libtpu's cycles are a device's.
CLOCK_HZ = {'TPU v4': 1.05e9, 'TPU v5 lite': 1.5e9, 'TPU v5': 1.75e9, 'TPU v6 lite': 1.75e9}
# train.py copies this many batches to the devices ahead of the step that takes them
# (parallel.device_batches); they sit next to the step's own buffers.
BATCHES_AHEAD = 2


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
  cycles: Optional[int] = None  # libtpu's estimate of the step's cycles (`op_cycles`)
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

def compile_step(name: str, fn, args, batch_per_device: int, input_bytes: int) -> StepPlan:
  """Lowers and compiles `fn(*args)`; an out-of-HBM compile is a plan that does not fit."""
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

def compile_run_step(name: str, config, parts, mesh, channels: int) -> StepPlan:
  """The 'train' or 'eval' step of a run's `parts` (`build_run`), compiled for its state
  and the batches of `config` over `mesh`."""
  state = jax.eval_shape(parts.init_state, jax.random.PRNGKey(config.seed))
  batch_size = config.batch_size if name == 'train' else config.eval_batch_size
  batch = abstract_batch(config, mesh, channels, batch_size, eval_mask=name == 'eval')
  per_device = batch_size // mesh.devices.size
  input_bytes = per_device * sum(x.dtype.itemsize * int(x.size) // batch_size
                                 for x in batch.values())
  fn = parts.train_fn if name == 'train' else parts.eval_fn
  return compile_step(name, fn, (state, batch), per_device, input_bytes)

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


def size_text(n) -> str:
  """Bytes as GiB, or MiB below 1 GiB."""
  return f'{n / GiB:.2f} GiB' if n >= GiB else f'{n / 2**20:.2f} MiB'
