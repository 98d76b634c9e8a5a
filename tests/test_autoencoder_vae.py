"""Autoencoder and VAE: shapes, the ELBO's terms against independent formulas, learning, and the commands."""
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats

from helpers import run_cli, tiny_config
from model_zoo.data import registry
from model_zoo.errors import UserError
from model_zoo.evaluation import evaluate
from model_zoo import experiment
from model_zoo.experiment import build_experiment
from model_zoo.models import autoencoder, vae
from model_zoo.tasks import losses
from model_zoo.training import loop, sharding

TINY_AE = {'model.latent_dim': 4, 'model.hidden_sizes': (32,)}
TINY_VAE = {'model.latent_dim': 4, 'model.hidden_sizes': (32,)}
TINY_VAE_FLAGS = ['--config.model.latent_dim=4', '--config.model.hidden_sizes=(32,)', '--config.batch_size=32',
                  '--config.num_train_steps=20', '--config.log_every_steps=10', '--config.eval_every_steps=20',
                  '--config.checkpoint_every_steps=20', '--config.optimizer.warmup_steps=5']
PNGS = ('reconstructions.png', 'samples.png', 'interpolation.png')


def _images(n, split='train'):
  return registry.load(tiny_config('vae').dataset, split).source.arrays['image'][:n]


def test_shapes_and_the_reparameterisation():
  x = _images(5)
  ae = autoencoder.Autoencoder(image_shape=(8, 8, 1), latent_dim=3, hidden_sizes=(16, 8))
  params = ae.init(jax.random.key(0), x)
  assert ae.apply(params, x, method='encode').shape == (5, 3)
  x_hat = ae.apply(params, x)
  assert x_hat.shape == (5, 8, 8, 1) and np.all((x_hat >= 0) & (x_hat <= 1))

  model = vae.VAE(image_shape=(8, 8, 1), latent_dim=3, hidden_sizes=(16,))
  eps = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), x, eps)
  out, mu, log_var = model.apply(params, x, eps)
  assert out.shape == (5, 8, 8, 1) and mu.shape == log_var.shape == (5, 3)
  z = np.asarray(mu) + np.exp(np.asarray(log_var) / 2) * eps     # z = mu + sigma * eps, by hand
  np.testing.assert_allclose(out, model.apply(params, z, method='decode'), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, model.apply(params, mu, method='decode'))


def test_kl_closed_form_matches_monte_carlo():
  rng = np.random.default_rng(0)
  mu, log_var = rng.normal(0, 1, (3, 4)), rng.normal(0, 0.7, (3, 4))
  kl = np.asarray(losses.kl_to_standard_normal(mu.astype(np.float32), log_var.astype(np.float32)))
  sigma = np.exp(log_var / 2)
  z = mu + sigma * rng.standard_normal((200_000, 3, 4))
  log_ratio = (stats.norm.logpdf(z, mu, sigma) - stats.norm.logpdf(z)).sum(-1)   # log q(z|x) - log p(z)
  stderr = log_ratio.std(0) / np.sqrt(len(z))
  assert np.all(np.abs(kl - log_ratio.mean(0)) < 4 * stderr), (kl, log_ratio.mean(0), stderr)
  assert kl.shape == (3,) and np.all(kl > 0.5)


def test_reconstruction_terms_by_hand():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.random((2, 4, 4, 1)), rng.integers(0, 2, (2, 4, 4, 1))]).astype(np.float32)
  logits = (rng.normal(0, 3, x.shape) * np.array([1, 1, 1, 10]).reshape(4, 1, 1, 1)).astype(np.float32)
  l64, x64 = logits.astype(np.float64), x.astype(np.float64)
  log_p, log_1mp = -np.logaddexp(0, -l64), -np.logaddexp(0, l64)    # log sigmoid(l), log(1 - sigmoid(l))
  expected = -(x64 * log_p + (1 - x64) * log_1mp).sum((1, 2, 3))
  np.testing.assert_allclose(losses.bernoulli_nll(x, logits), expected, rtol=1e-5)
  mean = rng.random(x.shape).astype(np.float32)
  np.testing.assert_allclose(losses.gaussian_nll(x, mean, 0.3), -stats.norm.logpdf(x64, mean, 0.3).sum((1, 2, 3)),
                             rtol=1e-5)


def _experiment(name, overrides):
  config = tiny_config(name, **{'optimizer.schedule': 'constant', 'optimizer.learning_rate': 3e-3, **overrides})
  exp = build_experiment(config, registry.load(config.dataset, 'train').info)
  batch = sharding.to_global({'image': _images(32)}, exp.mesh)    # over 8 devices
  return config, exp, exp.init_state(), batch


@pytest.mark.parametrize('name,overrides', [('autoencoder', TINY_AE), ('vae', TINY_VAE),
                                            ('vae', {**TINY_VAE, 'likelihood': 'gaussian'})])
