"""ResNet-50 on ImageNet, the well-known 90-epoch recipe (Goyal et al. 2017 + cosine)."""

from resnet_jax.configs import default
from resnet_jax.train.config_schema import model_overrides


def get_config():
  """ResNet-50 on imagenet2012: 90 epochs, batch 1024, bf16, ~76-77% top-1.

  ImageNet needs a manual download: see `tfds build imagenet2012`; then
  python train.py --config configs/imagenet_resnet50.py --workdir workdirs/imagenet_resnet50 \\
      --config.data_dir=/path/to/tensorflow_datasets
  """
  config = default.get_config()
  config.model = 'resnet50'
  # Last BN of each block starts at zero, so every block starts as the identity.
  config.model_overrides = model_overrides(zero_init_residual=True)
  config.dtype = 'bfloat16'  # compute; params and BN statistics stay float32
  config.bn_group_size = 0  # synchronized BN over the global batch; 32 for per-GPU BN
  # Data: inception crop + flip for training; resize to 256 + center crop 224 for eval.
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.preprocess = 'imagenet'
  config.image_size = 224
  config.shuffle_buffer = 16_384
  # Optimization: SGD + Nesterov momentum, lr 0.1 per 256 images, 5 warmup epochs, cosine.
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_train_steps = -1
  config.num_epochs = 90
  config.learning_rate = 0.1
  config.learning_rate_batch_base = 256  # lr = 0.1 * batch_size / 256
  config.schedule = 'cosine'
  config.warmup_steps = 0
  config.warmup_epochs = 5
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.weight_decay_exclude_bn_and_bias = False
  config.label_smoothing = 0.0  # 0.1 adds ~0.3% top-1
  # Run.
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_500
  config.keep_checkpoints = 3
  return config
