"""Magnitude pruning of the default configs: the metric of each pruned run against its dense twin on the
same eval split, the size of its weights stored sparse, and the metric against sparsity from 0 to 98%.

  python benchmarks/pruning.py [--root=/tmp/model_zoo_pruning] [--runs=lenet,cnn,gpt,transformer,curve]

What train.py and eval.py do, in this process: each run trains in <root>/<run> (reused once it has an
eval.json), is evaluated, and exported (for the bytes stored sparse). Gradual pruning follows Zhu & Gupta
(2017) from 10% to 70% of training, masks recomputed 60 times; one-shot prunes once at 70% and trains on.
  lenet   Han et al. (2015)'s LeNet-300-100 (an MLP with hidden sizes (300, 100)) on digits, global
          magnitude to 92%, gradual and one-shot, 3 seeds each, against the dense net's 3 seeds
  cnn     the CNN default at 90%, gradual and one-shot
  gpt     the GPT default (pydoc) at 50% and 80%, nats/byte
  transformer  the translation default at 50%, exact match
  curve   LeNet-300-100, gradual, at 0, 50, 70, 80, 90, 92, 95 and 98% (seed 0): the PNG
Writes benchmarks/results/pruning.{json,md,png}. Not a test.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position
from model_zoo.evaluation import evaluate  # pylint: disable=wrong-import-position
from model_zoo.training import loop  # pylint: disable=wrong-import-position

LENET = {'model.hidden_sizes': (300, 100)}
# run group: [(run name, config file, overrides, metric, sparsity, schedule)]
SEEDS = (0, 1, 2)
CURVE = (0.0, 0.5, 0.7, 0.8, 0.9, 0.92, 0.95, 0.98)


def runs(group: str):
  if group == 'lenet':
    return [(f'lenet_{kind}_s{seed}', 'mlp.py', {**LENET, 'seed': seed}, 'accuracy', s, kind)
            for seed in SEEDS for kind, s in (('dense', 0.0), ('gradual92', 0.92), ('oneshot92', 0.92))]
  if group == 'cnn':
    return [(f'cnn_{kind}', 'cnn.py', {}, 'accuracy', s, kind) for kind, s in
            (('dense', 0.0), ('gradual90', 0.9), ('oneshot90', 0.9))]
  if group == 'gpt':
    return [(f'gpt_{kind}', 'gpt.py', {}, 'nats_per_byte', s, kind) for kind, s in
            (('dense', 0.0), ('gradual50', 0.5), ('gradual80', 0.8))]
  if group == 'transformer':
    return [(f'transformer_{kind}', 'transformer.py', {}, 'exact_match', s, kind) for kind, s in
            (('dense', 0.0), ('gradual50', 0.5))]
  if group == 'curve':
    return [('lenet_dense_s0' if s == 0 else f'lenet_gradual{round(100 * s)}_s0', 'mlp.py', {**LENET, 'seed': 0},
             'accuracy', s, 'dense' if s == 0 else 'gradual') for s in CURVE]
  raise SystemExit(f'unknown run group {group!r}')


def config_of(file: str, overrides: dict, sparsity: float, kind: str):
  config = common.load(file, overrides)
  n = config.num_train_steps
  if kind != 'dense':
    end = (7 * n) // 10
    schedule = ({'pruning.begin_step': end} if kind.startswith('oneshot') else
                {'pruning.begin_step': n // 10, 'pruning.frequency': max(1, (end - n // 10) // 60)})
    config.update_from_flattened_dict({'pruning.method': 'global_magnitude', 'pruning.sparsity': sparsity,
                                       'pruning.end_step': end, **schedule})
  return config


def measure(name, file, overrides, metric, sparsity, kind, root) -> dict:
  config = config_of(file, overrides, sparsity, kind)
  workdir = os.path.join(root, name)
  seconds = None
  if not os.path.exists(os.path.join(workdir, 'eval.json')):
    start = time.perf_counter()
    loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
  m = evaluate.evaluate(config, workdir)
  row = {'config': file, 'overrides': {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
         'pruning': config.pruning.to_dict() if kind != 'dense' else None, 'metric': metric, 'value': m[metric],
         'sparsity': m.get('sparsity', 0.0), 'train_seconds': seconds}
  if kind != 'dense':
    out = os.path.join(workdir, 'export')
    if not os.path.exists(os.path.join(out, 'sparsity.json')):
      evaluate.export(config, workdir, out)
    with open(os.path.join(out, 'sparsity.json')) as f:
      info = json.load(f)
    row.update(dense_bytes=info['dense_bytes'], sparse_bytes=info['sparse_bytes'],
               sparsity_by_layer=info['sparsity_by_layer'])
  return row


def _mean(rows, names):
  values = [rows[n]['value'] for n in names if n in rows]
  return (float(np.mean(values)), float(np.std(values)), len(values)) if values else None


def table(rows: dict) -> str:
  lines = ['| run | metric | dense | pruned | sparsity | change | bytes stored sparse / dense |', '|---|---|---|---|---|---|---|']
  groups = [('LeNet-300-100, gradual 92%', 'lenet_dense_s{}', 'lenet_gradual92_s{}'),
            ('LeNet-300-100, one-shot 92%', 'lenet_dense_s{}', 'lenet_oneshot92_s{}')]
  for label, dense, pruned in groups:
    d, p = _mean(rows, [dense.format(s) for s in SEEDS]), _mean(rows, [pruned.format(s) for s in SEEDS])
    if d and p:
      sp = [rows[pruned.format(s)] for s in SEEDS if pruned.format(s) in rows]
      lines.append(f'| {label} ({p[2]} seeds, mean ± std) | accuracy | {d[0]:.4f} ± {d[1]:.4f} | '
                   f'{p[0]:.4f} ± {p[1]:.4f} | {np.mean([r["sparsity"] for r in sp]):.4f} | '
                   f'{100 * (p[0] - d[0]):+.2f} points | '
                   f'{np.mean([r["sparse_bytes"] / r["dense_bytes"] for r in sp]):.3f} |')
  for dense, pruned in [('cnn_dense', 'cnn_gradual90'), ('cnn_dense', 'cnn_oneshot90'), ('gpt_dense', 'gpt_gradual50'),
                        ('gpt_dense', 'gpt_gradual80'), ('transformer_dense', 'transformer_gradual50')]:
    if dense in rows and pruned in rows:
      d, p = rows[dense], rows[pruned]
      change = (f'{100 * (p["value"] - d["value"]):+.2f} points' if p['metric'] != 'nats_per_byte'
                else f'{100 * (p["value"] / d["value"] - 1):+.2f}%')
      lines.append(f'| {pruned} | {p["metric"]} | {d["value"]:.4f} | {p["value"]:.4f} | {p["sparsity"]:.4f} | '
                   f'{change} | {p["sparse_bytes"] / p["dense_bytes"]:.3f} |')
  curve = [(s, rows[n]['value']) for s, n in _curve_names() if n in rows]
  if curve:
    lines += ['', '| LeNet-300-100 sparsity | ' + ' | '.join(f'{s:.0%}' for s, _ in curve) + ' |',
              '|---|' + '---|' * len(curve), '| test accuracy | ' + ' | '.join(f'{v:.4f}' for _, v in curve) + ' |']
  return '\n'.join(lines)


def _curve_names():
  """[(sparsity, run name)] of the curve."""
  return [(r[4], r[0]) for r in runs('curve')]


def plot(rows: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  curve = [(s, rows[n]['value']) for s, n in _curve_names() if n in rows]
  if not curve:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([100 * s for s, _ in curve], [100 * v for _, v in curve], 'o-')
  ax.set_xlabel('sparsity (% of weights pruned)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('LeNet-300-100 on digits, gradual global magnitude pruning', fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='/tmp/model_zoo_pruning')
  parser.add_argument('--runs', default='lenet,curve,cnn,gpt,transformer')
  parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'pruning'))
  args = parser.parse_args()
  rows = {}
  if os.path.exists(args.output + '.json'):
    with open(args.output + '.json') as f:
      rows = json.load(f).get('rows', {})
  for group in args.runs.split(','):
    for name, *spec in runs(group):
      if name in rows:
        continue
      rows[name] = measure(name, *spec, args.root)
      common.write(args.output, rows, table(rows))
      plot(rows, args.output + '.png')


if __name__ == '__main__':
  main()