def test_a_few_steps_lower_the_loss(name, overrides):
  _, exp, state, batch = _experiment(name, overrides)
  step = jax.jit(exp.task.train_step)
  losses = []
  for i in range(25):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.25 * abs(losses[0]), losses
  if name == 'vae':
    assert float(metrics['kl']) > 0
    assert float(metrics['loss']) == pytest.approx(float(metrics['reconstruction'] + metrics['kl']), rel=1e-5)


def test_vae_noise_comes_from_the_step_rng():
  config, exp, state, batch = _experiment('vae', TINY_VAE)
  task, x = exp.task, _images(32)
  loss = jax.jit(lambda rng: task.loss_fn(state.params, {}, batch, rng)[1][0])
  a, b, c = loss(jax.random.key(1)), loss(jax.random.key(1)), loss(jax.random.key(2))
  assert float(a['loss']) == float(b['loss']) != float(c['loss'])
  # the reconstruction term is -log p(x|z) at z = mu + sigma * eps, eps ~ N(0, I) drawn from that rng
  mu, log_var = task.model.apply({'params': state.params}, x, method='encode')
  eps = jax.random.normal(jax.random.key(1), (32, config.model.latent_dim))
  logits = task.model.apply({'params': state.params}, mu + np.exp(log_var / 2) * eps, method='decode')
  # by the equations, in float64: Bernoulli -log p = sum softplus(l) - x l; KL = 1/2 sum mu^2 + s^2 - log s^2 - 1
  x, l, mu, log_var = (np.asarray(v, np.float64) for v in (x, logits, mu, log_var))
  nll = np.sum(np.logaddexp(0, l) - x * l, axis=(1, 2, 3))
  kl = 0.5 * np.sum(mu ** 2 + np.exp(log_var) - log_var - 1, -1)
  assert float(a['reconstruction']) == pytest.approx(nll.mean(), rel=1e-5)
  assert float(a['kl']) == pytest.approx(kl.mean(), rel=1e-5)


def test_config_errors():
  config = tiny_config('vae', likelihood='poisson')
  with pytest.raises(UserError, match='likelihood'):  # from the config alone, before any data is read
    experiment.check(config)


def test_autoencoder_train_and_eval(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config('autoencoder', **TINY_AE)
  loop.train_and_evaluate(config, workdir)
  metrics = evaluate.evaluate(config, workdir)
  assert json.load(open(os.path.join(workdir, 'eval.json'))) == {'step': 30, **metrics}
  # per pixel, over the whole test split (355 images, the last eval batch padded): a plain forward pass
  run, _, _, state, _ = evaluate._restore(config, workdir, None)
  x = run.data['test'].source.arrays['image']
  x_hat = run.experiment.task.model.apply({'params': jax.device_get(state.params)}, x)
  assert metrics['mse'] == pytest.approx(float(np.mean((np.asarray(x_hat, np.float64) - x) ** 2)), rel=1e-4)
  for png in ('reconstructions.png', 'interpolation.png'):
    assert open(os.path.join(workdir, png), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_vae_commands_and_deterministic_eval(tmp_path):
  workdir = str(tmp_path)
  run_cli('train.py', '--config=configs/vae.py', f'--workdir={workdir}', *TINY_VAE_FLAGS, check=True)
  run_cli('eval.py', '--config=configs/vae.py', f'--workdir={workdir}', *TINY_VAE_FLAGS, check=True)
  on_one_device = json.load(open(os.path.join(workdir, 'eval.json')))
  assert set(on_one_device) == {'step', 'elbo', 'kl', 'reconstruction', 'mse'}
  assert on_one_device['elbo'] == pytest.approx(-(on_one_device['reconstruction'] + on_one_device['kl']))
  assert on_one_device['kl'] > 0 and on_one_device['reconstruction'] > 0
  train = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert {'loss', 'kl', 'reconstruction'} <= set(train[0])
  pngs = {}
  for png in PNGS:
    pngs[png] = open(os.path.join(workdir, png), 'rb').read()
    assert pngs[png][:8] == b'\x89PNG\r\n\x1a\n'

  # the same numbers and plots again, in this process on 8 devices; the KL also from a plain forward pass
  config = tiny_config('vae', **TINY_VAE, batch_size=32, num_train_steps=20)
  first = evaluate.evaluate(config, workdir)
  for key in ('elbo', 'kl', 'reconstruction', 'mse'):
    assert first[key] == pytest.approx(on_one_device[key], rel=1e-5), key
  assert all(open(os.path.join(workdir, png), 'rb').read() == pngs[png] for png in PNGS)
  run, _, _, state, _ = evaluate._restore(config, workdir, None)
  mu, log_var = run.experiment.task.model.apply({'params': jax.device_get(state.params)},
                                                run.data['test'].source.arrays['image'], method='encode')
  mu, log_var = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
  kl = 0.5 * np.sum(mu ** 2 + np.exp(log_var) - log_var - 1, -1)
  assert first['kl'] == pytest.approx(kl.mean(), rel=1e-5)
