"""Tests of `python -m resnet_jax.evaluate`."""

from resnet_jax import evaluate


def test_evaluate_workdir_matches_the_in_training_eval(trained_workdir, capsys):
  workdir, in_training = trained_workdir
  results = evaluate.main(['--workdir', workdir])
  assert results == in_training
  assert 'top-1' in capsys.readouterr().out


def test_evaluate_checkpoint_directory(trained_workdir):
  workdir, in_training = trained_workdir
  results = evaluate.evaluate(checkpoint=workdir, dataset='digits', preprocess='digits',
                              image_size=8, split='test')
  assert results['top1'] == in_training['top1'] and results['count'] == 360


def test_a_checkpoints_input_spec_gives_the_image_size(trained_workdir):
  workdir, in_training = trained_workdir
  results = evaluate.evaluate(checkpoint=workdir, dataset='digits', preprocess='digits',
                              split='test')  # no image_size: the spec's 8, not 224
  assert results['top1'] == in_training['top1'] and results['count'] == 360


def test_a_pipeline_that_is_not_the_checkpoints_transform_is_warned_of(trained_workdir, tmp_path,
                                                                      caplog):
  import json
  import shutil
  workdir, _ = trained_workdir
  shutil.copytree(workdir, tmp_path / 'run')
  spec = json.loads((tmp_path / 'run' / 'input_spec.json').read_text())
  (tmp_path / 'run' / 'input_spec.json').write_text(json.dumps({
      **spec, 'interpolation': 'bicubic', 'mean': [0.5], 'std': [0.5]}))
  evaluate.evaluate(checkpoint=str(tmp_path / 'run'), dataset='digits', preprocess='digits',
                    split='test')
  warned = [r.getMessage() for r in caplog.records if 'not the preprocessing' in r.getMessage()]
  assert len(warned) == 1, caplog.text
  assert 'interpolation bilinear (its own: bicubic)' in warned[0]
  assert 'mean (0.3,) (its own: (0.5,))' in warned[0]


def test_a_run_with_a_weight_ema_is_evaluated_with_it(tmp_path, capsys):
  """A workdir is read with the weight EMA its run kept (and says so in one line);
  --raw_weights reads the trained weights. Each matches the evaluation the run reported
  for it (eval_ema/... and eval/...)."""
  from helpers import tiny_digits_config
  from resnet_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path)
  in_training = train_and_evaluate(tiny_digits_config(ema_decay=0.999, ema_every_steps=1),
                                   workdir)
  capsys.readouterr()
  ema = evaluate.main(['--workdir', workdir])
  assert capsys.readouterr().out.count('Using the weight EMA of checkpoint 4 in ') == 1
  raw = evaluate.main(['--workdir', workdir, '--raw_weights'])
  assert 'weight EMA' not in capsys.readouterr().out
  assert ema == {k[len('ema_'):]: v for k, v in in_training.items() if k.startswith('ema_')}
  assert raw == {k: v for k, v in in_training.items() if not k.startswith('ema_')}
  assert ema['loss'] != raw['loss']
