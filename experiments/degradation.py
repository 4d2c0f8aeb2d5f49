"""The degradation experiment of He et al. 2015 (section 4.2, Figure 6): plain vs. residual.

Trains cifar_plain20, cifar_plain56, cifar_resnet20 and cifar_resnet56 with one recipe and
draws their training and test error against iterations in one PNG (plain nets left,
ResNets right; thin dashed = training error, bold = test error), plus a CSV of the numbers.

    python experiments/degradation.py            # the paper's CIFAR-10 recipe (GPU; hours)
    python experiments/degradation.py --quick    # sklearn digits, minutes on 2 CPU cores

Training error is the running error of the training steps (train mode, augmented
batches), averaged over each logging window, as the paper's curves are; the final value
in the table averages the last 10% of the steps. Test error is a full pass over the test
split. Each model trains in WORKDIR/<model>; a finished run is read back, not retrained,
and an interrupted one resumes.
"""

import argparse
import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PLAIN = ('cifar_plain20', 'cifar_plain56')
RESIDUAL = ('cifar_resnet20', 'cifar_resnet56')
MODELS = PLAIN + RESIDUAL
LABELS = {'cifar_plain20': 'plain-20', 'cifar_plain56': 'plain-56',
          'cifar_resnet20': 'ResNet-20', 'cifar_resnet56': 'ResNet-56'}
# ResNet-56 may end this much (absolute training error) above ResNet-20 and still count
# as "not degraded": the quick run's final errors are noisy at this level.
MARGIN = 0.01
FINAL_FRACTION = 0.1  # the final training error averages this last fraction of the steps


def paper_config(model: str):
  """The paper's CIFAR-10 recipe: 64k steps of 128, lr 0.1 / 10 at 32k and 48k."""
  from resnet_jax.configs import cifar10_resnet20  # pylint: disable=g-import-not-at-top
  return cifar10_resnet20.get_config(model)


def quick_config(model: str):
  """The paper's recipe shrunk to the 8x8 sklearn digits: 300 steps, lr 0.05 / 10 at 225.

  At the paper's lr 0.1 ResNet-56 blows up in its first steps on these images (loss ~5,
  still 60% training error after 400 steps), the early instability the paper met with
  ResNet-110 and cured with a warmup; a 30-step linear warmup to 0.05 trains it, and all
  four nets get the same recipe.
  """
  from resnet_jax.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model = model
  config.update(dict(
      image_size=8, batch_size=128, num_train_steps=300,
      learning_rate=0.05, schedule='step', lr_boundaries=(225,), lr_decay_factor=0.1,
      warmup_steps=30, momentum=0.9, nesterov=False, weight_decay=1e-4,
      log_every_steps=10, eval_every_steps=20, checkpoint_every_steps=0, keep_checkpoints=1))
  return config


