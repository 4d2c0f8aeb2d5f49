"""memory_saving='auto': the fastest setting of `MEMORY_SAVING` whose train step fits the
devices' memory, chosen by compiling it (train.py at start-up, the planner for a pod)."""

from typing import Callable, Optional, Tuple

import jax

from resnet_jax.models.resnet import MEMORY_SAVING, MEMORY_SAVING_AUTO
from resnet_jax.train.build import build_run
from resnet_jax.train.step_cost import StepPlan, compile_run_step, size_text

# The share of HBM left free: XLA's figures are exact for the program, but the TPU runtime
# keeps part of HBM for itself (libtpu offers 15.75 GiB of a v5e's 16 GiB to programs) and
# saving a checkpoint or evaluating next to a donated state may need more.
SAFETY_MARGIN = 0.10


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
  needs = lambda step: (size_text(step.total_bytes) if step.memory  # noqa: E731
                        else 'more than the compiler could fit')
  name, step = tried[-1]
  why = f'the fastest that fits: its train step needs {needs(step)} per device'
  if not step.fits(usable):  # none fits: the one that needs least
    name, step = min(tried, key=lambda t: t[1].total_bytes or float('inf'))
    why = f'which needs the least, though none fits: {needs(step)} per device'
  log(f"memory_saving='auto' chose {name!r}, {why}, of {size_text(usable)} usable "
      f"({1 - SAFETY_MARGIN:.0%} of {size_text(capacity)})"
      + ''.join(f'; {n!r} needs {needs(s)}' for n, s in tried if n != name) + '.')
  return with_overrides(config, memory_saving=name), step


def device_capacity(devices) -> Optional[int]:
  """The bytes a program may use on each of this process's `devices` (the least of them),
  as their runtime says (`memory_stats()['bytes_limit']`); None where none says (CPU)."""
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
