"""What the benchmarks share: the project's jitted train step on an abstract state or run
on a batch, and folders of real JPEG files."""

import functools
import io
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import resnet_jax
from resnet_jax.configs import default as configs_default
from resnet_jax.train import optim, parallel, state as train_state


def default_config() -> ml_collections.ConfigDict:
  """configs/default.py's config: every key the trainer reads, at its default."""
  return configs_default.get_config()


def train_state_factory(name, batch, size, mesh=None, **overrides):
  """(model, a function making the project's SGD train state) for `name`; with `mesh`, the
  state is replicated over it as the trainer makes it (build.py), so that the step's
  output state has its input's type and the second step does not compile again."""
  model = resnet_jax.create_model(name, **overrides)
  config = default_config()  # every key the optimizer reads, at its default (SGD)
  config.update(dict(weight_decay=1e-4, momentum=0.9, nesterov=False,
                     weight_decay_exclude_bn_and_bias=False))
  tx = optim.create_optimizer(config, lambda step: 0.1)
  # Jitted: one compile instead of one per initializer op (op by op, a toy model's init
  # took longer than its train step's compile on a CPU). The state is not timed.
  return model, jax.jit(lambda: train_state.create_train_state(
      model, tx, jax.random.PRNGKey(0), (batch, size, size, 3)),
      out_shardings=parallel.replicated(mesh) if mesh else None)


def abstract_train_state(name, batch, size, **overrides):
  """(model, state shapes), without allocating the state."""
  model, make_state = train_state_factory(name, batch, size, **overrides)
  return model, jax.eval_shape(make_state)


def lowered_train_step(name, batch, size, state=None, **overrides):
  """The train step train.py compiles, lowered for `name` at (batch, size, size, 3), on
  `state` (the shapes of `abstract_train_state`, made here if None)."""
  if state is None:
    _, state = abstract_train_state(name, batch, size, **overrides)
  train_fn, _ = parallel.compile_steps(parallel.create_mesh(), normalization(name))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return train_fn.lower(state, {'image': images, 'label': labels})


@functools.lru_cache(maxsize=None)
def _step_parts(name, batch, size, dtype, overrides):
  """(model, state maker, mesh, jitted train step) of one setting, made once per process:
  its runners (synthetic and fed batches) share one compile, each with its own state."""
  mesh = parallel.create_mesh()
  model, make_state = train_state_factory(name, batch, size, mesh, dtype=jnp.dtype(dtype),
                                          **dict(overrides))
  train_fn, _ = parallel.compile_steps(mesh, normalization(name))
  return model, make_state, mesh, train_fn


def jax_runner(name, batch, size, dtype='float32', image_folder=None, **overrides):
  """A closure running `steps` of the project's jitted train step of `name` (with model
  `overrides`), on one synthetic batch or on the input pipeline's batches of `image_folder`."""
  model, make_state, mesh, train_fn = _step_parts(name, batch, size, dtype,
                                                  tuple(sorted(overrides.items())))
  state = make_state()
  sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  if image_folder:
    batches = parallel.device_batches(
        folder_pipeline(image_folder, batch, size).train_batches(), sharding)
  else:
    rng = np.random.default_rng(0)
    host_batch = {'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                  'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}
    batches = itertools.repeat(parallel.global_batch(host_batch, sharding))
  holder = [state]

  def run(steps):
    for _ in range(steps):
      holder[0], metrics = train_fn(holder[0], next(batches))
    jax.block_until_ready(metrics)

  return run


def image_size(name):
  return 32 if name.startswith('cifar') else 224


def normalization(name):
  """The normalization statistics that `name` trains with (in the step)."""
  return 'cifar' if name.startswith('cifar') else 'imagenet'


def versions():
  import torch  # the benchmarks compare with PyTorch; only they import it here
  return (f'jax {jax.__version__}, jaxlib {jax.lib.__version__}, '
          f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), '
          f'torch {torch.__version__}')


def write_jpegs(root, count, classes=4, distinct=64):
  """`count` 500x375 JPEGs (quality 90) in `classes` class folders under `root`: smooth
  synthetic content plus noise, so that decoding costs what a photo costs; `distinct` of
  them differ, the others repeat them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:375, 0:500]
  encoded = []
  for _ in range(min(count, distinct)):
    fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6)]
    channels = [127 + 120 * np.sin(fx * x * (c + 1) + fy * y + phase + c) for c in range(3)]
    image = np.stack(channels, -1) + rng.normal(0, 8, (375, 500, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
    encoded.append(buffer.getvalue())
  for i in range(count):
    folder = os.path.join(root, f'class{i % classes}')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
      f.write(encoded[i % len(encoded)])


PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry')  # bundled


def write_photo_jpegs(root, count, classes=4):
  """`count` JPEGs of real photographs (scikit-image's samples) in `classes` class folders:
  random crops of them scaled to 400-600 pixels on the longer side, at JPEG quality 75-95,
  as ImageNet's photos are."""
  import skimage.data  # pylint: disable=g-import-not-at-top  (benchmarks only)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  photos = [Image.fromarray(getattr(skimage.data, name)()).convert('RGB') for name in PHOTOS]
  for i in range(count):
    photo = photos[i % len(photos)]
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    scale = rng.uniform(400, 600) / max(cw, ch)
    image = photo.crop((x, y, x + cw, y + ch)).resize(
        (round(cw * scale), round(ch * scale)), Image.BICUBIC)
    folder = os.path.join(root, f'class{i % classes}')
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, f'{i:05d}.jpg'), 'JPEG', quality=int(rng.integers(75, 96)))


def folder_pipeline(root, batch, size, input_pipeline='tf.data', auto_augment='',
                    random_erase=0.0):
  """The project's ImageNet training pipeline (decode, inception crop, flip, resize, then
  `auto_augment` and `random_erase` as the config keys) over the image folder `root`, made
  by `input_pipeline` ('tf.data' or 'dali')."""
  from resnet_jax.data import create_pipeline  # TensorFlow: only once torch is imported
  config = default_config()  # every key the pipeline reads, at its default
  config.update(dict(
      dataset=f'folder:{root}', data_dir='', train_split='train', preprocess='imagenet',
      image_size=size, batch_size=batch, seed=0, shuffle_buffer=1024,
      input_pipeline=input_pipeline, auto_augment=auto_augment, random_erase=random_erase))
  return create_pipeline(config)
