"""ResNet-50 on ImageNet with timm's "ResNet strikes back" A2 recipe (300 epochs)."""

from resnet_jax.configs import imagenet_resnet50_a1


def get_config():
  """RSB A2 (arXiv 2110.00476, Table 1): 79.8% top-1 at 224.

  A1's recipe (see imagenet_resnet50_a1.py) for 300 epochs, with weight decay 0.02, Mixup
  0.1 and no label smoothing; LAMB lr 5e-3 at batch 2048, BCE (threshold 0.2),
  rand-m7-mstd0.5-inc1, CutMix 1.0, repeated augmentation x3 and drop path 0.05 as A1.

  ImageNet needs a manual download (`tfds build imagenet2012`); then
  python train.py --config configs/imagenet_resnet50_a2.py --workdir workdirs/rsb_a2 \\
      --config.data_dir=/path/to/tensorflow_datasets
  """
  config = imagenet_resnet50_a1.get_config()
  config.num_epochs = 300
  config.weight_decay = 0.02
  config.mixup_alpha = 0.1
  config.label_smoothing = 0.0
  return config
