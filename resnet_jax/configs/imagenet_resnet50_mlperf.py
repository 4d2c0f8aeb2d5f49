"""ResNet-50 on ImageNet as MLPerf Training submissions run it: LARS at large batch."""

from resnet_jax.configs import imagenet_resnet50

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(setting: str = 'tpu'):
  """MLPerf's ResNet-50 (target 75.9% top-1): LARS, polynomial decay (power 2), label
  smoothing 0.1, no weight decay or LARS on BatchNorm and biases.

  setting 'tpu' (the default): batch 32,768 as Google's TPU submission (MLPerf Training
  v0.7, TPU v4-8192: --train_batch_size=32768 --lars_base_learning_rate=27.50
  --lars_warmup_epochs=16 --momentum=0.9321 --weight_decay=.0001 --label_smoothing=0.1
  --lars_epsilon=0.0 --train_steps=2355, i.e. ~60 epochs; the schedule of its
  lars_util.poly_rate_schedule: linear warmup from 0, then power 2 down to 1e-4).
  setting 'gpu': batch 3,264 (8 GPUs x 408) as NVIDIA's DGX A100 submissions
  (mlcommons/training_results_v2.0, NVIDIA/benchmarks/resnet/implementations/mxnet/
  config_DGXA100.sh: LR=10.5 WARMUP_EPOCHS=2 NUMEPOCHS=37 WD=5e-5 MOM=0.9 LARSETA=0.001
  LABELSMOOTHING=0.1 LRSCHED=pow2), about 35 epochs to 75.9%.

  ImageNet needs a manual download (`tfds build imagenet2012`); then
  python train.py --config configs/imagenet_resnet50_mlperf.py --workdir workdirs/mlperf \\
      --config.data_dir=/path/to/tensorflow_datasets
  python train.py --config configs/imagenet_resnet50_mlperf.py:gpu --workdir workdirs/mlperf_gpu \\
      --config.data_dir=/path/to/tensorflow_datasets
  On a 256-chip v5e pod slice (`python -m resnet_jax.plan --config
  configs/imagenet_resnet50_mlperf.py --topology v5e:16x16` plans it without one).
  """
  # ImageNet, bfloat16, the last BN of each block zero-initialized (the TPU reference's
  # init_zero), BN statistics over the global batch; eval resize 256, crop 224.
  config = imagenet_resnet50.get_config()
  config.optimizer = 'lars'  # trust ratio eta * |w| / (|g| + wd |w|); none on BN, biases
  config.lars_eta = 0.001
  config.lars_eps = 0.0
  config.nesterov = False  # the reference's plain momentum
  config.schedule = 'polynomial'
  config.polynomial_power = 2.0
  config.end_learning_rate = 1e-4
  config.learning_rate_batch_base = 0  # the rates below are the submissions' own
  config.label_smoothing = 0.1
  config.weight_decay_exclude_bn_and_bias = True
  if setting == 'tpu':
    config.batch_size = 32_768
    config.eval_batch_size = 16_384
    config.learning_rate = 27.5
    config.momentum = 0.9321
    config.weight_decay = 1e-4
    config.warmup_steps = 16 * IMAGENET_TRAIN_IMAGES // config.batch_size  # 16 epochs
    config.num_train_steps = 2355
  elif setting == 'gpu':
    config.batch_size = 3264
    config.eval_batch_size = 3264
    config.learning_rate = 10.5
    config.momentum = 0.9
    config.weight_decay = 5e-5
    config.warmup_steps = 2 * IMAGENET_TRAIN_IMAGES // config.batch_size  # 2 epochs
    config.num_train_steps = 37 * IMAGENET_TRAIN_IMAGES // config.batch_size  # 37 epochs
  else:
    raise ValueError(f'Unknown setting {setting!r} of {__name__}: use tpu or gpu.')
  config.num_epochs = -1
  config.warmup_epochs = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 4 * IMAGENET_TRAIN_IMAGES // config.batch_size  # every 4 epochs
  config.checkpoint_every_steps = config.eval_every_steps
  config.keep_checkpoints = 2
  return config
