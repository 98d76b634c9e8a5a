"""Deterministic, per-process sharded, resumable input pipelines on grain.

Training: one global stream, `shuffle(seed)` reshuffled every epoch, augmented (if the
data set says so) with a random number generator per position in that stream, cut into
global batches; process `p` of `n` reads rows [p*B/n, (p+1)*B/n) of each. The
global batch, in order, is therefore the same however many processes there are.
The iterator's `get_state()` is saved in every checkpoint.

Evaluation: the split once, in order, padded to whole batches; `mask` is 0 on
padding so metrics count every real example exactly once.
"""
import grain
import jax
import numpy as np

from model_zoo.data.base import Dataset


class _ProcessShard(grain.MapDataset):
  """This process's contiguous part of each global batch of `parent`."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global, self._local = batch_size, batch_size // process_count
    self._offset = process_index * self._local
    self._len = len(parent) // batch_size * self._local

  def __len__(self):
    return self._len

  def __getitem__(self, j):
    return self._parent[j // self._local * self._global + self._offset + j % self._local]


def _read_options(prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=max(1, min(prefetch, 4)), prefetch_buffer_size=prefetch)


def _process(process_index, process_count):
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


def train_iterator(data: Dataset, *, batch_size: int, seed: int, prefetch: int = 4,
                   process_index: int | None = None, process_count: int | None = None):
  """An endless iterator over this process's part of each global training batch."""
  process_index, process_count = _process(process_index, process_count)
  ds = grain.MapDataset.source(data.source).shuffle(seed=seed).repeat(None).map(data.preprocess)
  if data.augment is not None:
    # Philox keyed by the seed, counter = the global position: the same crops on any process count.
    ds = ds.random_map(data.augment, seed=seed)
  ds = _ProcessShard(ds, batch_size, process_index, process_count)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return iter(ds.to_iter_dataset(_read_options(prefetch)))


def eval_batches(data: Dataset, *, batch_size: int, prefetch: int = 4,
                 process_index: int | None = None, process_count: int | None = None):
  """This process's part of each global eval batch, covering the split once."""
  process_index, process_count = _process(process_index, process_count)
  n = len(data.source)
  padded = -(-n // batch_size) * batch_size

  def example(i):
    ex = data.preprocess(data.source[min(i, n - 1)])
    return {**ex, 'mask': np.float32(i < n)}

  ds = _ProcessShard(grain.MapDataset.range(padded), batch_size, process_index, process_count).map(example)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return iter(ds.to_iter_dataset(_read_options(prefetch)))
