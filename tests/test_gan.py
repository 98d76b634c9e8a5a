"""The GAN: losses against their definitions, alternating updates, scores, and the commands."""
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import run_cli, tiny_config
from model_zoo.data import registry
from model_zoo.models.gan import Discriminator
from model_zoo.tasks import gan

TINY = ['--config.model.latent_dim=8', '--config.model.generator_features=8',
        '--config.model.discriminator_features=8', '--config.batch_size=32', '--config.log_every_steps=5',
        '--config.eval_every_steps=10', '--config.checkpoint_every_steps=5', '--config.eval_samples=50',
        '--config.classifier.model.features=(8,)', '--config.classifier.model.dense_size=16',
        '--config.classifier.num_train_steps=20', '--config.classifier.log_every_steps=10',
        '--config.classifier.optimizer.warmup_steps=5',
        '--config.classifier.eval_every_steps=20', '--config.classifier.checkpoint_every_steps=20']


def _task():
  cfg = tiny_config('gan', **{'model.latent_dim': 8, 'model.generator_features': 8,
                              'model.discriminator_features': 8})
  data = registry.load(cfg.dataset, 'train')
  task = gan.GANTask(cfg, data.info)
  batch = {'image': np.stack([data.source[i]['image'] for i in range(16)])}
  state = nn.unbox(task.init_state(jax.random.key(0), batch))
  return task, state, batch


def _log_sigmoid(x):
  return -np.log1p(np.exp(-np.asarray(x, np.float64)))


def test_one_step_follows_the_definitions_and_g_sees_the_updated_d():
  task, state, batch = _task()
  g, d = state['generator'], state['discriminator']
  rng = jax.random.key(3)
  new, metrics = jax.jit(task.train_step)(state, batch, rng)
  d_rng, g_rng = jax.random.split(rng)
  fake, _ = task.generate(g.params, g.model_state, task._latents(d_rng, 16), train=True)
  real_logits, fake_logits = task.discriminate(d.params, batch['image']), task.discriminate(d.params, fake)
  # D: -log D(x) - log(1 - D(G(z))), with D = sigmoid(logit)
  expected_d = -_log_sigmoid(real_logits).mean() - _log_sigmoid(-np.asarray(fake_logits)).mean()
  np.testing.assert_allclose(float(metrics['d_loss']), expected_d, rtol=1e-5)
  # G: -log D'(G(z')) with D' the discriminator after this step's update, G before its own
  fake2, _ = task.generate(g.params, g.model_state, task._latents(g_rng, 16), train=True)
  expected_g = -_log_sigmoid(task.discriminate(new['discriminator'].params, fake2)).mean()
  np.testing.assert_allclose(float(metrics['g_loss']), expected_g, rtol=1e-5)
  for name in ('generator', 'discriminator'):
    before, after = jax.tree.leaves(state[name].params), jax.tree.leaves(new[name].params)
    assert all(not np.allclose(a, b) for a, b in zip(before, after)), name
    assert int(new[name].step) == 1
  # the generator's batch statistics moved towards this step's batch
  assert not np.allclose(jax.tree.leaves(new['generator'].model_state)[0], jax.tree.leaves(g.model_state)[0])


def test_discriminator_and_its_minibatch_std_channel_by_hand():
  d = Discriminator(features=4)
  x_same = np.tile(np.random.default_rng(0).random((1, 8, 8, 1), np.float32), (6, 1, 1, 1))
  params = nn.unbox(d.init(jax.random.key(0), x_same, train=False))
  # The model's logits match the numpy ones only if it appended this std; the two batches are the two
  # regimes: a collapsed batch (no spread: sqrt(1e-8)) and a spread one.
  assert _std_by_hand(d, params, x_same) == pytest.approx(1e-4)
  assert _std_by_hand(d, params, np.random.default_rng(1).random((6, 8, 8, 1), np.float32)) > 0.01


def _std_by_hand(d, params, x):
  """D's logits recomputed in numpy from its parameters; -> the minibatch std it appended."""
  def conv(p, y):
    out = jax.lax.conv_general_dilated(y.astype(np.float32), np.asarray(p['kernel']), (2, 2), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return np.asarray(out, np.float64) + np.asarray(p['bias'], np.float64)[None, None, None]
  leaky = lambda y: np.where(y > 0, y, 0.2 * y)
  p = params['params']
  h = leaky(conv(p['block_0'], x))
  std = np.mean(np.sqrt(np.var(h, axis=0) + 1e-8))
  h = leaky(conv(p['block_1'], np.concatenate([h, np.full(h.shape[:3] + (1,), std)], -1)))
  logits = (h.reshape(len(x), -1) @ np.asarray(p['logit_head']['kernel'], np.float64)[:, 0]
            + float(p['logit_head']['bias'][0]))
  np.testing.assert_allclose(np.asarray(d.apply(params, x, train=False)), logits, rtol=1e-4, atol=1e-5)
  return std


def test_sample_scores_by_hand():
  one_hot = np.eye(10)
  uniform = one_hot[np.arange(100) % 10]
  assert gan.sample_scores(uniform) == {'confident_share': 1.0, 'class_spread': pytest.approx(1.0)}
  collapsed = np.tile(one_hot[3], (50, 1))
  assert gan.sample_scores(collapsed) == {'confident_share': 1.0, 'class_spread': 0.0}
  unsure = np.full((4, 10), 0.1)
  unsure[:2] = one_hot[[0, 1]] * 0.95 + 0.005
  scores = gan.sample_scores(unsure)
  assert scores['confident_share'] == 0.5
  # argmax of the two uniform rows is class 0: histogram (3/4, 1/4)
  assert scores['class_spread'] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(10))


def test_train_and_eval_commands(tmp_path):
  """(Resuming, killed anywhere, is tests/test_kill.py's: both optimizers' states and G's batch statistics.)"""
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  run_cli('train.py', '--config=configs/gan.py', f'--workdir={whole}', '--config.num_train_steps=20', *TINY, check=True)
  shutil.copytree(whole, split)   # the same trained run, before eval.py trains its classifier
  proc = run_cli('eval.py', '--config=configs/gan.py', f'--workdir={whole}', *TINY, check=True)
  assert 'training the evaluation classifier' in proc.stdout
  with open(os.path.join(whole, 'eval.json')) as f:
    result = json.load(f)
  assert sum(result['class_counts']) == 50
  share = np.array([c for c in result['class_counts'] if c]) / 50   # the classes of the 50 samples
  assert result['class_spread'] == pytest.approx(-(share * np.log(share)).sum() / np.log(10), abs=1e-6)
  assert 0 <= result['confident_share'] <= 1 and result['confident_share'] * 50 == pytest.approx(
      round(result['confident_share'] * 50))   # a share of the 50 samples
  assert os.path.exists(os.path.join(whole, 'samples.png'))
  assert os.path.exists(os.path.join(whole, 'classifier', 'eval.json'))
  # A classifier trained elsewhere is an input: used as it is, nothing trained, the same scores.
  proc = run_cli('eval.py', '--config=configs/gan.py', f'--workdir={split}', *TINY,
                 f'--config.classifier_workdir={whole}/classifier', check=True)
  assert 'training the evaluation classifier' not in proc.stdout
  assert not os.path.exists(os.path.join(split, 'classifier'))
  with open(os.path.join(split, 'eval.json')) as f:
    again = json.load(f)
  assert {k: again[k] for k in ('confident_share', 'class_spread', 'class_counts')} == {
      k: result[k] for k in ('confident_share', 'class_spread', 'class_counts')}
