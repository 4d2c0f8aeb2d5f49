"""The paper's CIFAR-10 recipe (He et al. 2015, section 4.2) for ResNet-20."""

from resnet_jax.configs import default
from resnet_jax.train.config_schema import model_overrides


def get_config(model: str = 'cifar_resnet20'):
  """ResNet-20 on CIFAR-10: 64k steps of 128, lr 0.1 / 10 at 32k and 48k (~91.7% top-1).

  python train.py --config configs/cifar10_resnet20.py --workdir workdirs/cifar10_resnet20
  """
  config = default.get_config()
  config.model = model
  config.model_overrides = model_overrides()
  # Data: the 50k training images, evaluated on the 10k test images.
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.preprocess = 'cifar'  # 4-pixel zero pad + random 32x32 crop + horizontal flip
  config.image_size = 32
  config.shuffle_buffer = 50_000
  # Optimization: SGD, momentum 0.9, weight decay 1e-4, batch 128.
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_train_steps = 64_000
  config.learning_rate = 0.1
  config.schedule = 'step'
  config.lr_boundaries = (32_000, 48_000)  # divided by 10 at each
  config.lr_decay_factor = 0.1
  config.warmup_steps = 0  # (the paper warms ResNet-110 up at lr 0.01 for 400 steps)
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_exclude_bn_and_bias = False
  config.label_smoothing = 0.0
  # Run.
  config.log_every_steps = 200
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 2
  return config
