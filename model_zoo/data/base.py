"""What every data set shares: the Dataset type, the files of a run, reading TFDS offline, fixed splits.

Every loader (model_zoo.data.registry) returns a `Dataset`: a random-access `source` of raw
examples (dicts of numpy arrays) and `preprocess`, which makes one into model input. `info` is
what a task needs to know of the data (classes, tokenizer, an example's shapes); it is the same
for every split of a data set.

A loader never names a file: what it keeps for a run (a trained tokenizer, an encoded split) it
reads from and writes to the paths in `Files`, which the driver chooses (model_zoo.workdir).
"""
import collections.abc
import dataclasses
import functools
import hashlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from model_zoo.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a task needs of a data set, whatever the split: an example (for shapes), the classes,
  the tokenizer, and facts a data set adds (`meta`, such as the splits a translation task decodes)."""
  example: dict
  num_classes: int = 0
  class_names: tuple[str, ...] = ()
  tokenizer: Any = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split: `source[i]` is a raw example; `preprocess` turns it into model input.

  Classification data sets set `num_classes` and `class_names`; text data sets set
  `tokenizer` (see model_zoo.data.tokenizers); translation data sets also `raw`, the untokenized
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
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def info(self) -> DataInfo:
    return DataInfo(self.preprocess(self.source[0]), self.num_classes, self.class_names, self.tokenizer, self.meta)


@dataclasses.dataclass(frozen=True)
class Files:
  """Paths of the files a data set keeps for one run, chosen by the driver.

  A loader reuses `tokenizer` (and `encoded(name)`, an encoded copy of the split `name`) if that
  file exists; else it makes a new one and saves it to `new_tokenizer` (`new_encoded(name)`), from
  where the driver moves it into the work directory once every check has passed. None: nothing to
  reuse, or nothing kept (a new tokenizer then lives in memory only).
  """
  tokenizer: str | None = None
  new_tokenizer: str | None = None
  encoded: Callable[[str], str] | None = None
  new_encoded: Callable[[str], str] | None = None


class ArraySource:
  """Random access over a dict of equally long arrays."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self._len = len(next(iter(arrays.values())))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


def hash_bucket(key: str, buckets: int) -> int:
  """A fixed bucket in [0, buckets) for `key`: splits by hash stay the same across versions and runs."""
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big') % buckets


def to_str(value) -> str:
  """A TFDS text feature (bytes, a 0-d array of bytes, or str) as str."""
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# TFDS.

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


def tfds_label_names(config: ml_collections.ConfigDict, name: str) -> tuple[str, ...]:
  """The class names of a TFDS data set's `label` feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tuple(tfds.builder(name, data_dir=config.data_dir or None).info.features['label'].names)


class LazyColumn(collections.abc.Sequence):
  """`decode(example)` of each example of a TFDS data source, read in batches on access: a split of
  30M sentences as Python strings would take several GB."""

  def __init__(self, source, decode: Callable[[dict], Any], batch: int = 4096):
    self._source, self._decode, self._batch = source, decode, batch

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.take(range(len(self))[i])
    return self.take([range(len(self))[i]])[0]

  def __iter__(self):
    for lo in range(0, len(self), self._batch):
      yield from self[lo:lo + self._batch]

  def take(self, keys) -> list:
    """The decoded examples at `keys`, read `batch` at a time."""
    keys = list(keys)
    return [x for lo in range(0, len(keys), self._batch) for x in self._read(keys[lo:lo + self._batch])]

  def _read(self, keys) -> list:
    try:
      examples = self._source.__getitems__(keys) if keys else []
    except TypeError:  # tfds.testing.mock_data's __getitems__ (tfds 4.9.10) cannot be called
      examples = [self._source[k] for k in keys]
    return [self._decode(ex) for ex in examples]
