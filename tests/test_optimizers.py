"""Every optimizer and schedule builds and steps; schedules, decay mask and clipping by hand."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from model_zoo.config import base_config
from model_zoo.errors import UserError
from model_zoo.training import optimizers

NAMES = ['sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop', 'adafactor', 'lion']
SCHEDULES = ['constant', 'warmup_cosine', 'warmup_linear', 'rsqrt']


def _cfg(**kw) -> ml_collections.ConfigDict:
  cfg = base_config().optimizer
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('schedule', SCHEDULES)
def test_every_optimizer_and_schedule_steps_downhill(name, schedule):
  params = {'w': jnp.full((4, 3), 2.0), 'b': jnp.full((3,), -1.0)}
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  tx = optimizers.build(_cfg(name=name, schedule=schedule, learning_rate=0.05, warmup_steps=2,
                             weight_decay=0.01, grad_clip_norm=10.0), num_train_steps=20)
  opt_state = tx.init(params)
  before = loss(params)
  for _ in range(20):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < before


@pytest.mark.parametrize('name, reference', [
    ('sgd', lambda: optax.sgd(0.1)),
    ('momentum', lambda: optax.sgd(0.1, momentum=0.8)),
    ('nesterov', lambda: optax.sgd(0.1, momentum=0.8, nesterov=True)),
    ('adam', lambda: optax.adam(0.1, b1=0.7, b2=0.9)),
    ('adamw', lambda: optax.adamw(0.1, b1=0.7, b2=0.9, weight_decay=0.0)),
    ('rmsprop', lambda: optax.rmsprop(0.1, momentum=0.8)),
    ('adafactor', lambda: optax.adafactor(0.1)),
    ('lion', lambda: optax.lion(0.1, b1=0.7, b2=0.9, weight_decay=0.0)),
])
def test_each_name_is_its_optax_optimizer(name, reference):
  params = {'w': jnp.arange(12.0).reshape(4, 3) / 10, 'b': jnp.ones(3)}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(3)]
  ours = optimizers.build(_cfg(name=name, learning_rate=0.1, momentum=0.8, b1=0.7, b2=0.9), 10)
  theirs = reference()
  s1, s2 = ours.init(params), theirs.init(params)
  for g in grads:
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = theirs.update(g, s2, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u1, u2)


def test_schedules_follow_their_formulas():
  lr, warmup, total = 0.1, 10, 110
  cos = optimizers.schedule(_cfg(schedule='warmup_cosine', learning_rate=lr, warmup_steps=warmup,
                                 end_learning_rate_factor=0.1), total)
  lin = optimizers.schedule(_cfg(schedule='warmup_linear', learning_rate=lr, warmup_steps=warmup), total)
  rsqrt = optimizers.schedule(_cfg(schedule='rsqrt', learning_rate=lr, warmup_steps=warmup), total)
  const = optimizers.schedule(_cfg(schedule='constant', learning_rate=lr), total)
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                             [0, 0.05, 0.1, 0.01 + 0.09 * 0.5, 0.01], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([lin(5), lin(10), lin(60), lin(110)], [0.05, 0.1, 0.05, 0.0], atol=1e-7)
  # rsqrt: lr * min(s / w, sqrt(w / s)) with s = step + 1.
  np.testing.assert_allclose([rsqrt(4), rsqrt(9), rsqrt(39)], [0.05, 0.1, 0.1 * np.sqrt(10 / 40)], rtol=1e-6)
  assert float(const(0)) == float(const(1000)) == lr


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lion'])
def test_weight_decay_skips_biases_and_scales(name):
  params = {'dense': {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}, 'norm': {'scale': jnp.ones(3)}}
  tx = optimizers.build(_cfg(name=name, learning_rate=0.1, weight_decay=0.5), 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new['dense']['kernel'][0, 0]) < 1.0
  np.testing.assert_array_equal(new['dense']['bias'], params['dense']['bias'])
  np.testing.assert_array_equal(new['norm']['scale'], params['norm']['scale'])


def test_gradient_clipping_bounds_the_update():
  params = {'w': jnp.zeros(4)}
  tx = optimizers.build(_cfg(name='sgd', learning_rate=1.0, grad_clip_norm=0.5), 10)
  updates, _ = tx.update({'w': jnp.full(4, 100.0)}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-6)


def test_unknown_names_are_user_errors():
  with pytest.raises(UserError, match='unknown optimizer'):
    optimizers.build(_cfg(name='adamm'), 10)
  with pytest.raises(UserError, match='unknown schedule'):
    optimizers.build(_cfg(schedule='cosine'), 10)
