"""The paper's CIFAR-10 recipe for ResNet-56 (6n+2 layers, n=9)."""

from resnet_jax.configs import cifar10_resnet20


def get_config():
  """ResNet-56 on CIFAR-10 with the paper's recipe (~93.0% top-1 reported).

  python train.py --config configs/cifar10_resnet56.py --workdir workdirs/cifar10_resnet56
  """
  return cifar10_resnet20.get_config('cifar_resnet56')
