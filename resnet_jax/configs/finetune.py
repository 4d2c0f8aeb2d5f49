"""Fine-tune a converted torchvision ResNet-50 on Imagenette (10 classes)."""

from resnet_jax.configs import default
from resnet_jax.train.config_schema import model_overrides


def get_config():
  """torchvision ResNet-50 weights -> Imagenette; the 1000-class head is re-initialized.

  python -m resnet_jax.convert --arch resnet50 --input resnet50.pth --output converted/resnet50
  python train.py --config configs/finetune.py --workdir workdirs/finetune \\
      --config.init_from=converted/resnet50
  """
  config = default.get_config()
  config.model = 'resnet50'
  config.model_overrides = model_overrides()
  config.init_from = ''  # the converted checkpoint directory (required)
  config.dtype = 'float32'
  # Data: Imagenette (a 10-class ImageNet subset, downloaded by TFDS) at 224x224.
  config.dataset = 'imagenette'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.preprocess = 'imagenet'
  config.image_size = 224
  config.shuffle_buffer = 10_000
  # Optimization: a short cosine schedule at a small learning rate.
  config.batch_size = 64
  config.eval_batch_size = 250
  config.num_train_steps = -1
  config.num_epochs = 5
  config.learning_rate = 0.01
  config.learning_rate_batch_base = 0
  config.schedule = 'cosine'
  config.warmup_steps = 100
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.weight_decay_exclude_bn_and_bias = True
  config.label_smoothing = 0.1
  # Run.
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  return config
