"""Random images of any size, to measure training speed without a dataset."""

from resnet_jax.configs import default
from resnet_jax.train.config_schema import model_overrides


def get_config():
  """ResNet-50 training throughput on random 224x224 images, bfloat16, batch 256.

  python train.py --config configs/synthetic.py --workdir /tmp/resnet_jax/synthetic \\
      --config.model=resnet18 --config.batch_size=128 --config.image_size=160
  """
  config = default.get_config()
  config.model = 'resnet50'
  config.model_overrides = model_overrides()
  config.dtype = 'bfloat16'
  config.dataset = 'synthetic'  # one fixed random batch, repeated; no TensorFlow
  config.num_classes = 1000
  config.in_channels = 3
  config.image_size = 224
  config.preprocess = 'none'
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 100
  config.learning_rate = 0.1
  config.schedule = 'constant'
  config.warmup_steps = 0
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 1
  return config
