"""ResNet-50 on ImageNet with torchvision's V2 recipe (the IMAGENET1K_V2 weights)."""

from resnet_jax.configs import imagenet_resnet50
from resnet_jax.train.config_schema import model_overrides


def get_config():
  """torchvision's "new training recipe": 600 epochs, 80.858% top-1 (its published
  ResNet50_Weights.IMAGENET1K_V2, evaluated with the EMA weights at 224 after a resize to
  232).

  Source: torchvision's references/classification README (ResNet-50 V2) and the blog
  "How to Train State-Of-The-Art Models Using TorchVision's Latest Primitives":
    torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5
      --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear
      --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002
      --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
      --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4
  (model-ema: decay 0.99998 every 32 steps, with torchvision's adjustment). Differences:
  the warmup starts from 0 (torchvision's from 0.01 x lr), the train crop is resized
  without antialiasing (README, Data).

  ImageNet needs a manual download (`tfds build imagenet2012`); then
  python train.py --config configs/imagenet_resnet50_tv2.py --workdir workdirs/tv2 \\
      --config.data_dir=/path/to/tensorflow_datasets
  """
  config = imagenet_resnet50.get_config()  # ImageNet, bfloat16, the 'imagenet' transforms
  config.model_overrides = model_overrides()  # torchvision: no zero-init BN
  # Data: inception crop 176 + flip + TA-wide + random erasing; eval 224 of 232.
  config.train_image_size = 176
  config.eval_image_size = 224
  config.eval_resize_size = 232
  config.auto_augment = 'ta_wide'
  config.random_erase = 0.1
  config.repeated_augmentation = 4
  # Optimization: SGD with momentum 0.9 (no Nesterov), lr 0.5 at batch 1024.
  config.num_epochs = 600
  config.optimizer = 'sgd'
  config.learning_rate = 0.5
  config.learning_rate_batch_base = 1024  # lr = 0.5 * batch_size / 1024
  config.nesterov = False
  config.weight_decay = 2e-5
  config.weight_decay_exclude_norm = True  # --norm-weight-decay 0.0
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.2
  config.cutmix_alpha = 1.0
  config.ema_decay = 0.99998
  config.ema_every_steps = 32
  config.best_metric = 'eval_ema/top1'  # the published weights are the EMA's
  return config
