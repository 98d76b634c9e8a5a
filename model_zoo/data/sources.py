"""Data sets by name, as random-access sources of examples (dicts of numpy arrays).

`digits` ships with scikit-learn and needs no network: it is the offline default.
The TFDS names are read with `tfds.data_source` (ArrayRecord files, numpy out, no
TensorFlow at read time); they must be on disk, or `config.dataset.download=True`.
"""
import dataclasses
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from model_zoo.config import lookup
from model_zoo.data import augment as augment_lib
from model_zoo.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split: `source[i]` is a raw example; `preprocess` turns it into model input.

  Classification data sets set `num_classes` and `class_names`; text data sets set
  `tokenizer` (see model_zoo.data.text); translation data sets also `raw`, the untokenized
  (source, target) pairs that decoding and BLEU start from. `augment(example, rng)`, if set,
  is applied by the training pipeline only (model_zoo.data.augment).
  """
  source: Sequence[dict]
  preprocess: Callable[[dict], dict]
  num_classes: int = 0
  class_names: tuple[str, ...] = ()
  tokenizer: Any = None
  raw: Sequence | None = None
  augment: Callable[[dict, np.random.Generator], dict] | None = None


class ArraySource:
  """Random access over a dict of equally long arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


def _digits(config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  """The 1,797 8x8 handwritten digits of the UCI set, bundled with scikit-learn.

  Fixed split, independent of the seed and of library versions: within each
  class, every fifth example (in the bundled order) is test, the rest train.
  """
  del workdir
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  images, labels = load_digits(return_X_y=True)
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
  return Dataset(ArraySource(arrays), lambda ex: ex, 10, tuple(str(i) for i in range(10)))


def tfds_source(config: ml_collections.ConfigDict, name: str, split: str, offline_alternative: str):
  """`tfds.data_source(name, split)` from config.data_dir, or a UserError that says how to get it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=config.data_dir or None, download=config.download)
  except Exception as e:  # TFDS raises several types for "not there"; all mean the same to a user.
    where = config.data_dir or '~/tensorflow_datasets (TFDS default)'
    if config.download:
      raise UserError(f'could not download and prepare TFDS data set {name!r} split {split!r} '
                      f'into {where}: {type(e).__name__}: {str(e).splitlines()[0]}. '
                      f'Check the network, and that `pip install -e ".[tfds]"` was run') from e
    raise UserError(
        f'TFDS data set {name!r} (split {split!r}) is not available offline in {where}. '
        f'Download it once with --config.dataset.download=True (needs the network and '
        f'`pip install -e ".[tfds]"`), point --config.dataset.data_dir at a directory that holds it '
        f'in array_record format, or use --config.dataset.name={offline_alternative}, which needs no '
        f'download') from e


def _tfds_image_classification(name: str):
  def load(config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
    del workdir
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    source = tfds_source(config, name, split, offline_alternative='digits')
    info = tfds.builder(name, data_dir=config.data_dir or None).info
    label = info.features['label']

    def preprocess(ex):
      return {'image': np.asarray(ex['image'], np.float32) / 255.0,
              'label': np.asarray(ex['label'], np.int32)}
    return Dataset(source, preprocess, label.num_classes, tuple(label.names))
  return load


def _text(config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  from model_zoo.data import text  # pylint: disable=g-import-not-at-top  (text imports this module)
  return text.load(config, split, workdir)


def _text_classification(config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  from model_zoo.data import text_classification  # pylint: disable=g-import-not-at-top
  return text_classification.load(config, split, workdir)


def _translation(config: ml_collections.ConfigDict, split: str, workdir: str | None) -> Dataset:
  from model_zoo.data import translation  # pylint: disable=g-import-not-at-top
  return translation.load(config, split, workdir)


DATASETS = {
    'digits': _digits,
    'mnist': _tfds_image_classification('mnist'),
    'fashion_mnist': _tfds_image_classification('fashion_mnist'),
    'cifar10': _tfds_image_classification('cifar10'),
    'pydoc': _text,   # the CPython documentation text (pydoc_data), offline
    'lm1b': _text,    # TFDS One Billion Word benchmark
    'pydoc_topics': _text_classification,   # which CPython documentation topic a passage is from
    'pydoc_topic_spans': _text_classification,  # ... per token, in rows of two passages
    'glue/sst2': _text_classification,      # TFDS
    'imdb_reviews': _text_classification,   # TFDS
    'numbers': _translation,                # English number words -> German, generated offline
    'wmt14_translate/de-en': _translation,  # TFDS
    'wmt17_translate/de-en': _translation,  # TFDS
}


def load(dataset_config: ml_collections.ConfigDict, split: str, workdir: str | None = None) -> Dataset:
  """The split of the data set `dataset_config.name` names.

  `workdir` is where a data set keeps what it derives for one run (a trained tokenizer).
  """
  loader = lookup(DATASETS, dataset_config.name, 'data set', 'dataset.name')
  data = loader(dataset_config, split, workdir)
  augment = augment_lib.build(dataset_config)
  if augment is None:
    return data
  example = data.preprocess(data.source[0])
  if np.ndim(example.get('image')) != 3:
    raise UserError(f'config.dataset.augment={dataset_config.augment!r} needs images [H, W, C]; '
                    f'data set {dataset_config.name!r} has none')
  return dataclasses.replace(data, augment=augment)
