"""Input pipelines: TFDS datasets by name, image folders, and synthetic data.

TensorFlow is imported only here, on the host, and kept off the accelerators.
"""

import os


def create_pipeline(config):
  """A pipeline with `num_classes`, `channels`, `steps_per_epoch`, `split_size(split)`,
  `check_files(splits)`, `train_batches(step)` and `eval_batches(split, batch_size)` for
  `config.dataset`, made by `config.input_pipeline` ('tf.data' or 'dali')."""
  # TensorFlow's C++ info lines, unless the user chose; here, not at import, so importing
  # this package changes no environment.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if config.input_pipeline == 'dali':
    from resnet_jax.data.dali import DaliPipeline  # pylint: disable=g-import-not-at-top
    return DaliPipeline(config)
  if config.dataset == 'synthetic':
    from resnet_jax.data.synthetic import SyntheticPipeline  # pylint: disable=g-import-not-at-top
    return SyntheticPipeline(config)
  from resnet_jax.data.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  return Pipeline(config)
