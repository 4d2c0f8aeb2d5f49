"""data/augment.py against torchvision's and timm's own transforms, on real photographs."""

import numpy as np
import pytest
import torch  # before TensorFlow: importing triton after TensorFlow segfaults
import timm.data.auto_augment as timm_aa
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import tensorflow as tf
from resnet_jax.data import augment, augment_policy, normalization
from resnet_jax.errors import UserError

MEAN, STD = normalization.STATISTICS['imagenet']
TIMM_FILL = tuple(round(255 * m) for m in MEAN)


@pytest.fixture(scope='module')
def photos():
  """Two small crops (56x72) of scikit-learn's sample photographs, at a quarter scale."""
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  return [image[::4, ::4][10:66, 20:92] for image in load_sample_images().images]


def _ours(op, image, *args):
  return op(tf.constant(image), *args).numpy()


def _mean_levels(ours, theirs):
  assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
  return np.abs(ours.astype(float) - theirs.astype(float)).mean()


def _torchvision_ta_wide(image, name, bin_index, negate):
  """torchvision's TrivialAugmentWide op as its V2 recipe runs it: on a PIL image, with
  bilinear interpolation."""
  transform = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
  magnitudes, signed = transform._AUGMENTATION_SPACE[name]  # pylint: disable=protected-access
  magnitudes = magnitudes(augment.NUM_BINS, *image.shape[:2])
  magnitude = 0.0 if magnitudes is None else float(magnitudes[bin_index])
  if signed and negate:
    magnitude = -magnitude
  result = transform._apply_image_or_video_transform(  # pylint: disable=protected-access
      Image.fromarray(image), name, magnitude, interpolation=transform.interpolation,
      fill=transform._fill)  # pylint: disable=protected-access
  return np.asarray(result)


@pytest.mark.parametrize('op_index, name', list(enumerate(augment.TA_WIDE_OPS)))
def test_trivial_augment_wide_ops_match_torchvision(photos, op_index, name):
  changed = False
  for image in photos:
    for bin_index, negate in ((30, False), (13, True), (16, False)):
      ours = _ours(augment.ta_wide_op, image, op_index, bin_index, negate)
      theirs = _torchvision_ta_wide(image, name, bin_index, negate)
      assert _mean_levels(ours, theirs) < 0.75, (name, bin_index, negate)
      changed |= not np.array_equal(theirs, image)
  assert changed == (name != 'Identity')  # the comparison saw the op at work


def test_ta_wide_magnitude_bins_are_torchvisions():
  space = v2.TrivialAugmentWide._AUGMENTATION_SPACE  # pylint: disable=protected-access
  bins = {name: space[name][0](augment.NUM_BINS, 56, 72).tolist()
          for name in ('ShearX', 'TranslateX', 'Rotate', 'Solarize', 'Posterize')}
  # pylint: disable=protected-access
  assert bins['ShearX'] == augment._TA_SHEAR_OR_ENHANCE
  assert bins['Rotate'] == augment._TA_ROTATE
  assert bins['Solarize'] == augment._TA_SOLARIZE
  assert bins['TranslateX'] == augment._TA_TRANSLATE  # int() of bin 15 (15.999999) is 15
  assert bins['Posterize'] == augment._TA_POSTERIZE


def _timm_op(image, name, magnitude, negate, monkeypatch):
  monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v: -v if negate else v)
  level_fn = timm_aa.LEVEL_TO_ARG[name]
  args = level_fn(magnitude, {}) if level_fn else ()
  result = timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=TIMM_FILL,
                                    resample=Image.BILINEAR)
  return np.asarray(result)


@pytest.mark.parametrize('name', timm_aa._RAND_TRANSFORMS + [  # pylint: disable=protected-access
    n for n in timm_aa._RAND_INCREASING_TRANSFORMS if n.endswith('Increasing')])
def test_rand_augment_ops_match_timm(photos, name, monkeypatch):
  increasing = name.endswith('Increasing')
  op_index = augment.RAND_OPS.index(name.replace('Increasing', ''))
  changed = False
  for image in photos:  # (at 10, PosterizeIncreasing keeps 0 bits, which PIL refuses)
    for magnitude, negate in ((9.0, False), (6.5, True), (3.0, True)):
      ours = _ours(augment.rand_augment_op, image, op_index, magnitude, negate, increasing,
                   TIMM_FILL)
      theirs = _timm_op(image, name, magnitude, negate, monkeypatch)
      assert _mean_levels(ours, theirs) < 0.75, (name, magnitude, negate)
      changed |= not np.array_equal(theirs, image)
  assert changed


def _normalized(pixels):
  return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 -
          torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_random_erasing_matches_torchvision_on_the_same_box(photos):
  image = photos[0]
  for seed in range(4):
    box = [int(v) for v in augment.erase_box(tf.constant([seed, 7], tf.int64), *image.shape[:2])]
    assert box[2] > 0 and box[3] > 0
    ours = augment.erase(tf.constant(image), *box, [255 * m for m in MEAN]).numpy()
    theirs = F.erase(_normalized(image), *box, v=torch.tensor(0.0))
    # value 0 after normalization; ours writes the mean pixel rounded to uint8.
    np.testing.assert_allclose(_normalized(ours), theirs, atol=0.5 / 255 / min(STD) + 1e-6)
    assert (theirs == 0).sum() >= box[2] * box[3] * 3


