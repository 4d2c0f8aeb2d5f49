"""`python -m resnet_jax.convert`."""

import sys

from resnet_jax.convert.cli import main

sys.exit(main())
