"""The paper's plain 56-layer baseline: ResNet-56 without shortcuts."""

from resnet_jax.configs import cifar10_resnet20


def get_config():
  """Plain-56 on CIFAR-10, the paper's degradation experiment (worse than plain-20).

  python train.py --config configs/cifar10_plain56.py --workdir workdirs/cifar10_plain56
  """
  return cifar10_resnet20.get_config('cifar_plain56')
