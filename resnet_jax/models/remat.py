"""What the backward pass keeps: the names the forward pass tags, and the policy that
keeps only those values and recomputes the rest.

Convolution outputs and BatchNorm statistics are tagged with `jax.ad_checkpoint.
checkpoint_name`. `ResNet(elementwise_remat=True)` runs the stem and each stage (each
block, when stages are scanned) under `jax.checkpoint` with `SAVE_CONV_OUTPUTS`: the
backward pass keeps only those values and the unit's input, and recomputes everything
elementwise in between (BatchNorm's normalization, ReLU, the residual additions, the max
pool's input) from them, which is cheap next to the convolutions. XLA would otherwise
keep a block's output next to the last convolution output it is computed from; figures
in benchmarks/RESULTS.md.
"""

import jax

CONV_OUTPUT = 'conv_output'
BN_STATISTICS = 'bn_statistics'

SAVE_CONV_OUTPUTS = jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT, BN_STATISTICS)
