"""ResNet-50 on ImageNet with timm's "ResNet strikes back" A3 recipe (100 epochs at 160)."""

from resnet_jax.configs import imagenet_resnet50_a1


def get_config():
  """RSB A3 (arXiv 2110.00476, Table 1): 78.1% top-1 at 224 (trained at 160).

  100 epochs of 160x160 crops, evaluated on 224 crops (ratio 0.95); LAMB lr 8e-3 at batch
  2048, weight decay 0.02, BCE (threshold 0.2) without label smoothing,
  rand-m6-mstd0.5-inc1, Mixup 0.1 / CutMix 1.0; no repeated augmentation, no drop path.

  ImageNet needs a manual download (`tfds build imagenet2012`); then
  python train.py --config configs/imagenet_resnet50_a3.py --workdir workdirs/rsb_a3 \\
      --config.data_dir=/path/to/tensorflow_datasets
  """
  config = imagenet_resnet50_a1.get_config()
  config.num_epochs = 100
  config.train_image_size = 160
  config.eval_image_size = 224
  config.learning_rate = 8e-3
  config.weight_decay = 0.02
  config.label_smoothing = 0.0
  config.auto_augment = 'rand-m6-mstd0.5-inc1'
  config.mixup_alpha = 0.1
  config.repeated_augmentation = 1
  config.drop_path_rate = 0.0
  return config
