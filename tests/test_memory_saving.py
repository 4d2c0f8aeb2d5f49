"""config.model_overrides.memory_saving: one name for the remat fields, and 'auto', which
picks at start-up the fastest setting whose compiled train step fits the devices' memory.

The devices' memory limit is injected (CPU devices report none); the sizes the choice is
checked against are compiled here independently, setting by setting.
"""

import contextlib
import json

import pytest

from helpers import tiny_digits_config
from resnet_jax.errors import UserError
from resnet_jax.models.resnet import MEMORY_SAVING
from resnet_jax.train import config_schema, memory_saving, parallel, run_dir
from resnet_jax.train import step_cost
from resnet_jax.train.build import build_run
from resnet_jax.train.loop import train_and_evaluate


def _auto(**overrides):
  return memory_saving.with_overrides(tiny_digits_config(**overrides), memory_saving='auto')


def _sizes(config) -> dict:
  """{setting: total bytes per device of its train step}, each compiled here."""
  mesh = parallel.create_mesh()
  sizes = {}
  for name in MEMORY_SAVING:
    trial = memory_saving.with_overrides(config, memory_saving=name)
    parts = build_run(trial, mesh, 10, 1, steps_per_epoch=10)
    sizes[name] = step_cost.compile_run_step('train', trial, parts, mesh, 1).total_bytes
  return sizes


def _capacity_between(fits: float, does_not: float) -> float:
  """A capacity whose usable share (less the planner's margin) lies between two sizes."""
  return (fits + does_not) / 2 / (1 - memory_saving.SAFETY_MARGIN)


def test_memory_saving_names_the_remat_fields():
  for name, fields in MEMORY_SAVING.items():
    spec = run_dir.model_config_of_run(
        memory_saving.with_overrides(tiny_digits_config(), memory_saving=name), 10, 1)
    assert {k: spec[k] for k in ('remat', 'elementwise_remat')} == fields
    assert 'memory_saving' not in spec  # model.json keeps the fields, the one record
  with pytest.raises(UserError, match="memory_saving='full' sets remat itself"):
    config_schema.check_model_overrides({'memory_saving': 'full', 'remat': True})
  with pytest.raises(UserError, match="must be one of 'none', 'elementwise', 'full', 'auto'"):
    config_schema.check_model_overrides({'memory_saving': 'some'})
  with pytest.raises(UserError, match="'auto' is chosen at start-up"):
    run_dir.model_config_of_run(_auto(), 10, 1)


def test_auto_picks_the_fastest_that_fits():
  """A limit below the fastest setting's step and above the next: the next; no limit,
  or a large one: the fastest; a limit below all: the one that needs least, saying none
  fits."""
  config = _auto()
  sizes = _sizes(config)
  smaller = min(sizes['elementwise'], sizes['full'])
  assert smaller < sizes['none'], sizes  # else the small limit below tests nothing
  expected = 'elementwise' if sizes['elementwise'] < sizes['none'] else 'full'
  mesh = parallel.create_mesh()

  def choose(capacity):
    said, compiled = [], []

    def compile_train(trial):
      compiled.append(memory_saving.memory_saving_of(trial))
      parts = build_run(trial, mesh, 10, 1, steps_per_epoch=10)
      return step_cost.compile_run_step('train', trial, parts, mesh, 1)
    chosen, step = memory_saving.choose_memory_saving(config, compile_train, capacity, said.append)
    assert len(said) == 1
    return memory_saving.memory_saving_of(chosen), step, compiled, said[0]

  name, step, compiled, said = choose(_capacity_between(smaller, sizes['none']))
  assert name == expected and compiled == list(MEMORY_SAVING)[:compiled.index(name) + 1]
  assert step.total_bytes == sizes[name]
  assert f"chose {name!r}, the fastest that fits" in said and "'none' needs" in said
  name, step, compiled, said = choose(10 * sizes['none'])
  assert (name, compiled) == ('none', ['none']) and step.total_bytes == sizes['none']
  name, step, compiled, said = choose(None)  # CPU: no limit, nothing compiled
  assert (name, step, compiled) == ('none', None, [])
  assert 'report no memory limit' in said
  name, step, compiled, said = choose(min(sizes.values()) / 2)
  least = min(sizes, key=sizes.get)
  assert (name, compiled) == (least, list(MEMORY_SAVING)) and 'none fits' in said
  assert step.total_bytes == sizes[least]


@contextlib.contextmanager
def _train_step_compiles():
  """The list of compiles of the train step (XLA's, or reads of the persistent cache)
  while in the block, from jax's monitoring events."""
  from jax._src import monitoring  # pylint: disable=g-import-not-at-top
  compiles = []

  def listen(event, seconds, **kwargs):
    del seconds
    if (event == '/jax/core/compile/backend_compile_duration'
        and 'train_step' in str(kwargs.get('fun_name'))):
      compiles.append(kwargs['fun_name'])
  monitoring.register_event_duration_secs_listener(listen)
  try:
    yield compiles
  finally:
    monitoring.unregister_event_duration_listener(listen)


@pytest.mark.slow  # two short training runs
def test_train_with_auto_uses_the_step_it_compiled_and_resumes_with_another(
    tmp_path, monkeypatch, capsys):
  """The trainer with a limit that only a memory-saving setting fits: it trains with that
  setting (model.json), compiling the train step only for the settings it tried (none,
  then the one used: not again for the loop); resumed where the devices report no limit, the
  same workdir continues with the fastest setting."""
  config = _auto(num_train_steps=2, eval_every_steps=0)
  sizes = _sizes(config)
  smaller = min(sizes['elementwise'], sizes['full'])
  expected = 'elementwise' if sizes['elementwise'] < sizes['none'] else 'full'
  monkeypatch.setattr(memory_saving, 'device_capacity',
                      lambda devices: _capacity_between(smaller, sizes['none']))
  workdir = str(tmp_path / 'run')
  with _train_step_compiles() as compiles:
    train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert f"memory_saving='auto' chose {expected!r}" in out
  assert len(compiles) == list(MEMORY_SAVING).index(expected) + 1, compiles
  spec = json.loads((tmp_path / 'run' / 'model.json').read_text())
  assert {k: spec[k] for k in ('remat', 'elementwise_remat')} == MEMORY_SAVING[expected]
  monkeypatch.setattr(memory_saving, 'device_capacity', lambda devices: None)
  train_and_evaluate(_auto(num_train_steps=4, eval_every_steps=0), workdir)
  out = capsys.readouterr().out
  assert "memory_saving='auto' chose 'none'" in out and 'Resumed from' in out
  assert 'Resuming with a changed execution setting' in out
  spec = json.loads((tmp_path / 'run' / 'model.json').read_text())
  assert not spec['remat'] and not spec['elementwise_remat']
