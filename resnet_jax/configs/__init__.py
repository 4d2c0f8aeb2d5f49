"""Training configurations (ml_collections files), shipped with the package.

`python train.py --config configs/NAME.py` reads them from the source tree (`configs/` is a
link to this folder); an installed package finds them with `config_path(NAME)`.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def config_path(name: str = 'default') -> str:
  """The path of the packaged config file `NAME.py`, for `--config` or `define_config_flag`."""
  return os.path.join(HERE, f'{name}.py')
