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
