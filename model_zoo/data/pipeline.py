"""Deterministic, per-process sharded, resumable input pipelines on grain.

Training: one global stream, `shuffle(seed)` reshuffled every epoch, then process
`p` of `n` takes elements p, p+n, p+2n, ... and batches `batch_size / n` of them.
Global batch `b` is therefore the same set of examples however many processes
there are. The iterator's `get_state()` is saved in every checkpoint.

Evaluation: the split once, in order, padded to whole batches; `mask` is 0 on
padding so metrics count every real example exactly once.
"""
import grain
import jax
import numpy as np

from model_zoo.data.sources import Dataset


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
  ds = grain.MapDataset.source(data.source).shuffle(seed=seed).repeat(None)
  ds = ds[process_index::process_count].map(data.preprocess)
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

  ds = grain.MapDataset.range(padded)[process_index::process_count].map(example)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  return iter(ds.to_iter_dataset(_read_options(prefetch)))
