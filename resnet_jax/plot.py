"""Plot training and eval curves of one or more runs into one PNG.

    python -m resnet_jax.plot WORKDIR [WORKDIR ...] [--out curves.png]

The image is written beside `--out` and renamed over it once complete, so an existing file
there is replaced whole or not at all. Its format is its extension's (.png; also .pdf,
.svg and the others matplotlib writes).
"""

import argparse
import os
from pathlib import Path
from typing import Sequence

from resnet_jax.errors import UserError
from resnet_jax.outputs import replace_file
from resnet_jax.train import run_dir

PANELS = (('train/loss', 'eval/loss', 'loss'), ('train/accuracy', 'eval/top1', 'top-1 accuracy'))


def plot_runs(workdirs: Sequence[str], out: str) -> str:
  """Loss and accuracy against step, train dashed and eval solid, one color per run, into
  the image file `out` (UserError for a directory or an extension that is no image
  format)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.backend_bases import FigureCanvasBase  # pylint: disable=g-import-not-at-top
  from resnet_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  image_format = _image_format(out, FigureCanvasBase.get_supported_filetypes())
  fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4))
  for i, workdir in enumerate(workdirs):
    metrics = read_metrics(workdir)
    name = os.path.basename(os.path.normpath(workdir))
    color = f'C{i}'
    for ax, (train_key, eval_key, title) in zip(axes, PANELS):
      if train_key in metrics:
        ax.plot(*metrics[train_key], '--', color=color, alpha=0.7, label=f'{name} train')
      if eval_key in metrics:
        ax.plot(*metrics[eval_key], 'o-', color=color, label=f'{name} eval')
      ax.set_title(title)
      ax.set_xlabel('step')
  axes[0].set_yscale('log')
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  replace_file(Path(out), lambda f: fig.savefig(f, format=image_format, dpi=100))
  plt.close(fig)
  return out


def _image_format(out: str, formats: Sequence[str]) -> str:
  """The image format that `out`'s extension names (matplotlib would add '.png' to a name
  without one, and write beside the path given)."""
  if os.path.isdir(out):
    raise UserError(f'--out {out} is a directory; pass a file, such as '
                    f'{os.path.join(out, run_dir.CURVES_FILE)}.')
  extension = os.path.splitext(out)[1][1:].lower()
  if extension not in formats:
    raise UserError(f'--out {out}: name an image file, ending in .png (or one of '
                    f'{", ".join("." + name for name in sorted(formats))}).')
  return extension


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+',
                      help=f'training run directories (with {run_dir.METRICS_FILE})')
  parser.add_argument('--out', help=f'PNG to write (default: WORKDIR/{run_dir.CURVES_FILE} for '
                                    f'one run, {run_dir.CURVES_FILE} for several)')
  args = parser.parse_args(argv)
  for workdir in args.workdirs:
    if not os.path.exists(run_dir.metrics_path(workdir)):
      parser.error(f'{workdir} has no {run_dir.METRICS_FILE}; pass a train.py --workdir.')
  out = args.out or (run_dir.curves_path(args.workdirs[0]) if len(args.workdirs) == 1
                     else run_dir.CURVES_FILE)
  try:
    print(f'Wrote {plot_runs(args.workdirs, out)}')
  except UserError as e:
    parser.error(str(e))
  except OSError as e:
    parser.error(f'cannot write {out}: {e.strerror or e}; pass a writable --out.')


if __name__ == '__main__':
  main()
