"""Packaging promises: a light import, and a README whose test command CI runs verbatim."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_import_pulls_in_neither_tensorflow_nor_torch():
  code = ('import sys, resnet_jax; m = resnet_jax.create_model("resnet18"); '
          'print(sorted({"tensorflow", "torch", "orbax", "optax"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


@pytest.mark.slow
def test_importing_the_planner_leaves_the_environment_alone():
  """libtpu's settings are the planner's to make when it compiles, not a side effect of an
  import (they would reach every JAX process and TF log level of the importer); the same
  for the trainer and evaluate."""
  code = ('import os, jax, tensorflow; before = dict(os.environ); import resnet_jax.plan; '
          'import resnet_jax.train.loop, resnet_jax.evaluate; '
          'print(sorted(k for k in {**before, **os.environ} '
          'if before.get(k) != os.environ.get(k)))')
  # Without the variables those modules would set (this test process may have set them).
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'TF_CPP'))}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env=env)
  assert out.stdout.strip() == '[]', out.stdout


def _extra(name, extras):
  """The requirements of extra `name`, with this project's own extras expanded."""
  found = []
  for requirement in extras[name]:
    own = re.fullmatch(r'resnet_jax\[(.*)\]', requirement.replace(' ', ''))
    found += ([r for inner in own.group(1).split(',') for r in _extra(inner, extras)]
              if own else [requirement])
  return found


def test_the_test_extra_installs_no_libtpu():
  """libtpu makes JAX processes on a machine without a TPU print its errors: only the
  `tpu` extra (the planner's) installs it."""
  tomllib = pytest.importorskip('tomllib')
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project'][
      'optional-dependencies']
  assert any(r.startswith('libtpu') for r in _extra('tpu', extras))
  for name in extras:
    if name != 'tpu':
      assert not [r for r in _extra(name, extras) if r.startswith('libtpu')], name


def _readme_commands():
  readme = (ROOT / 'README.md').read_text()
  return re.findall(r'```(?:bash|sh)\n(.*?)```', readme, re.DOTALL)


def test_readme_test_command_is_what_ci_runs():
  ci = (ROOT / '.ci' / 'run').read_text()
  test_blocks = [b for b in _readme_commands() if 'pytest' in b]
  assert test_blocks, 'README must give the command that runs the tests'
  for line in test_blocks[0].strip().splitlines():
    assert line in ci, f'README test command line not run by .ci/run: {line}'


def _collected(*flags):
  """(selected, collected) by `pytest --collect-only FLAGS tests` run as a user would."""
  output = subprocess.run(
      [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider',
       *flags, 'tests'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  counts = re.search(r'^(\d+)(?:/(\d+))? tests collected', output, re.MULTILINE)
  return int(counts[1]), int(counts[2] or counts[1])


@pytest.mark.slow
def test_readme_quick_tier_command_leaves_out_the_slow_tests():
  """The README's quick-tier command, collected: the tests not marked slow, fewer than
  all the tests collected (one collection says both: "N/M tests collected")."""
  assert '`python -m pytest -m "not slow" -q -n 2`' in (ROOT / 'README.md').read_text()
  quick, everything = _collected('-m', 'not slow')
  assert 0 < quick < everything


def _export_for_the_serving_example(directory):
  """What the README's export command leaves for its serving example: resnet50.jaxexport
  (of a small model at the same 224x224 input, to keep the test fast)."""
  import jax
  from resnet_jax import create_model, export
  from resnet_jax.train.checkpoint_format import save_converted
  model = create_model('cifar_resnet20')
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
  save_converted(variables, {'name': 'cifar_resnet20', 'num_classes': 10},
                 directory / 'converted')
  export.main(['--checkpoint', str(directory / 'converted'), '--output',
               str(directory / 'resnet50.jaxexport'), '--platforms', 'cpu'])


def test_readme_python_examples_run(tmp_path, monkeypatch):
  readme = (ROOT / 'README.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', readme, re.DOTALL)
  assert blocks
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    if 'resnet50.jaxexport' in block:
      _export_for_the_serving_example(tmp_path)
    exec(compile(block, 'README.md', 'exec'), {})
