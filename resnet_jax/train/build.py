"""What a training run is built from a config: model, optimizer, state and jitted steps.

One function, `build_run`, for train.py (on the devices it has) and for the TPU planner
(`resnet_jax.plan`, on compile-only devices of a topology), so that what is planned is
what runs.
"""

import functools
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from resnet_jax.data import normalization
from resnet_jax.data.sizes import image_sizes
from resnet_jax.errors import UserError
from resnet_jax.models import ResNet, scan_variables
from resnet_jax.models.resnet import check_choices
from resnet_jax.train import checkpoint_format, ema, optim, parallel, run_dir
from resnet_jax.train.step import Recipe
from resnet_jax.train.metrics import log
from resnet_jax.train.state import TrainState, create_train_state


BEST_METRICS = ('eval/top1', 'eval_ema/top1')
EMA_METRIC = 'eval_ema/top1'


class RunParts(NamedTuple):
  """The pieces of a run: `init_state(rng)` places a fresh state on the mesh, and the
  steps are jitted over it (`parallel.compile_steps`)."""
  spec: dict
  model: ResNet
  tx: optax.GradientTransformation
  learning_rate_fn: optax.Schedule
  total_steps: int
  init_state: Callable[[jax.Array], TrainState]
  train_fn: Callable
  eval_fn: Callable


def create_model_checked(spec: dict, image_size: int) -> ResNet:
  """The model of `spec`, or a UserError naming the valid choices."""
  try:
    model = run_dir.model_from_config(spec)
  except UserError as e:
    raise UserError(f'config.model={spec["name"]!r}: {e}') from None
  try:
    check_choices(model)  # before total_stride, which an unknown stem makes wrong
  except ValueError as e:
    raise UserError(f'config.model={spec["name"]!r} with config.model_overrides: {e}'
                    ) from None
  if image_size < model.total_stride:
    raise UserError(f'Images of {image_size}x{image_size} (config.image_size, or '
                    f'train_image_size / eval_image_size) are too small for {spec["name"]}, '
                    f'which downsamples by {model.total_stride}: use image_size >= '
                    f'{model.total_stride}.')
  return model


def build_run(config, mesh: Mesh, num_classes: int, channels: int,
              steps_per_epoch: int) -> RunParts:
  """The model, optimizer, state initializer and steps of `config` over `mesh`."""
  spec = run_dir.model_config_of_run(config, num_classes, channels)
  sizes = image_sizes(config)
  model = create_model_checked(spec, min(sizes.train, sizes.eval))
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
  tx = optim.create_optimizer(config, learning_rate_fn)
  init = functools.partial(create_train_state, model, tx,
                           input_shape=(1, sizes.train, sizes.train, channels),
                           label_smoothing=config.label_smoothing,
                           ema=config.ema_decay > 0)
  statistics = normalization.RECIPE_STATISTICS[normalization.checked_recipe(config.preprocess)]
  train_fn, eval_fn = parallel.compile_steps(mesh, statistics, config.skip_nonfinite_steps,
                                             recipe_of(config, model, steps_per_epoch))
  return RunParts(spec, model, tx, learning_rate_fn,
                  optim.num_train_steps(config, steps_per_epoch),
                  jax.jit(init, out_shardings=parallel.replicated(mesh)), train_fn, eval_fn)


def recipe_of(config, model: ResNet, steps_per_epoch: int) -> Recipe:
  """The train step's `Recipe` of a run."""
  return Recipe(seed=config.seed, drop_path=model.drop_path_rate > 0,
                mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                loss=config.loss, bce_target_thresh=config.bce_target_thresh,
                ema=ema_schedule(config, steps_per_epoch))


def ema_schedule(config, steps_per_epoch: int) -> Optional[ema.EmaSchedule]:
  """The weight EMA's schedule with torchvision's decay adjustment, or None when off."""
  if config.best_metric == EMA_METRIC and not config.ema_decay > 0:
    raise UserError(f'config.best_metric={EMA_METRIC!r} needs a weight EMA: set '
                    f'config.ema_decay (e.g. 0.99998), or best_metric=\'eval/top1\'.')
  if not config.ema_decay > 0:
    return None
  epochs = optim.num_train_steps(config, steps_per_epoch) / steps_per_epoch
  decay = ema.adjusted_decay(config.ema_decay, config.batch_size, config.ema_every_steps,
                             epochs)
  return ema.EmaSchedule(decay, config.ema_every_steps, steps_per_epoch,
                         optim.warmup_steps(config, steps_per_epoch))


