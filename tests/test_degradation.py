"""Tests of experiments/degradation.py on tiny models (the degradation itself is checked by
running `python experiments/degradation.py --quick`, which takes minutes)."""

import csv
import importlib.util

import pytest
from helpers import REPO, TINY_MODEL

SCRIPT = REPO / 'experiments' / 'degradation.py'


@pytest.fixture(scope='module')
def degradation():
  spec = importlib.util.spec_from_file_location('degradation', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def tiny_quick_config(degradation, monkeypatch):
  """Makes --quick train 4-block nets on batches of 32, evaluated once, in seconds."""
  quick_config = degradation.quick_config

  def tiny(model):
    config = quick_config(model)
    config.model_overrides = TINY_MODEL
    config.update(dict(batch_size=32, eval_batch_size=360, eval_every_steps=0))
    return config

  monkeypatch.setattr(degradation, 'quick_config', tiny)


def test_quick_recipe_is_the_paper_recipe_shrunk(degradation):
  paper = degradation.paper_config('cifar_plain56')
  quick = degradation.quick_config('cifar_plain56')
  assert paper.model == quick.model == 'cifar_plain56'
  assert (paper.dataset, paper.num_train_steps, paper.lr_boundaries) == (
      'cifar10', 64_000, (32_000, 48_000))
  for key in ('schedule', 'lr_decay_factor', 'momentum', 'nesterov', 'weight_decay',
              'batch_size'):
    assert paper[key] == quick[key], key


def test_set_steps_scales_schedule(degradation):
  config = degradation.set_steps(degradation.paper_config('cifar_resnet20'), 6_400)
  assert (config.num_train_steps, config.lr_boundaries) == (6_400, (3_200, 4_800))
  assert (config.log_every_steps, config.eval_every_steps) == (20, 200)
  config = degradation.set_steps(degradation.quick_config('cifar_resnet20'), 600)
  assert (config.num_train_steps, config.lr_boundaries, config.warmup_steps) == (600, (450,), 60)


def test_verdict(degradation):
  def finals(plain20, plain56, resnet20, resnet56):
    errors = dict(zip(degradation.MODELS, (plain20, plain56, resnet20, resnet56)))
    return {m: {'train_error': e, 'test_error': e} for m, e in errors.items()}
  assert degradation.degradation(finals(0.05, 0.10, 0.04, 0.045)) == {
      'plain_degrades': True, 'resnet_does_not': True}
  assert degradation.degradation(finals(0.10, 0.05, 0.04, 0.10)) == {
      'plain_degrades': False, 'resnet_does_not': False}


def test_quick_cli_writes_csv_and_png_and_reuses_runs(degradation, tiny_quick_config,
                                                        tmp_path, capsys):
  out, root = tmp_path / 'figure6.png', tmp_path / 'runs'
  argv = ['--quick', '--steps', '4', '--workdir', str(root), '--out', str(out),
          '--jax_cache_dir', '']
  degradation.main(argv)
  assert out.stat().st_size > 0
  assert 'degradation observed:' in capsys.readouterr().out
  with open(tmp_path / 'figure6.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['step', 'model', 'train_error', 'test_error']
  assert {r['model'] for r in rows} == set(degradation.MODELS)
  for model in degradation.MODELS:
    steps = [int(r['step']) for r in rows if r['model'] == model]
    assert steps == [1, 2, 3, 4], steps  # logged every step, evaluated at the end
    last = [r for r in rows if r['model'] == model][-1]
    assert 0 <= float(last['train_error']) <= 1 and 0 <= float(last['test_error']) <= 1

  metrics = root / 'cifar_plain56' / 'metrics.jsonl'
  before = metrics.read_text()
  degradation.main(argv)
  assert metrics.read_text() == before, 'a finished run was trained again'
  assert 'reusing the finished run' in capsys.readouterr().out

  with pytest.raises(ValueError, match='another config'):
    degradation.main(argv[:2] + ['5'] + argv[3:])
