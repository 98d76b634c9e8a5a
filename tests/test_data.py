"""Data: the fixed digits split, determinism, per-process sharding, resume, eval coverage, TFDS."""
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from model_zoo.config import base_config
from model_zoo.data import pipeline, registry
from model_zoo.data.base import ArraySource, Dataset
from model_zoo.errors import UserError


def _digits(split):
  return registry.load(base_config().dataset, split)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_digits_split_is_fixed_disjoint_and_stratified():
  train, test = _digits('train'), _digits('test')
  assert (len(train.source), len(test.source)) == (1442, 355)
  tr = train.source.arrays['image'].reshape(len(train.source), -1)
  te = test.source.arrays['image'].reshape(len(test.source), -1)
  from sklearn.datasets import load_digits  # the same images, nothing lost or duplicated
  everything = load_digits().data / 16.0
  assert sorted(map(bytes, np.concatenate([tr, te]).astype(np.float32))) == sorted(
      map(bytes, everything.astype(np.float32)))
  per_class = np.bincount(load_digits().target)
  np.testing.assert_array_equal(np.bincount(test.source.arrays['label']), per_class // 5)  # a fifth of each
  assert tr.dtype == np.float32 and train.source[0]['image'].shape == (8, 8, 1)


def test_training_stream_is_deterministic_and_seeded():
  data = _digits('train')
  a = _take(pipeline.train_iterator(data, batch_size=16, seed=3), 5)
  b = _take(pipeline.train_iterator(data, batch_size=16, seed=3), 5)
  c = _take(pipeline.train_iterator(data, batch_size=16, seed=4), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not all(np.array_equal(x['label'], y['label']) for x, y in zip(a, c))


def test_epochs_are_reshuffled_and_complete():
  data = Dataset(ArraySource({'x': np.arange(10)}), lambda ex: ex, 1, ('a',))
  xs = np.concatenate([b['x'] for b in _take(pipeline.train_iterator(data, batch_size=5, seed=0), 4)])
  assert sorted(xs[:10]) == list(range(10)) and sorted(xs[10:]) == list(range(10))
  assert list(xs[:10]) != list(xs[10:])


def test_processes_split_each_global_batch():
  data = _digits('train')
  whole = _take(pipeline.train_iterator(data, batch_size=16, seed=0, process_index=0, process_count=1), 3)
  parts = [_take(pipeline.train_iterator(data, batch_size=16, seed=0, process_index=p, process_count=2), 3)
           for p in range(2)]
  for step in range(3):
    assert parts[0][step]['label'].shape == (8,)
    merged = np.concatenate([parts[0][step]['image'], parts[1][step]['image']])
    np.testing.assert_array_equal(merged, whole[step]['image'])  # the same global batch, in order


def test_iterator_state_resumes_exactly():
  data = _digits('train')
  it = pipeline.train_iterator(data, batch_size=32, seed=1)
  _take(it, 50)  # past the first epoch (45 batches)
  state = it.get_state()
  expected = _take(it, 5)
  fresh = pipeline.train_iterator(data, batch_size=32, seed=1)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 5)):
    np.testing.assert_array_equal(x['image'], y['image'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_the_split_once(process_count):
  data = _digits('test')
  seen, masked = [], 0
  for p in range(process_count):
    for batch in pipeline.eval_batches(data, batch_size=64, process_index=p, process_count=process_count):
      assert batch['image'].shape[0] == 64 // process_count
      real = batch['mask'] > 0
      seen.extend(map(bytes, batch['image'][real]))
      masked += int((~real).sum())
  assert len(seen) == len(data.source) == 355
  assert sorted(seen) == sorted(map(bytes, data.source.arrays['image']))
  assert masked == 6 * 64 - 355


def test_tfds_source_reads_mock_data():
  with tfds.testing.mock_data(num_examples=24):
    cfg = base_config().dataset
    cfg.name = 'fashion_mnist'
    data = registry.load(cfg, 'train')
    batch = next(pipeline.train_iterator(data, batch_size=8, seed=0))
  assert data.num_classes == 10 and data.class_names[0] == 'T-shirt/top'
  assert batch['image'].shape == (8, 28, 28, 1) and batch['image'].dtype == np.float32
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32


def test_absent_tfds_data_fails_fast_with_advice(tmp_path):
  cfg = base_config().dataset
  cfg.name, cfg.data_dir = 'cifar10', str(tmp_path)
  start = time.time()
  with pytest.raises(UserError, match='not available offline.*download=True'):
    registry.load(cfg, 'train')
  assert time.time() - start < 30
  assert not any(tmp_path.rglob('*.array_record*'))


def test_unknown_dataset_and_split():
  cfg = base_config().dataset
  with pytest.raises(UserError, match='no split'):
    registry.load(cfg, 'validation')
  cfg.name = 'mnits'
  with pytest.raises(UserError, match='unknown data set .*known: cifar10, digits'):
    registry.load(cfg, 'train')
