"""Training: state, pure train/eval steps, optimizer, checkpoints and the loop.

`from resnet_jax.train.step import train_step` gives the pure step for benchmarks.
"""
