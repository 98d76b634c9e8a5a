"""PNG plots for a person to look at: training curves, confusion matrices, image grids.

matplotlib is imported on the first plot, not with the module: training never plots, and the
import costs more than half a second per process.
"""
import collections
import functools

import numpy as np

from model_zoo import paths


@functools.cache
def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def training_curves(records: list[dict], path: str):
  """One panel per metric that appears in metrics.jsonl; train and eval curves in each."""
  plt = _pyplot()
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
  paths.save_figure(fig, path)
  plt.close(fig)


def confusion_matrix(confusion, class_names, path: str):
  plt = _pyplot()
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
  paths.save_figure(fig, path)
  plt.close(fig)


def image_grid(images_BxHxWxC, path: str, *, columns: int = 10, title: str = '', row_labels=None):
  """Images in [0, 1] (grey or RGB) tiled `columns` to a row, saved as one PNG."""
  plt = _pyplot()
  images = np.clip(np.asarray(images_BxHxWxC, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  scale = max(1.0, 48.0 / h) * 0.25
  fig, ax = plt.subplots(figsize=(max(3.0, scale * columns * (w + 1) / 8), max(1.5, scale * rows * (h + 1) / 8) + 0.5))
  ax.imshow(grid[..., 0] if c == 1 else grid, cmap='gray' if c == 1 else None, vmin=0, vmax=1,
            interpolation='nearest')
  ax.set_xticks([])
  if row_labels:
    ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(row_labels))], row_labels)
  else:
    ax.set_yticks([])
  if title:
    ax.set_title(title)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
