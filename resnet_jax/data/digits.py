"""scikit-learn's handwritten digits as a TFDS dataset, so it flows through the same
pipeline as every other dataset and needs no network.

1,797 real 8x8 grayscale images of the digits 0-9 (the UCI optical recognition test set),
split once by a fixed permutation into 1,437 train and 360 test images.
"""

import numpy as np
import tensorflow_datasets as tfds

TEST_SIZE = 360
SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn.datasets.load_digits as a TFDS builder, registered as 'digits'."""

  VERSION = tfds.core.Version('1.0.0')
  NEEDS_NO_DOWNLOAD = True  # sources.py prepares it without TFDS's download messages
  RELEASE_NOTES = {'1.0.0': 'sklearn digits, 1437 train / 360 test images.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Handwritten digits 0-9, 8x8 grayscale, from scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    # Pixel values are 0..16; store them as ordinary 0..255 images.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return {
        'train': self._generate_examples(images[train], digits.target[train], train),
        'test': self._generate_examples(images[test], digits.target[test], test),
    }

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {'image': image, 'label': int(label)}
