"""The offline default: a CIFAR ResNet-20 on scikit-learn's handwritten digits."""

import ml_collections

from resnet_jax.train.config_schema import model_overrides


def get_config():
  """Trains cifar_resnet20 on the 1,797 8x8 sklearn digits; ~97-99% test top-1 on 2 CPU cores.

  python train.py --config configs/default.py --workdir /tmp/resnet_jax/digits
  (`python train.py` with no flags runs this config in ./workdirs/default.)
  """
  config = ml_collections.ConfigDict()
  # Model: a zoo name, plus create_model overrides, each None (the zoo's value) unless
  # set: --config.model_overrides.remat=True, model_overrides(stage_sizes=(1, 1, 1)).
  config.model = 'cifar_resnet20'
  config.model_overrides = model_overrides()
  config.num_classes = 10  # classes of the dataset (used by synthetic data; TFDS knows its own)
  config.in_channels = 3  # image channels (used by synthetic data; datasets know their own)
  config.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'; params/BN stats stay f32
  config.bn_group_size = 0  # 0: BN statistics over the global batch; N: over groups of N
  # Stochastic depth: the last block drops its residual branch with this probability, the
  # others with less, linearly in the block index (timm's drop_path_rate); 0: off.
  config.drop_path_rate = 0.0
  # Data.
  config.dataset = 'digits'  # a TFDS name, 'folder:/path' or 'synthetic'
  config.data_dir = ''  # TFDS data_dir ('' = ~/tensorflow_datasets)
  config.train_split = 'train'
  config.eval_split = 'test'
  config.preprocess = 'digits'  # augmentation: 'digits', 'cifar', 'imagenet' or 'none'
  config.image_size = 8
  # After the crop and flip: '' (off), 'ta_wide' (torchvision's TrivialAugmentWide) or a
  # timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1' (resnet_jax.data.augment).
  config.auto_augment = ''
  config.random_erase = 0.0  # torchvision's RandomErasing probability (its defaults); 0: off
  # Sizes that differ from image_size (0: image_size; see resnet_jax.data.sizes): train
  # crops, the eval crop, and the shorter side the eval image is resized to before it
  # ('imagenet' recipe; 0: eval size / 0.875). torchvision's V2 recipe: 176, 224, 232.
  config.train_image_size = 0
  config.eval_image_size = 0
  config.eval_resize_size = 0
  # Repeated augmentation (torchvision's RASampler, timm's): each image N times per window
  # of N epochs, its copies differently augmented on other devices of the same step; 1: off.
  config.repeated_augmentation = 1
  config.shuffle_buffer = 2048  # examples; >= the split size shuffles fully
  # 'tf.data', or 'dali' (image folders with preprocess='imagenet'; pip install '.[dali]';
  # decodes on the GPU when JAX runs on NVIDIA GPUs, else on the CPU)
  config.input_pipeline = 'tf.data'
  config.synthetic_train_size = 1_281_167  # dataset='synthetic': images per epoch
  config.synthetic_eval_size = 1024  # dataset='synthetic': images per evaluation
  # Optimization.
  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 360
  config.num_train_steps = 500  # or -1 to use num_epochs
  config.num_epochs = -1
  config.learning_rate = 0.1
  config.learning_rate_batch_base = 0  # if > 0, lr is scaled by batch_size / this
  config.schedule = 'cosine'  # 'constant', 'cosine', 'step' or 'polynomial' (MLPerf's)
  config.end_learning_rate = 0.0  # where 'cosine' and 'polynomial' end
  config.polynomial_power = 2.0  # 'polynomial': (lr - end) * (1 - t / T)^power + end
  config.warmup_steps = 25  # linear warmup from 0 (or warmup_epochs, when this is 0)
  config.warmup_epochs = 0.0
  config.lr_boundaries = ()  # steps where 'step' multiplies the lr by lr_decay_factor
  config.lr_decay_factor = 0.1
  # 'sgd' (coupled L2 decay, torch.optim.SGD), 'lars' (MLPerf's), 'lamb' (timm's) or
  # 'adamw' (torch.optim.AdamW); see resnet_jax.train.optim.
  config.optimizer = 'sgd'
  config.momentum = 0.9  # 'sgd' and 'lars'
  config.nesterov = True  # 'sgd' and 'lars'
  config.lars_eta = 0.001  # 'lars': trust coefficient
  config.lars_eps = 0.0  # 'lars': added to the trust ratio's denominator
  config.adam_beta1 = 0.9  # 'lamb' and 'adamw'
  config.adam_beta2 = 0.999
  config.adam_eps = 1e-8  # timm's Lamb uses 1e-6
  config.grad_clip_norm = 0.0  # > 0: clip the gradients' global norm (timm's Lamb: 1.0)
  config.weight_decay = 5e-4  # coupled for 'sgd' and 'lars', decoupled for 'lamb', 'adamw'
  # No weight decay on BN scales/biases and biases (timm, MLPerf; 'lars' always skips them).
  config.weight_decay_exclude_bn_and_bias = False
  # No weight decay on BN scales/biases only (torchvision's norm_weight_decay=0).
  config.weight_decay_exclude_norm = False
  config.label_smoothing = 0.0
  # Batch mixing on the devices, as timm's Mixup: lam ~ Beta(alpha, alpha); with both > 0
  # each batch gets CutMix or Mixup with probability 0.5 each; 0: off.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  # 'softmax' (cross-entropy) or 'bce' (timm's binary cross-entropy on the smoothed,
  # mixed targets); bce_target_thresh > 0 makes targets above it 1, the rest 0.
  config.loss = 'softmax'
  config.bce_target_thresh = 0.0
  # Weight EMA (torchvision's ExponentialMovingAverage): its decay before torchvision's
  # adjustment by batch_size * ema_every_steps / epochs (resnet_jax.train.ema); 0: off.
  config.ema_decay = 0.0
  config.ema_every_steps = 32  # update the EMA every N steps of an epoch
  # Run.
  config.seed = 0
  config.log_every_steps = 50  # these three: 0 or less = only at the end of the run
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2  # the latest N, plus the best by best_metric
  config.best_metric = 'eval/top1'  # or 'eval_ema/top1' (the EMA's)
  config.init_from = ''  # a converted or trained checkpoint to start from
  config.skip_nonfinite_steps = False  # True: skip steps with a non-finite loss, not stop
  # Warn when no step finished for this many median step times (a stuck host); 0: off.
  config.stall_factor = 20.0
  config.stall_exit = False  # True: a stall exits (status 1) instead of only warning
  # (start, end): a jax.profiler trace of steps start..end-1 in WORKDIR/profile, written by
  # process 0, for TensorBoard's profile plugin; (): off.
  config.profile_steps = ()
  return config
