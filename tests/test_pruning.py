"""Pruning (model_zoo.compression.pruning): the schedule against Zhu & Gupta's formula, exact masks under
AdamW with weight decay, per-tensor and global thresholds by hand, every family, resume, eval.json and
the sparse export."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from helpers import FAMILIES, family_config, family_data, read_metrics, saved_state, tiny_config
from model_zoo.compression import pruning
from model_zoo.data import pipeline
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo.experiment import build_experiment
from model_zoo.training import loop, sharding


def _p(**kw):
  p = ml_collections.ConfigDict({'method': 'magnitude', 'sparsity': 0.8, 'begin_step': 10, 'end_step': 50,
                                 'frequency': 10, 'params': r'(.*/)?(kernel|u)'})
  p.update(kw)
  return p


def test_the_schedule_is_zhu_and_guptas_formula():
  p = _p(sparsity=0.9, begin_step=100, end_step=1100, frequency=100)
  for t in (0, 99, 100, 150, 400, 777, 1100, 1500):
    by_hand = 0.0 if t < 100 else 0.9 + (0.0 - 0.9) * (1 - min(t - 100, 1000) / 1000) ** 3
    assert float(pruning.sparsity_at(t, p)) == pytest.approx(by_hand, abs=1e-6), t
  steps = [t for t in range(1500) if pruning.is_pruning_step(t, p)]
  assert steps == list(range(100, 1101, 100))
  assert [t for t in range(60) if pruning.is_pruning_step(t, _p(begin_step=5, end_step=27, frequency=10))] == [
      5, 15, 25, 27]   # end_step itself always, so that the run reaches the final sparsity
  one_shot = _p(begin_step=30, end_step=30)
  assert [float(pruning.sparsity_at(t, one_shot)) for t in (29, 30, 31)] == [0.0, pytest.approx(0.8), pytest.approx(0.8)]
  assert [t for t in range(60) if pruning.is_pruning_step(t, one_shot)] == [30]


def _run(tx, params, steps, seed=0):
  state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(seed + i), p.shape), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_pruned_weights_stay_exactly_zero_under_adamw_with_weight_decay():
  params = {'dense': {'kernel': jax.random.normal(jax.random.key(1), (16, 12)), 'bias': jnp.ones(12)},
            'embed': {'embedding': jax.random.normal(jax.random.key(2), (20, 8))}}
  p = _p(sparsity=0.75, begin_step=3, end_step=9, frequency=2)
  tx = jax.jit(pruning.prune(optax.adamw(0.1, weight_decay=0.5), p).update)
  init = pruning.prune(optax.adamw(0.1, weight_decay=0.5), p).init
  state = init(params)
  prev_mask, target = np.ones((16, 12), bool), 0.0
  for i in range(15):
    grads = jax.tree.map(lambda x, i=i: 10 * jax.random.normal(jax.random.key(100 + i), x.shape), params)
    updates, state = tx(grads, state, params)
    params = optax.apply_updates(params, updates)
    mask = np.asarray(state.masks['dense']['kernel'])
    kernel = np.asarray(params['dense']['kernel'])
    assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0), i
    assert not np.any(mask & ~prev_mask), i   # a pruned weight is never revived
    prev_mask = mask
    if i + 1 in (3, 5, 7, 9):   # the masks change at the pruning steps only
      target = float(pruning.sparsity_at(i + 1, p))
    assert np.sum(~mask) == round(target * 192), i
  assert np.mean(np.asarray(params['dense']['kernel']) == 0) == 0.75
  assert set(traverse_util.flatten_dict(state.masks)) == {('dense', 'kernel')}   # no bias, no embedding
  assert np.all(np.asarray(params['embed']['embedding']) != 0)


def test_layerwise_and_global_thresholds_by_hand():
  a = jnp.array([[0.1, -5.0], [3.0, 0.2]])          # small weights
  b = jnp.array([[10.0, -20.0, 0.5], [30.0, 40.0, -0.3]])  # large weights
  params = {'a': {'kernel': a}, 'b': {'kernel': b}}
  sgd0 = optax.sgd(0.0)
  for method, kept_a, kept_b in [
      # per tensor, half of each: a keeps -5, 3; b keeps 30, 40, -20
      ('magnitude', [[0, 1], [1, 0]], [[0, 1, 0], [1, 1, 0]]),
      # one threshold over all 10 weights, 5 pruned: 0.1, 0.2, 0.3, 0.5, 3.0
      ('global_magnitude', [[0, 1], [0, 0]], [[1, 1, 0], [1, 1, 0]])]:
    tx = pruning.prune(sgd0, _p(method=method, sparsity=0.5, begin_step=0, end_step=0))
    out, state = _run(tx, params, 1)
    np.testing.assert_array_equal(state.masks['a']['kernel'], np.array(kept_a, bool), err_msg=method)
    np.testing.assert_array_equal(state.masks['b']['kernel'], np.array(kept_b, bool), err_msg=method)
    np.testing.assert_array_equal(out['a']['kernel'], np.where(kept_a, a, 0.0))


def test_a_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(UserError, match='matches no parameter of this model'):
    pruning.prune(optax.sgd(0.1), _p(params='nothing/.*')).init({'dense': {'kernel': jnp.ones((2, 2))}})


def _expected_pruned(name, params):
  return {k for k in traverse_util.flatten_dict(params)
          if k[-1] in ('kernel', 'u') and not any('_lora_' in part for part in k)}



@pytest.mark.parametrize('name', sorted(set(FAMILIES) - {'dcgan'}))
def test_every_family_is_pruned_at_its_kernels(name):
  """One-shot at step 0: the initial masks prune half of each kernel (and LSTM/GRU's u), nothing else; the
  CNN (convolutions) and the LSTM (u inside a scan) also take a training step on the masked weights."""
  config = family_config(name, **{'pruning.method': 'magnitude', 'pruning.sparsity': 0.5, 'pruning.begin_step': 0,
                                  'pruning.end_step': 0})
  data = family_data(config)
  exp = build_experiment(config, data.info)
  state = exp.init_state()
  masks = traverse_util.flatten_dict(jax.device_get(state.opt_state.masks))
  assert set(masks) == _expected_pruned(name, state.params)
  for k, m in masks.items():
    assert np.sum(~m) == round(0.5 * m.size), k
  if name in ('cnn', 'rnn_lm'):
    batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=config.batch_size, seed=0,
                                                            prefetch=0)), exp.mesh)
    state, metrics = jax.jit(exp.task.train_step)(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics['loss'])) and float(metrics['sparsity']) == pytest.approx(0.5, abs=0.01)
    params = traverse_util.flatten_dict(jax.device_get(state.params))
    for k, m in masks.items():
      assert np.all(params[k][~m] == 0.0), k


def test_the_gan_refuses_pruning():
  with pytest.raises(UserError, match='the gan task trains two'):
    build_experiment(family_config('dcgan', **{'pruning.method': 'magnitude'}), None)


def _pruned_mlp(**kw):
  return tiny_config('mlp', **{'model.hidden_sizes': (32, 32), 'num_train_steps': 16, 'checkpoint_every_steps': 4,
                               'eval_every_steps': 8, 'log_every_steps': 2, 'pruning.method': 'global_magnitude',
                               'pruning.sparsity': 0.8, 'pruning.begin_step': 2, 'pruning.end_step': 12,
                               'pruning.frequency': 3, **kw})


@pytest.fixture(scope='module')
def pruned_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pruned'))
  loop.train_and_evaluate(_pruned_mlp(), workdir)
  return workdir


def test_a_pruned_run_resumes_bit_exactly(pruned_run, tmp_path):
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(pruned_run, workdir)
  for step in ('12', '16'):   # as if killed after step 8's checkpoint, between two mask updates
    shutil.rmtree(os.path.join(workdir, 'checkpoints', step))
  loop.train_and_evaluate(_pruned_mlp(), workdir)
  assert read_metrics(workdir) == read_metrics(pruned_run)
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 16), saved_state(pruned_run, 16))
  assert [m['sparsity'] for m in read_metrics(pruned_run) if m['split'] == 'train'][-1] == pytest.approx(0.8, abs=1e-3)


def test_eval_reports_sparsity_and_export_writes_it_sparse(pruned_run, tmp_path):
  metrics = evaluate.evaluate(_pruned_mlp(), pruned_run)
  with open(os.path.join(pruned_run, 'eval.json')) as f:
    saved = json.load(f)
  assert saved['sparsity'] == metrics['sparsity'] == pytest.approx(0.8, abs=1e-3)
  assert set(saved['sparsity_by_layer']) == {'block_0/kernel', 'block_1/kernel', 'cls_head/kernel'}
  # global: one threshold, so the layers differ, and their zeros add up to 80% of all pruned weights
  sizes = {'block_0/kernel': 64 * 32, 'block_1/kernel': 32 * 32, 'cls_head/kernel': 32 * 10}
  zeros = sum(saved['sparsity_by_layer'][k] * n for k, n in sizes.items())
  assert zeros == pytest.approx(round(0.8 * sum(sizes.values())))
  assert len(set(saved['sparsity_by_layer'].values())) > 1

  out = str(tmp_path / 'export')
  evaluate.export(_pruned_mlp(), pruned_run, out)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  dense, stored = load_file(os.path.join(out, 'model.safetensors')), load_file(os.path.join(out, 'sparse.safetensors'))
  with open(os.path.join(out, 'sparsity.json')) as f:
    info = json.load(f)
  restored = pruning.from_sparse(stored, {k: tuple(v) for k, v in info['shapes'].items()})
  assert set(restored) == set(dense)
  for k in dense:
    np.testing.assert_array_equal(restored[k], dense[k], err_msg=k)
  nonzero = sum(int(np.sum(dense[k] != 0)) for k in sizes)
  by_hand = sum(4 * w.size for k, w in dense.items() if k not in sizes) + 4 * nonzero + sum(
      (n + 7) // 8 for n in sizes.values())
  assert info['sparse_bytes'] == by_hand and info['dense_bytes'] == sum(w.nbytes for w in dense.values())
  assert stored['block_0/kernel/values'].size == int(np.sum(dense['block_0/kernel'] != 0))


def test_prune_then_fine_tune_prunes_the_pretrained_weights(pruned_run, tmp_path):
  """init_from a dense run, one-shot at step 0: the pretrained weights' smallest are the ones pruned."""
  dense_dir = str(tmp_path / 'dense')
  loop.train_and_evaluate(tiny_config('mlp', **{'model.hidden_sizes': (32, 32), 'num_train_steps': 8}), dense_dir)
  config = _pruned_mlp(init_from=dense_dir, num_train_steps=4, **{'pruning.method': 'magnitude',
                                                                  'pruning.begin_step': 0, 'pruning.end_step': 0,
                                                                  'pruning.sparsity': 0.5,
                                                                  'optimizer.learning_rate': 1e-9,
                                                                  'optimizer.warmup_steps': 0})
  run_dir = str(tmp_path / 'finetuned')
  loop.train_and_evaluate(config, run_dir)
  before = saved_state(dense_dir, 8)['params']['block_0']['kernel']
  after = saved_state(run_dir, 4)['params']['block_0']['kernel']
  kept = np.abs(before) >= np.median(np.abs(before))
  np.testing.assert_array_equal(after != 0, kept)
  np.testing.assert_allclose(after[kept], before[kept], atol=1e-6)


@pytest.mark.parametrize('overrides, message', [
    ({'pruning.method': 'random'}, "unknown pruning method 'random'"),
    ({'pruning.sparsity': 1.0}, r'sparsity is the fraction of weights set to zero, in \[0, 1\)'),
    ({'pruning.sparsity': -0.1}, r'in \[0, 1\)'),
    ({'pruning.end_step': 17}, 'is after the end of training'),
    ({'pruning.begin_step': 13}, 'is after end_step=12'),
    ({'pruning.frequency': 0}, 'frequency must be an integer >= 1'),
    ({'pruning.params': '(kernel'}, 'is not a regular expression'),
    ({'pruning.params': 'nothing'}, 'matches no parameter of this model'),
])
def test_pruning_mistakes_are_one_line_and_write_nothing(tmp_path, overrides, message):
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=message) as e:
    loop.train_and_evaluate(_pruned_mlp(**overrides), workdir)
  assert '\n' not in str(e.value) and not os.path.exists(workdir)
