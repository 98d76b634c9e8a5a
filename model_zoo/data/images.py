"""Image classification data: the bundled `digits` (offline) and TFDS `mnist`, `fashion_mnist`, `cifar10`.

Examples are `image` [H, W, C] float32 in [0, 1] and `label` int32. `config.dataset.classes`, a
comma-separated list of class indices ('' = all), keeps only those classes, relabelled 0, 1, ...
in the order given: a few-class task from a many-class data set, for fine-tuning with a new head
(pretrain on digits 0-5, fine-tune on 6-9).
"""
import importlib.util
import os

import ml_collections
import numpy as np

from model_zoo.data.base import ArraySource, Dataset, LazyColumn, tfds_label_names, tfds_source
from model_zoo.errors import UserError


def _classes(config: ml_collections.ConfigDict, num_classes: int) -> list[int] | None:
  """The class indices `config.classes` keeps, or None for all."""
  spec = config.get('classes', '')
  if not spec:
    return None
  try:
    keep = [int(c) for c in spec.split(',')]
  except ValueError:
    keep = []
  if len(keep) < 2 or len(set(keep)) != len(keep) or not all(0 <= c < num_classes for c in keep):
    raise UserError(f'config.dataset.classes={spec!r} must list at least two different class indices in '
                    f'[0, {num_classes}), comma-separated, such as 6,7,8,9; or be empty for all classes')
  return keep


class _Subset:
  """The examples of `source` whose label is in `keep`, relabelled by their place in it."""

  def __init__(self, source, labels: np.ndarray, keep: list[int]):
    self._source = source
    self._index = np.flatnonzero(np.isin(labels, keep))
    self._relabel = {c: i for i, c in enumerate(keep)}

  def __len__(self):
    return len(self._index)

  def __getitem__(self, i):
    ex = dict(self._source[int(self._index[i])])
    ex['label'] = np.asarray(self._relabel[int(ex['label'])], np.int32)
    return ex


def _load_digits():
  """scikit-learn's bundled digits (1797 x 64 pixels in 0..16, and labels), read from its data file: what
  `sklearn.datasets.load_digits` returns, without importing scikit-learn (most of a second a process)."""
  spec = importlib.util.find_spec('sklearn')
  path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'digits.csv.gz') if spec else ''
  if not os.path.exists(path):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    return load_digits(return_X_y=True)
  table = np.loadtxt(path, delimiter=',')
  return table[:, :-1], table[:, -1].astype(np.int64)


def digits(config: ml_collections.ConfigDict, split: str, files=None) -> Dataset:
  """The 1,797 8x8 handwritten digits of the UCI set, bundled with scikit-learn.

  Fixed split, independent of the seed and of library versions: within each
  class, every fifth example (in the bundled order) is test, the rest train.
  """
  del files
  images, labels = _load_digits()
  rank = np.zeros(len(labels), np.int64)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    rank[idx] = np.arange(len(idx))
  is_test = rank % 5 == 4
  splits = {'train': ~is_test, 'test': is_test}
  if split not in splits:
    raise UserError(f'data set digits has no split {split!r}; it has: train, test')
  keep = splits[split]
  arrays = {'image': (images[keep] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1),
            'label': labels[keep].astype(np.int32)}
  names = tuple(str(i) for i in range(10))
  classes = _classes(config, 10)
  if classes is not None:
    chosen = np.isin(arrays['label'], classes)
    relabel = np.full(10, -1, np.int32)
    relabel[classes] = np.arange(len(classes))
    arrays = {'image': arrays['image'][chosen], 'label': relabel[arrays['label'][chosen]]}
    names = tuple(names[c] for c in classes)
  return Dataset(ArraySource(arrays), lambda ex: ex, len(names), names)


def tfds_image_classification(name: str):
  """A loader for the TFDS image classification data set `name` (image and label features)."""
  def load(config: ml_collections.ConfigDict, split: str, files=None) -> Dataset:
    del files
    source = tfds_source(config, name, split, offline_alternative='digits')
    names = tfds_label_names(config, name)
    classes = _classes(config, len(names))
    if classes is not None:
      labels = np.asarray(LazyColumn(source, lambda ex: int(ex['label'])).take(range(len(source))))
      source, names = _Subset(source, labels, classes), tuple(names[c] for c in classes)

    def preprocess(ex):
      return {'image': np.asarray(ex['image'], np.float32) / 255.0,
              'label': np.asarray(ex['label'], np.int32)}
    return Dataset(source, preprocess, len(names), names)
  return load
