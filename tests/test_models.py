"""MLP and CNN against naive numpy implementations of the same equations."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from model_zoo.models.cnn import CNN
from model_zoo.models.mlp import MLP


def _relu(x):
  return np.maximum(x, 0)


def _conv_same(x_BxHxWxC, kernel_KxKxCxF, bias_F):
  """Cross-correlation with zero 'SAME' padding, one kernel offset at a time."""
  k = kernel_KxKxCxF.shape[0]
  pad = (k - 1) // 2
  b, h, w, _ = x_BxHxWxC.shape
  xp = np.pad(x_BxHxWxC, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
  out = np.zeros((b, h, w, kernel_KxKxCxF.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + h, j:j + w, :] @ kernel_KxKxCxF[i, j]
  return out + bias_F


def _max_pool_2x2(x):
  b, h, w, c = x.shape
  x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
  return x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).max(axis=(2, 4))


def test_mlp_matches_numpy():
  model = MLP(num_classes=10, hidden_sizes=(16, 12), dropout_rate=0.5)
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  params = nn.unbox(model.init(jax.random.key(0), x, train=False)['params'])
  p = jax.tree.map(np.asarray, params)
  h = x.reshape(4, -1)
  for i in range(2):
    h = _relu(h @ p[f'block_{i}']['kernel'] + p[f'block_{i}']['bias'])
  want = h @ p['cls_head']['kernel'] + p['cls_head']['bias']
  got = model.apply({'params': params}, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert sum(v.size for v in jax.tree.leaves(p)) == (64 + 1) * 16 + (16 + 1) * 12 + (12 + 1) * 10


@pytest.mark.parametrize('shape', [(3, 8, 8, 1), (2, 7, 9, 3)])
def test_cnn_matches_numpy(shape):
  model = CNN(num_classes=5, features=(4, 6), dense_size=7)
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  params = nn.unbox(model.init(jax.random.key(0), x, train=False)['params'])
  p = jax.tree.map(np.asarray, params)
  h = x
  for i in range(2):
    h = _max_pool_2x2(_relu(_conv_same(h, p[f'block_{i}']['kernel'], p[f'block_{i}']['bias'])))
  h = _relu(h.reshape(shape[0], -1) @ p['block_2']['kernel'] + p['block_2']['bias'])
  want = h @ p['cls_head']['kernel'] + p['cls_head']['bias']
  got = model.apply({'params': params}, x, train=False)
  assert got.shape == (shape[0], 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('model', [MLP(num_classes=3, dropout_rate=0.5), CNN(num_classes=3, dropout_rate=0.5)])
def test_dropout_only_in_training_and_keyed(model):
  x = np.ones((2, 8, 8, 1), np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  eval_a = model.apply(variables, x, train=False)
  eval_b = model.apply(variables, x, train=False)
  train_a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  train_b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  train_c = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(train_a, train_b)
  assert not np.allclose(train_a, train_c)