def set_steps(config, steps: int):
  """`steps` training steps; lr boundaries, warmup and log/eval periods scale along."""
  scale = steps / config.num_train_steps
  config.lr_boundaries = tuple(int(b * scale) for b in config.lr_boundaries)
  for key in ('warmup_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[key] > 0:
      config[key] = max(1, int(config[key] * scale))
  config.num_train_steps = steps
  return config


def is_complete(workdir: str, config) -> bool:
  """Whether `workdir` holds a finished run of `config` (raises if it holds another)."""
  from resnet_jax.train import run_dir  # pylint: disable=g-import-not-at-top
  saved = run_dir.read_run_config(workdir)
  if saved is None:
    return False
  now = json.loads(config.to_json_best_effort())
  # Keys added to the configs since the run was made do not make it another run.
  differing = [f'{k}={saved[k]!r} there, {now[k]!r} now' for k in sorted(saved.keys() & now.keys())
               if saved[k] != now[k]]
  if differing:
    raise ValueError(f'{workdir} holds a run of another config ({"; ".join(differing)}); '
                     f'pass another --workdir or delete it.')
  from resnet_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  if not os.path.exists(run_dir.metrics_path(workdir)):
    return False
  steps = read_metrics(workdir).get('eval/top1', ((),))[0]
  return bool(steps) and steps[-1] >= config.num_train_steps


def train_models(configs: dict, root: str) -> dict:
  """Trains (or reuses) each {model: config} in root/<model>; {model: workdir}."""
  from resnet_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdirs = {}
  for model, config in configs.items():
    workdirs[model] = workdir = os.path.join(root, model)
    if is_complete(workdir, config):
      print(f'{model}: reusing the finished run in {workdir}', flush=True)
    else:
      train_and_evaluate(config, workdir)
  return workdirs


def error_curves(workdir: str) -> dict:
  """{'train': (steps, errors), 'test': (steps, errors)} from a run's metrics.jsonl."""
  from resnet_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  metrics = read_metrics(workdir)
  curves = {}
  for name, key in (('train', 'train/accuracy'), ('test', 'eval/top1')):
    steps, accuracies = metrics[key]
    curves[name] = (list(steps), [1.0 - a for a in accuracies])
  return curves


def final_errors(curves: dict) -> dict:
  """Training error averaged over the last FINAL_FRACTION of the steps; last test error."""
  steps, errors = curves['train']
  start = steps[-1] * (1 - FINAL_FRACTION)
  last = [e for s, e in zip(steps, errors) if s > start]
  return {'train_error': sum(last) / len(last), 'test_error': curves['test'][1][-1]}


def degradation(finals: dict) -> dict:
  """The paper's two observations, from {model: final_errors}."""
  train = {model: finals[model]['train_error'] for model in MODELS}
  return {
      'plain_degrades': train['cifar_plain56'] > train['cifar_plain20'],
      'resnet_does_not': train['cifar_resnet56'] <= train['cifar_resnet20'] + MARGIN,
  }


def write_csv(all_curves: dict, path: str):
  """One row per (step, model): step, model, train_error, test_error (blank if not logged)."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['step', 'model', 'train_error', 'test_error'])
    for model, curves in all_curves.items():
      train, test = (dict(zip(*curves[name])) for name in ('train', 'test'))
      for step in sorted(set(train) | set(test)):
        writer.writerow([step, model] + [f'{c[step]:.4f}' if step in c else ''
                                         for c in (train, test)])


def plot(all_curves: dict, path: str, title: str):
  """Figure 6: plain nets left, ResNets right, one color per depth."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for ax, models, kind in ((axes[0], PLAIN, 'plain nets'), (axes[1], RESIDUAL, 'ResNets')):
    for color, model in zip(('C1', 'C3'), models):
      curves = all_curves[model]
      ax.plot(*_percent(curves['train']), '--', color=color, linewidth=0.9)
      ax.plot(*_percent(curves['test']), '-', color=color, linewidth=2.2, label=LABELS[model])
    ax.set_xlabel('iter.')
    ax.set_title(f'{kind} (dashed: training, bold: test)', fontsize='medium')
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel('error (%)')
  fig.suptitle(title, fontsize='medium')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _percent(curve):
  steps, errors = curve
  return steps, [100 * e for e in errors]


def report(finals: dict, verdict: dict) -> str:
  lines = ['| model | final train error (%) | final test error (%) |', '|---|---:|---:|']
  lines += [f'| {m} | {100 * f["train_error"]:.2f} | {100 * f["test_error"]:.2f} |'
            for m, f in finals.items()]
  seen = verdict['plain_degrades'] and verdict['resnet_does_not']
  lines += ['', f'plain-56 trains worse than plain-20: {verdict["plain_degrades"]}',
            f'ResNet-56 trains no worse than ResNet-20 (+{100 * MARGIN:g} points): '
            f'{verdict["resnet_does_not"]}',
            f'degradation observed: {"yes" if seen else "no"}']
  return '\n'.join(lines)


def run_experiment(configs: dict, root: str, out: str, title: str = '') -> dict:
  """Trains/reuses the runs, writes the PNG `out` and the CSV beside it; the verdict."""
  workdirs = train_models(configs, root)
  all_curves = {model: error_curves(workdirs[model]) for model in configs}
  finals = {model: final_errors(curves) for model, curves in all_curves.items()}
  csv_path = os.path.splitext(out)[0] + '.csv'
  write_csv(all_curves, csv_path)
  plot(all_curves, out, title)
  verdict = degradation(finals)
  print(report(finals, verdict))
  print(f'Wrote {out} and {csv_path}')
  return {'finals': finals, **verdict}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='the reduced recipe on the offline digits (minutes on a CPU)')
  parser.add_argument('--workdir', help='root holding one run per model (default: '
                      'workdirs/degradation or workdirs/degradation_quick)')
  parser.add_argument('--out', help='PNG to write; the CSV goes beside it (default: '
                      'experiments/degradation.png or experiments/degradation_quick.png)')
  parser.add_argument('--steps', type=int, help='training steps (lr boundaries, warmup and '
                      'log/eval periods scale along)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--jax_cache_dir', default=os.path.expanduser('~/.cache/resnet_jax/jax'),
                      help='persistent compilation cache ("" disables)')
  args = parser.parse_args(argv)
  if args.steps is not None and args.steps <= 0:
    parser.error(f'--steps must be positive, got {args.steps}.')
  name = 'degradation_quick' if args.quick else 'degradation'
  if args.jax_cache_dir:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', args.jax_cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  configs = {}
  for model in MODELS:
    config = (quick_config if args.quick else paper_config)(model)
    config.seed = args.seed
    configs[model] = set_steps(config, args.steps) if args.steps else config
  recipe = configs[MODELS[0]]
  warmup = f' after {recipe.warmup_steps} warmup steps' if recipe.warmup_steps else ''
  title = (f'{recipe.dataset} {recipe.image_size}x{recipe.image_size}, '
           f'{recipe.num_train_steps} steps of {recipe.batch_size}, lr {recipe.learning_rate}'
           f'{warmup}, x{recipe.lr_decay_factor:g} at {list(recipe.lr_boundaries)}, '
           f'seed {args.seed}')
  run_experiment(configs, args.workdir or os.path.join(REPO, 'workdirs', name),
                 args.out or os.path.join(HERE, f'{name}.png'), title)


if __name__ == '__main__':
  main()
