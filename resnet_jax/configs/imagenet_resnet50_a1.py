"""ResNet-50 on ImageNet with timm's "ResNet strikes back" A1 recipe (600 epochs)."""

from resnet_jax.configs import imagenet_resnet50

# timm evaluates the RSB models on a 224 crop of 224 / 0.95 (crop_pct 0.95), bicubic.
RSB_EVAL_RESIZE = 235  # math.floor(224 / 0.95), timm's scale_size


def get_config():
  """RSB A1 (Wightman, Touvron, Jegou 2021, arXiv 2110.00476, Table 1): 80.4% top-1 at 224.

  600 epochs at batch 2048 with LAMB (lr 5e-3, weight decay 0.01, none on BN and biases),
  cosine with 5 warmup epochs, binary cross-entropy (targets thresholded at 0.2) with
  label smoothing 0.1, RandAugment rand-m7-mstd0.5-inc1, Mixup 0.2 / CutMix 1.0, repeated
  augmentation x3, drop path 0.05, no EMA, no random erasing; eval crop ratio 0.95.
  Differences: our warmup starts from 0 (timm's from 1e-4) and the schedule steps every
  batch (timm's every epoch); images are resized bilinearly (timm evaluates bicubic).

  ImageNet needs a manual download (`tfds build imagenet2012`); then
  python train.py --config configs/imagenet_resnet50_a1.py --workdir workdirs/rsb_a1 \\
      --config.data_dir=/path/to/tensorflow_datasets
  """
  config = imagenet_resnet50.get_config()  # ImageNet, bfloat16, zero-init last BN (timm's)
  config.drop_path_rate = 0.05
  config.eval_resize_size = RSB_EVAL_RESIZE
  config.auto_augment = 'rand-m7-mstd0.5-inc1'
  config.random_erase = 0.0
  config.repeated_augmentation = 3
  config.batch_size = 2048
  config.num_epochs = 600
  config.optimizer = 'lamb'
  config.learning_rate = 5e-3
  config.learning_rate_batch_base = 2048  # lr = 5e-3 * batch_size / 2048
  config.end_learning_rate = 1e-6  # timm's min_lr
  config.adam_eps = 1e-6  # timm's Lamb
  config.grad_clip_norm = 1.0  # timm's Lamb clips the global gradient norm at 1
  config.weight_decay = 0.01
  config.weight_decay_exclude_bn_and_bias = True
  config.label_smoothing = 0.1
  config.loss = 'bce'
  config.bce_target_thresh = 0.2
  config.mixup_alpha = 0.2
  config.cutmix_alpha = 1.0
  return config
