"""What model_zoo.interpret draws for a person to look at: PNG grids and heatmaps, and an HTML page for text.

Attributions are drawn on a diverging scale centred on 0 (red: raised the class's score, blue: lowered it),
the same scale for a whole row.
"""
import html

import numpy as np

from model_zoo import paths
from model_zoo.evaluation.plots import _pyplot  # pylint: disable=protected-access


def _gray(image_HxWxC):
  image = np.asarray(image_HxWxC, np.float32)
  return image[..., 0] if image.shape[-1] == 1 else image


def image_attributions(rows: list[dict], class_names, path: str, title: str):
  """One row per example: the input, the attribution heatmap, the two overlaid, and the top classes.
  Each row is {'image', 'attribution' [H, W], 'probabilities' [C], 'label', 'group' (e.g. 'correct')}."""
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), 4, figsize=(9.5, 2.1 * len(rows)), squeeze=False)
  for ax_row, r in zip(axes, rows):
    image, a = r['image'], np.asarray(r['attribution'])
    limit = max(float(np.abs(a).max()), 1e-12)
    cmap = 'gray' if image.shape[-1] == 1 else None
    ax_row[0].imshow(_gray(image), cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
    ax_row[0].set_ylabel(r['group'], fontsize=9)
    ax_row[1].imshow(a, cmap='bwr', vmin=-limit, vmax=limit, interpolation='nearest')
    ax_row[2].imshow(_gray(image), cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
    ax_row[2].imshow(a, cmap='bwr', vmin=-limit, vmax=limit, alpha=0.55, interpolation='nearest')
    p = np.asarray(r['probabilities'])
    top = np.argsort(-p)[:3]
    lines = [f'true: {class_names[r["label"]] if r["label"] >= 0 else "?"}'] + [
        f'{class_names[c]}: {p[c]:.3f}' for c in top]
    ax_row[3].text(0.02, 0.5, '\n'.join(lines), va='center', family='monospace', fontsize=9)
    ax_row[3].axis('off')
    for ax in ax_row[:3]:
      ax.set_xticks([])
      ax.set_yticks([])
  for ax, name in zip(axes[0], ('input', 'attribution', 'overlay', 'top classes')):
    ax.set_title(name, fontsize=10)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.98))
  paths.save_figure(fig, path)
  plt.close(fig)


def text_attributions(rows: list[dict], path: str, title: str):
  """An HTML page: one row per example, each token shaded by its attribution, with the predicted and
  true labels. Each row is {'tokens': [str], 'attribution': [float], 'predicted', 'label', 'probability'}."""
  out = [f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>',
         '<style>body{font-family:sans-serif;max-width:70em}td{padding:.4em;vertical-align:top;'
         'border-bottom:1px solid #ddd}span{padding:0 1px;border-radius:2px;line-height:1.7}</style>',
         f'<h3>{html.escape(title)}</h3><p>red: the token raised the target class\'s score; blue: it lowered it '
         '(each row on its own scale; hover for the value)</p><table>',
         '<tr><th>predicted</th><th>true</th><th>tokens</th></tr>']
  for r in rows:
    a = np.asarray(r['attribution'], np.float64)
    limit = max(float(np.abs(a).max()), 1e-12)
    spans = []
    for token, v in zip(r['tokens'], a):
      shade = int(255 * (1 - min(abs(v) / limit, 1.0)))
      colour = f'rgb(255,{shade},{shade})' if v >= 0 else f'rgb({shade},{shade},255)'
      spans.append(f'<span style="background:{colour}" title="{v:+.4f}">{html.escape(token)}</span>')
    mark = '' if r['label'] in ('?', r['predicted']) else ' style="color:#b00"'
    out.append(f'<tr><td{mark}>{html.escape(r["predicted"])} ({r["probability"]:.2f})</td>'
               f'<td>{html.escape(r["label"])}</td><td style="white-space:pre-wrap">{"".join(spans)}</td></tr>')
  out.append('</table>')
  with open(path, 'w') as f:
    f.write('\n'.join(out))


def deletion_curves(curves: dict[str, np.ndarray], areas: dict[str, float], path: str, title: str):
  """The mean deletion curve of each method (and of a random order), its area in the legend."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, curve in curves.items():
    ax.plot(np.linspace(0, 1, len(curve)), curve, label=f'{name} (AUC {areas[name]:.3f})',
            linestyle='--' if name == 'random' else '-')
  ax.set_xlabel('fraction of units deleted (set to the baseline)')
  ax.set_ylabel('probability of the target class')
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def matrices(panels: list[tuple[str, np.ndarray]], path: str, *, rows_labels=None, column_labels=None,
             columns: int = 4, title: str = ''):
  """Heatmaps [rows, columns] of probabilities (attention, alignment), with tokens on the axes if given."""
  plt = _pyplot()
  n = len(panels)
  cols = min(columns, n)
  grid_rows = -(-n // cols)
  t, s = panels[0][1].shape
  cell = 0.22 if column_labels is not None else 0.08    # room for a token label per row and column
  width, height = cell * s + 1.2, cell * t + 1.2
  fig, axes = plt.subplots(grid_rows, cols, figsize=(width * cols, height * grid_rows + 0.4), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis('off')
  for ax, (name, m) in zip(axes.flat, panels):
    ax.imshow(m, cmap='viridis', vmin=0, vmax=max(float(np.max(m)), 1e-12), interpolation='nearest')
    ax.set_title(name, fontsize=9)
    if column_labels is not None:
      ax.set_xticks(range(len(column_labels)), column_labels, rotation=90, fontsize=7)
    else:
      ax.set_xticks([])
    if rows_labels is not None:
      ax.set_yticks(range(len(rows_labels)), rows_labels, fontsize=7)
    else:
      ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)
  paths.save_figure(fig, path)
  plt.close(fig)


def rollout(images, maps, path: str, title: str):
  """Images beside their attention rollout (upsampled to the image), overlaid."""
  plt = _pyplot()
  fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4), squeeze=False)
  for i, (image, m) in enumerate(zip(images, maps)):
    h, w = image.shape[:2]
    up = np.kron(m, np.ones((h // m.shape[0], w // m.shape[1])))
    axes[0, i].imshow(_gray(image), cmap='gray' if image.shape[-1] == 1 else None, vmin=0, vmax=1)
    axes[1, i].imshow(_gray(image), cmap='gray' if image.shape[-1] == 1 else None, vmin=0, vmax=1)
    axes[1, i].imshow(up, cmap='inferno', alpha=0.6)
    for ax in axes[:, i]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)


def scatter(points_Nx2, labels_N, class_names, path: str, title: str):
  """A 2-D scatter of points coloured by class."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  labels_N = np.asarray(labels_N)
  for c in np.unique(labels_N):
    keep = labels_N == c
    name = class_names[c] if 0 <= c < len(class_names) else str(c)
    ax.scatter(points_Nx2[keep, 0], points_Nx2[keep, 1], s=8, label=name)
  ax.set_xlabel('principal component 1')
  ax.set_ylabel('principal component 2')
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, markerscale=2, ncol=2)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
