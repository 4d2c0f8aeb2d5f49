"""Shared test settings: compile fast, run on the CPU."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # keep TensorFlow and torch off GPUs

import jax  # noqa: E402

# Compile time dominates these small tests; XLA's heavy passes do not pay off here.
jax.config.update('jax_disable_most_optimizations', True)
