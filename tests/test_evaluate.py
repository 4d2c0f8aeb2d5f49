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
