"""Evaluate a checkpoint on a dataset split and print top-1 / top-5.

    python -m resnet_jax.evaluate --workdir DIR [--step N] [--split test]
    python -m resnet_jax.evaluate --checkpoint CONVERTED_DIR --dataset imagenet2012 \\
        --split validation
    python -m resnet_jax.evaluate --pretrained resnet50d.ra4_e3600_r224_in1k \\
        --dataset imagenet2012 --split validation

A training workdir brings its own dataset settings (config.json) and model (model.json)
and is evaluated with its recipe's eval transform, as in training. A converted checkpoint
or pretrained weights are evaluated with their own input spec (input_spec.json, the
weights' own preprocessing for pretrained names: resize or crop_pct, interpolation, crop,
mean and std), applied as `predict` applies it (`data.spec_eval`); --image_size then
changes the crop and scales the resize with it. Passing --preprocess evaluates with that
recipe instead, and a warning says what differs from the checkpoint's own spec.
"""

import argparse
import sys
from typing import Optional

import jax
from absl import logging
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import input_spec
from resnet_jax.train import checkpoint_format, run_dir
from resnet_jax.accelerators import quiet_libtpu_without_tpu
from resnet_jax.data import create_pipeline
from resnet_jax.data.sources import DatasetNotPreparedError
from resnet_jax.errors import UserError
from resnet_jax.train.evaluation import evaluate_split
from resnet_jax.train.parallel import DATA_AXIS, compile_steps, create_mesh
from resnet_jax.train.state import TrainState

DATA_KEYS = ('dataset', 'data_dir', 'preprocess', 'image_size')


def _dataset_config(workdir: Optional[str], overrides: dict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'dataset': 'imagenet2012', 'data_dir': '', 'preprocess': 'imagenet', 'image_size': 224,
      'train_split': 'train', 'eval_split': 'validation', 'eval_batch_size': 256,
      'batch_size': 1, 'seed': 0, 'num_classes': 1000, 'in_channels': 3,
      'shuffle_buffer': 1, 'synthetic_train_size': 1, 'synthetic_eval_size': 1024,
      'input_pipeline': 'tf.data', 'train_image_size': 0, 'eval_image_size': 0,
      'eval_resize_size': 0, 'repeated_augmentation': 1})
  if workdir:
    saved = run_dir.read_run_config(workdir)
    if saved is None:
      raise UserError(f'{workdir} is not a train.py workdir: it has no '
                      f'{run_dir.CONFIG_JSON}. Pass the --workdir of a training run, or '
                      f'--checkpoint for a converted checkpoint.')
    # Not the run's batch_size: evaluating reads no training batch, whatever its size.
    config.update({k: v for k, v in saved.items() if k in config and k != 'batch_size'})
  config.update({k: v for k, v in overrides.items() if v is not None})
  return config


def _checkpoint_spec(checkpoint: str) -> input_spec.InputSpec:
  model_config = run_dir.read_model_config(checkpoint)
  return input_spec.of_checkpoint(checkpoint, model_config.get('num_classes', 1000),
                                  model_config.get('in_channels', 3))


def _checked_against_spec(checkpoint: str, config: ml_collections.ConfigDict) -> None:
  """Warns when the pipeline's eval transform is not the checkpoint's own input spec."""
  spec = _checkpoint_spec(checkpoint)
  applied = input_spec.of_config(config)
  fields = ('crop_size', 'resize_size', 'interpolation', 'mean', 'std')
  differ = [f'{f} {getattr(applied, f)} (its own: {getattr(spec, f)})' for f in fields
            if getattr(applied, f) != getattr(spec, f)]
  if differ:
    logging.warning('The %s pipeline evaluates %s with %s: not the preprocessing its '
                    'weights were made for (%s), so the accuracy is not the published one.',
                    config.preprocess, checkpoint, '; '.join(differ), run_dir.INPUT_SPEC_JSON)


def _spec_image_size(checkpoint: Optional[str], overrides: dict) -> dict:
  """The overrides, with --image_size defaulting to a converted checkpoint's spec."""
  if checkpoint is None or overrides.get('image_size') is not None:
    return overrides
  return {**overrides, 'image_size': _checkpoint_spec(checkpoint).crop_size}


def _applied_spec(checkpoint: Optional[str], pretrained: Optional[str],
                  overrides: dict) -> Optional[input_spec.InputSpec]:
  """The input spec the evaluation applies: that of pretrained weights or of a converted
  checkpoint (at --image_size when given); None for a training run (its recipe) or when
  --preprocess chose a recipe."""
  if overrides.get('preprocess') is not None:
    return None
  if pretrained is not None:
    from resnet_jax.pretrained import input_spec as pretrained_input_spec
    spec = pretrained_input_spec(pretrained)
  elif checkpoint is not None and not run_dir.is_training_workdir(checkpoint):
    spec = _checkpoint_spec(checkpoint)
  else:
    return None
  size = overrides.get('image_size')
  return spec if size is None else spec.at_crop_size(size)


