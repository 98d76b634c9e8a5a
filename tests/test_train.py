"""The loop end to end, in process on 8 fake devices: workdir contents, learning, eval, accumulation."""
import json
import os

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from helpers import tiny_config
from model_zoo.data import pipeline, registry
from model_zoo.evaluation import evaluate
from model_zoo.experiment import build_experiment
from model_zoo.training import loop, sharding
from model_zoo.training.checkpoints import Checkpoints


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_train_then_eval_writes_the_workdir(tmp_path, name):
  workdir = str(tmp_path)
  # lr 3e-2 for the tiny CNN: at 1e-2 whether it halves its loss in 40 steps depends on the seed
  config = tiny_config(name, num_train_steps=40, eval_every_steps=20, checkpoint_every_steps=20,
                       **({'optimizer.learning_rate': 3e-2} if name == 'cnn' else {}))
  loop.train_and_evaluate(config, workdir)

  assert json.load(open(os.path.join(workdir, 'config.json'))) == json.loads(config.to_json_best_effort())
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = [r for r in lines if r['split'] == 'train']
  evals = [r for r in lines if r['split'] == 'eval']
  assert [r['step'] for r in train] == [10, 20, 30, 40] and [r['step'] for r in evals] == [20, 40]
  assert train[-1]['loss'] < 0.7 * train[0]['loss']
  assert {'loss', 'accuracy', 'grad_norm', 'steps_per_sec'} <= set(train[0])
  assert {'loss', 'accuracy', 'precision_macro', 'recall_macro', 'f1_macro'} <= set(evals[0])
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']

  metrics = evaluate.evaluate(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval.json')))
  assert saved == {'step': 40, **metrics}
  assert all(isinstance(v, (int, float)) for v in saved.values())
  assert saved['accuracy'] == pytest.approx(evals[-1]['accuracy'])
  for png in ('training_curves.png', 'confusion_matrix.png'):
    with open(os.path.join(workdir, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_eval_counts_each_example_once(tmp_path):
  """Eval metrics over padded, sharded batches equal a plain forward pass over the whole split."""
  config = tiny_config('mlp', num_train_steps=20, batch_size=48)  # 355 test examples: last batch padded
  loop.train_and_evaluate(config, str(tmp_path))
  data = registry.load(config.dataset, 'test')
  exp = build_experiment(config, data.info)
  state = exp.checkpoints(str(tmp_path)).restore(20, exp.abstract_state)
  metrics, stats = loop.make_eval_fn(exp)(state, data)
  images, labels = data.source.arrays['image'], data.source.arrays['label']
  logits = exp.task.model.apply({'params': jax.device_get(state.params)}, images, train=False)
  assert stats['count'] == len(labels) == 355
  assert metrics['accuracy'] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
  assert metrics['loss'] == pytest.approx(
      float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()), rel=1e-5)


@pytest.mark.parametrize('per_device', [False, True])
def test_gradient_accumulation_matches_one_big_batch(per_device):
  """4 micro-batches of 8 rows (over 8 devices) or one of 32; with per_device_batch_size=1, the 4 follow from the
  devices."""
  results = []
  for steps in (1, 4):
    accumulate = {'per_device_batch_size': 1} if per_device and steps > 1 else {'grad_accum_steps': steps}
    config = tiny_config('mlp', **accumulate, **{'model.dropout_rate': 0.0, 'optimizer.name': 'sgd',
                                                 'optimizer.learning_rate': 0.5, 'optimizer.schedule': 'constant'})
    data = registry.load(config.dataset, 'train')
    exp = build_experiment(config, data.info)
    assert config.grad_accum_steps == steps
    state = exp.init_state()
    batch = {'image': data.source.arrays['image'][:32], 'label': data.source.arrays['label'][:32]}
    step = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))
    new_state, metrics = step(state, sharding.to_global(batch, exp.mesh), jax.random.key(0))  # over 8 devices
    results.append((jax.device_get(new_state.params), float(metrics['loss'])))
  (p1, loss1), (p4, loss4) = results
  assert loss1 == pytest.approx(loss4, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)
  assert not np.allclose(p1['block_0']['kernel'], jax.device_get(state.params)['block_0']['kernel'])


@pytest.mark.parametrize('overrides, words', [
    ({'per_device_batch_size': 3}, ['config.batch_size=32', 'per_device_batch_size=3', 'multiple of 24']),
    ({'per_device_batch_size': 1, 'grad_accum_steps': 2}, ['grad_accum_steps=2', 'disagree', '4 micro-batches']),
    ({'per_device_batch_size': -1}, ['config.per_device_batch_size must be an integer >= 0']),
])
def test_per_device_batch_size_that_does_not_make_the_batch_is_one_error(overrides, words):
  from model_zoo.errors import UserError
  from model_zoo.experiment import check
  with pytest.raises(UserError) as e:
    check(tiny_config('mlp', **overrides))   # batch_size 32 over 8 devices
  assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize('size, steps', [('124m', 2), ('350m', 1), ('1b', 1)])