def abstract_batch(config, mesh: Mesh, channels: int, batch_size: int,
                   eval_mask: bool = False) -> dict:
  """Shapes and shardings of a global batch of uint8 pixels, as the pipelines make them."""
  sharding = parallel.batch_sharding(mesh)
  size = image_sizes(config).eval if eval_mask else image_sizes(config).train
  batch = {'image': jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.uint8,
                                         sharding=sharding),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  if eval_mask:
    batch['mask'] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sharding)
  return batch


def initialize_from(config, state: TrainState, spec: dict, mesh: Mesh) -> TrainState:
  """`state` with the variables of config.init_from (a pretrained name, a converted
  checkpoint or a training workdir); a head of another size stays fresh."""
  source_model = spec['name']
  try:
    source_model, loaded = _init_from_variables(config.init_from, spec['name'])
    merged = merge_pretrained({'params': state.params, 'batch_stats': state.batch_stats},
                              loaded, spec.get('scan_blocks', False))
  except (UserError, OSError) as e:
    other = (f'it holds a {source_model} and this run trains a {spec["name"]}: pass '
             f'--config.model={source_model}. ' if source_model != spec['name'] else '')
    raise UserError(f'config.init_from={config.init_from!r}: {other}{e}') from None
  merged = jax.device_put(merged, parallel.replicated(mesh))
  log(f'Initialized from {config.init_from}.')
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'])


def _init_from_variables(value: str, model: str):
  """(the model name the weights are of, their variables) for config.init_from."""
  from resnet_jax import pretrained  # pylint: disable=g-import-not-at-top
  from resnet_jax.convert.files import WEIGHT_SUFFIXES  # pylint: disable=g-import-not-at-top
  if pretrained.is_pretrained_name(value):
    return pretrained.PRETRAINED[value][0], pretrained.load_pretrained(value)[1]
  path = Path(value)
  if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
    raise UserError(f'a PyTorch weights file; convert it first (`python -m resnet_jax.convert '
                    f'--arch {model} --input {value} --output DIR`) and pass '
                    f'--config.init_from=DIR.')
  if not path.exists() and os.sep not in value:  # no such folder: a mistyped name?
    try:
      pretrained.load_pretrained(value)
    except UserError as e:  # the unknown name's message, with close names
      raise UserError(f'there is no folder {value!r}. {e}') from None
  variables = checkpoint_format.load_variables(path)
  return run_dir.read_model_config(path)['name'], variables


def merge_pretrained(state_variables: dict, loaded: dict, scan: bool) -> dict:
  """Loaded {'params', 'batch_stats'} over fresh ones; a head of another shape stays fresh."""
  loaded = scan_variables(loaded) if scan else loaded
  merged = {}
  for collection, fresh in state_variables.items():
    fresh_flat = traverse_util.flatten_dict(fresh, sep='/')
    loaded_flat = traverse_util.flatten_dict(loaded.get(collection, {}), sep='/')
    missing = sorted(set(fresh_flat) - set(loaded_flat))
    extra = sorted(set(loaded_flat) - set(fresh_flat))
    missing_body = [k for k in missing if not k.startswith('fc/')]
    if missing_body or [k for k in extra if not k.startswith('fc/')]:
      raise UserError(f'init_from checkpoint does not fit the model ({collection}): missing '
                      f'{missing_body[:10]}, unexpected {extra[:10]}. Check config.model.')
    out = {}
    for key, value in fresh_flat.items():
      old = loaded_flat.get(key)
      keep_fresh = old is None or (key.startswith('fc/') and np.shape(old) != value.shape)
      if not keep_fresh and np.shape(old) != value.shape:
        raise UserError(f'init_from: {collection}/{key} has shape {np.shape(old)}, the model '
                        f'expects {value.shape}.')
      out[key] = value if keep_fresh else np.asarray(old, value.dtype)
    merged[collection] = traverse_util.unflatten_dict(out, sep='/')
  return merged