def _load(workdir, checkpoint, pretrained, step, raw_weights, replicated):
  """(model, variables on the devices) of whichever source was given."""
  if workdir:
    return checkpoint_format.restore_run(workdir, step, replicated, raw_weights)
  if pretrained:
    from resnet_jax.pretrained import load_pretrained
    model, variables = load_pretrained(pretrained)
  else:
    model, variables = checkpoint_format.load_model(checkpoint)
  return model, jax.device_put(variables, replicated)


def evaluate(workdir: Optional[str] = None, checkpoint: Optional[str] = None,
             pretrained: Optional[str] = None, step: Optional[int] = None,
             split: Optional[str] = None, batch_size: Optional[int] = None,
             raw_weights: bool = False, **dataset_overrides) -> dict:
  """{'loss', 'top1', 'top5', 'count'} of a workdir's checkpoint (default: the newest that
  reads, also while train.py writes the workdir; nothing is moved; its weight EMA when the
  run kept one, unless `raw_weights`), of a converted checkpoint directory or of
  pretrained weights by name (those two with their own input spec unless a `preprocess`
  recipe is given), on `split` (default: the run's eval split)."""
  if sum(bool(x) for x in (workdir, checkpoint, pretrained)) != 1:  # '': an unset "$VAR"
    raise UserError('Pass exactly one of --workdir (a training run), --checkpoint (a '
                    'converted checkpoint directory) or --pretrained (weights by name).')
  for flag, value in (('--batch_size', batch_size),
                      ('--image_size', dataset_overrides.get('image_size'))):
    if value is not None and value < 1:
      raise UserError(f'{flag} {value}: pass a positive number.')
  spec = _applied_spec(checkpoint, pretrained, dataset_overrides)
  if spec is not None:
    dataset_overrides = {**dataset_overrides, 'image_size': spec.crop_size}
  config = _dataset_config(workdir, _spec_image_size(checkpoint, dataset_overrides))
  if checkpoint and spec is None:
    _checked_against_spec(checkpoint, config)
  mesh = create_mesh()
  replicated = NamedSharding(mesh, P())
  model, variables = _load(workdir, checkpoint, pretrained, step, raw_weights, replicated)
  try:
    pipeline = create_pipeline(config)
  except DatasetNotPreparedError as e:  # its hint names train.py's flag
    raise UserError(str(e).replace('--config.data_dir=DIR', '--data_dir DIR')) from None
  _check_model_fits_data(model, pipeline, config.dataset, spec is None)
  if spec is not None:
    from resnet_jax.data.spec_eval import SpecEvalPipeline
    pipeline = SpecEvalPipeline(pipeline, spec, model.in_channels)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'], tx=optax.identity())
  batch_size = batch_size or config.eval_batch_size
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  _, eval_fn = compile_steps(mesh, pipeline.normalization)
  return evaluate_split(eval_fn, state, pipeline, split or config.eval_split, batch_size,
                        NamedSharding(mesh, P(DATA_AXIS)))


def _check_model_fits_data(model, pipeline, dataset: str, same_channels: bool) -> None:
  """Refuses a dataset of other classes (or, without an input spec that converts them,
  other channels) than the model's: a --dataset of another run's kind."""
  channels_differ = same_channels and model.in_channels != pipeline.channels
  if model.num_classes != pipeline.num_classes or channels_differ:
    raise UserError(f'The model predicts {model.num_classes} classes from images of '
                    f'{model.in_channels} channel(s); dataset {dataset!r} has '
                    f'{pipeline.num_classes} classes and {pipeline.channels} channel(s). '
                    f'Evaluate it on a dataset of its own classes.')


def main(argv=None):
  quiet_libtpu_without_tpu()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a train.py workdir')
  source.add_argument('--checkpoint', help='a converted checkpoint directory')
  source.add_argument('--pretrained', help='pretrained weights by name, e.g. '
                      'resnet50.tv2_in1k (resnet_jax.list_pretrained())')
  parser.add_argument('--step', type=int, help='checkpoint step (default: the newest that '
                      'reads)')
  parser.add_argument('--split', help='dataset split (default: the run\'s eval split)')
  parser.add_argument('--batch_size', type=int, help='eval batch size')
  parser.add_argument('--dataset', help='TFDS name or folder:/path (default: the run\'s)')
  parser.add_argument('--data_dir', help='TFDS data_dir')
  parser.add_argument('--preprocess', help='digits, cifar, imagenet or none (default: the '
                      'run\'s; for --checkpoint/--pretrained, their own input spec)')
  parser.add_argument('--image_size', type=int, help='eval crop size (default: the run\'s '
                      'or the input spec\'s)')
  parser.add_argument('--raw_weights', action='store_true',
                      help='the run\'s trained weights, not its weight EMA (used by default '
                           'when the run kept one)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  try:
    results = evaluate(**vars(args))
  except UserError as e:  # the message says what to fix; a bug shows its traceback
    sys.exit(f'Error: {e}')
  where = args.workdir or args.checkpoint or args.pretrained
  print(f'{where}: top-1 {results["top1"]:.4f} | top-5 {results["top5"]:.4f} | '
        f'loss {results["loss"]:.4f} ({int(results["count"])} images)')
  return results


if __name__ == '__main__':
  main()