def test_big_gpt_presets_reach_their_batch_from_a_micro_batch_per_device(size, steps):
  """256 rows a step from 16 or 32 a device (what fits one 80 GB GPU: configs/gpt.py): accumulated over 8 devices."""
  from helpers import preset
  from model_zoo.experiment import check
  config = preset('gpt', f'size={size}')
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp = 8, 1
  check(config)
  assert config.grad_accum_steps == steps and config.batch_size == 256


def test_grad_accum_steps_may_change_on_resume_only_where_the_devices_set_it(tmp_path):
  """With per_device_batch_size the micro-batches follow the devices (the global batch stays); set by hand, they
  are part of what the run computes (BatchNorm's statistics are a micro-batch's)."""
  from model_zoo.errors import UserError
  from model_zoo.experiment import check_same_run
  from model_zoo.workdir import Workdir
  workdir = Workdir(str(tmp_path))
  for per_device in (1, 0):
    saved = tiny_config('mlp', per_device_batch_size=per_device, grad_accum_steps=4)   # as on 1 device
    workdir.config.write_text(saved.to_json_best_effort())
    resumed = tiny_config('mlp', per_device_batch_size=per_device, grad_accum_steps=2)   # as on 2
    if per_device:
      check_same_run(resumed, workdir)
    else:
      with pytest.raises(UserError, match='grad_accum_steps=4'):
        check_same_run(resumed, workdir)


def test_tfds_dataset_through_the_loop(tmp_path):
  config = tiny_config('cnn', num_train_steps=10, eval_every_steps=10, checkpoint_every_steps=10,
                       **{'dataset.name': 'mnist'})
  with tfds.testing.mock_data(num_examples=64):
    loop.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert lines[-1]['split'] == 'eval' and lines[-1]['step'] == 10
  assert np.isfinite(lines[-1]['loss'])


def test_gradient_accumulation_weights_micro_batches_by_their_tokens():
  """A token loss is a mean over tokens: micro-batches holding 32 and 2 targets must not count alike."""
  results = []
  for steps in (1, 4):
    config = tiny_config('gpt', grad_accum_steps=steps, batch_size=16,
                         **{'model.num_layers': 1, 'model.d_model': 32, 'model.num_heads': 8, 'model.d_ff': 64,
                            'dataset.seq_len': 16, 'model.dropout_rate': 0.0, 'optimizer.name': 'sgd',
                            'optimizer.learning_rate': 0.5, 'optimizer.schedule': 'constant', 'mesh.data': 1,
                            'mesh.fsdp': 1, 'mesh.tensor': 8})
    data = registry.load(config.dataset, 'train')
    exp = build_experiment(config, data.info)
    state = exp.init_state()
    batch = jax.tree.map(lambda *rows: np.stack(rows), *[data.source[i] for i in range(16)])
    # micro-batch i takes rows i, i + 4, ...: rows 0, 4, 8, 12 keep every target, the others 2 of 16
    batch['weights'] = np.where(np.arange(16)[:, None] % 4 == 0, batch['weights'],
                                batch['weights'] * (np.arange(16) < 2)).astype(np.float32)
    step = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None))
    new_state, metrics = step(state, sharding.to_global(batch, exp.mesh), jax.random.key(0))
    results.append((jax.device_get(new_state.params), float(metrics['loss'])))
  (p1, loss1), (p4, loss4) = results
  assert loss1 == pytest.approx(loss4, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


def test_a_diverged_run_keeps_no_checkpoint_after_its_last_finite_loss(tmp_path, monkeypatch):
  """One training image is NaN: the loss is finite until the step whose batch holds it. Checkpoints come
  every 2 steps and log lines every 3, so the guard must look at the steps since the last log line."""
  from model_zoo.data import images  # pylint: disable=g-import-not-at-top
  from model_zoo.errors import UserError  # pylint: disable=g-import-not-at-top
  load = images._load_digits
  config = tiny_config('mlp', num_train_steps=40, checkpoint_every_steps=2, log_every_steps=3, eval_every_steps=40,
                       max_checkpoints_to_keep=100)
  for row in range(0, 200, 7):   # a row whose batch comes late enough for some checkpoints to be written first
    def poisoned(row=row):
      x, y = load()
      x = x.copy()
      x[row] = np.nan
      return x, y
    monkeypatch.setattr(images, '_load_digits', poisoned)
    data = registry.load(config.dataset, 'train')
    batches = pipeline.train_iterator(data, batch_size=config.batch_size, seed=config.seed, prefetch=0)
    first_nan = next(s for s in range(1, 100) if np.isnan(next(batches)['image']).any())
    if 8 < first_nan < 40 and first_nan % 3:
      break
  caught_at = next(s for s in range(first_nan, 100) if s % 2 == 0 or s % 3 == 0)  # the next checkpoint or log line
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=f'training diverged: the loss is not finite by step {caught_at}\\.'):
    loop.train_and_evaluate(config, workdir)
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'))
  saved = ckpt.all_steps()
  assert saved == list(range(2, first_nan, 2)), (saved, first_nan)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(ckpt.restore_tree(saved[-1])))
  ckpt.close()