@pytest.mark.slow  # thousands of draws: 15-20 s on a loaded 2-core machine
def test_erase_boxes_are_distributed_as_torchvision_draws_them():
  height, width, draws = 40, 24, 400  # narrow: a tenth of the tries fail to fit
  eraser = v2.RandomErasing(p=1.0)
  torch.manual_seed(0)
  image = torch.zeros(3, height, width)
  theirs = np.array([eraser.make_params([image])['h'] * 0 + np.array(
      [eraser.make_params([image])[k] for k in ('h', 'w')]) for _ in range(draws)])
  ours = np.array([[int(v) for v in augment.erase_box(tf.constant([s, 1], tf.int64), height,
                                                     width)[2:]] for s in range(draws)])
  for boxes in (ours, theirs):
    boxes[(boxes[:, 0] == height) & (boxes[:, 1] == width)] = 0  # torchvision: no box
  area_ours, area_theirs = (np.prod(b, 1).mean() / (height * width) for b in (ours, theirs))
  assert abs(area_ours - area_theirs) < 0.025, (area_ours, area_theirs)
  assert abs(np.log(ours[ours[:, 0] > 0, 0] / ours[ours[:, 0] > 0, 1]).mean() -
             np.log(theirs[theirs[:, 0] > 0, 0] / theirs[theirs[:, 0] > 0, 1]).mean()) < 0.15


@pytest.mark.parametrize('auto_augment', ['ta_wide', 'rand-m9-mstd0.5-inc1'])
def test_augmentation_is_a_function_of_the_seed(photos, auto_augment):
  augment_fn = tf.function(augment.train_augmentation(auto_augment, 0.5, MEAN, 3))
  image = tf.constant(photos[1])
  seeds = [tf.constant([s, 3], tf.int64) for s in range(8)]
  first = [augment_fn(image, seed).numpy() for seed in seeds]
  again = [augment_fn(image, seed).numpy() for seed in seeds]
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert len({a.tobytes() for a in first}) >= 5  # different seeds, different pixels


def test_rand_augment_strings_parse_as_timm_reads_them():
  policy = augment_policy.parse('rand-m9-mstd0.5-inc1')
  assert policy == augment_policy.RandAugment(magnitude=9, magnitude_std=0.5, increasing=True)
  assert augment_policy.parse('rand-m7-n3-mstd101').magnitude_std == float('inf')
  assert augment_policy.parse('') is None
  assert augment_policy.parse('ta_wide') == 'ta_wide'
  for bad in ('rand-m9-q3', 'randaug', 'rand-mx', 'autoaug'):
    with pytest.raises(UserError, match='auto_augment'):
      augment_policy.parse(bad)


def test_timm_magnitude_noise_is_clipped():
  policy = augment_policy.RandAugment(magnitude=9, magnitude_std=3.0)
  values = [float(augment._noisy_magnitude(  # pylint: disable=protected-access
      policy, tf.constant([s, 0], tf.int64))) for s in range(200)]
  assert max(values) == 10.0 and min(values) < 8.0


@pytest.mark.slow  # builds and resumes a tf.data pipeline: 20 s loaded
def test_pipeline_augments_and_resumes_exactly():
  """The stream with TA-wide and random erasing on: a resumed stream sees the same pixels."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from helpers import tiny_digits_config  # pylint: disable=import-outside-toplevel
  from resnet_jax.data import create_pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_digits_config(dataset='imagenet2012', preprocess='imagenet', image_size=16,
                              batch_size=4, shuffle_buffer=8)
  streams = {}
  with tfds.testing.mock_data(num_examples=12):
    for auto_augment, erase in (('', 0.0), ('ta_wide', 0.5)):
      config.update(dict(auto_augment=auto_augment, random_erase=erase))
      pipeline = create_pipeline(config)
      stream = pipeline.train_batches(0)
      streams[auto_augment] = [next(stream) for _ in range(5)]
    resumed = next(pipeline.train_batches(4))
  augmented, plain = streams['ta_wide'], streams['']
  np.testing.assert_array_equal(resumed['image'], augmented[4]['image'])
  for ours, theirs in zip(augmented, plain):
    np.testing.assert_array_equal(ours['label'], theirs['label'])
  changed = [not np.array_equal(a, p) for ours, theirs in zip(augmented, plain)
             for a, p in zip(ours['image'], theirs['image'])]
  assert 5 <= sum(changed) < len(changed)  # TA-wide's Identity, or a no-op, leaves some


def test_config_refuses_unknown_policies_and_dali():
  from helpers import tiny_digits_config  # pylint: disable=import-outside-toplevel
  from resnet_jax.train.config_schema import check_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="'rand-m9-x1'.*'ta_wide'"):
    check_config(tiny_digits_config(auto_augment='rand-m9-x1'), num_devices=1)
  with pytest.raises(UserError, match=r'random_erase=1.5 must be in \[0, 1\]'):
    check_config(tiny_digits_config(random_erase=1.5), num_devices=1)
  with pytest.raises(UserError, match="input_pipeline='tf.data'"):
    check_config(tiny_digits_config(input_pipeline='dali', auto_augment='ta_wide'),
                 num_devices=1)
  check_config(tiny_digits_config(auto_augment='rand-m7-mstd0.5-inc1', random_erase=0.25),
               num_devices=1)
