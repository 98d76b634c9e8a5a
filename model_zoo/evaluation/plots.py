"""PNG plots for a person to look at: training curves and confusion matrices."""
import collections

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def training_curves(records: list[dict], path: str):
  """One panel per metric that appears in metrics.jsonl; train and eval curves in each."""
  series = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in records:
    for k, v in r.items():
      if k not in ('step', 'split') and isinstance(v, (int, float)):
        series[k][r['split']].append((r['step'], v))
  names = sorted(series)
  if not names:
    return
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for split, points in sorted(series[name].items()):
      steps, values = zip(*points)
      ax.plot(steps, values, marker='o' if split == 'eval' else None, ms=3, label=split)
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
    if name == 'loss':
      ax.set_yscale('log')
  for ax in list(axes.flat)[len(names):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def confusion_matrix(confusion, class_names, path: str):
  c = np.asarray(confusion).astype(int)
  n = len(c)
  fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
  ax.imshow(c, cmap='Blues')
  for i in range(n):
    for j in range(n):
      ax.text(j, i, c[i, j], ha='center', va='center', fontsize=8,
              color='white' if c[i, j] > c.max() / 2 else 'black')
  ax.set_xticks(range(n), class_names, rotation=45 if n > 10 else 0)
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'confusion matrix ({c.sum()} examples, accuracy {np.trace(c) / c.sum():.4f})')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
