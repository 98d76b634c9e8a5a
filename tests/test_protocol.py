"""Every model family follows the model protocol (model_zoo/models/protocol.py): block and head names,
logical axis names on every parameter, FSDP that really shards and trains like data parallel, FLOPs
and parameter counts; decoders expose a cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAMILIES, tiny_config
from model_zoo.data import pipeline, registry
from model_zoo.experiment import build_experiment
from model_zoo.models import protocol
from model_zoo.models import registry as models
from model_zoo.training import sharding

TIED = {'gpt', 'transformer'}   # the output layer is the embedding: no separate head


def test_every_registered_family_is_covered():
  assert set(FAMILIES) == set(models.MODELS)


def _config(name, overrides=None, **mesh):
  file, tiny = FAMILIES[name]
  return tiny_config(*file.split(':'), **{**tiny, **(overrides or {})}, **{f'mesh.{k}': v for k, v in mesh.items()})


_DATA = {}


def _data(config):
  key = (config.dataset.name, config.dataset.get('vocab_size'))
  if key not in _DATA:
    _DATA[key] = registry.load(config.dataset, config.dataset.train_split)
  return _DATA[key]


def _experiment(name, data=None, fsdp=None, **overrides):
  config = _config(name, overrides, **({} if data is None else {'data': data, 'fsdp': fsdp}))
  data = _data(config)
  return config, data, build_experiment(config, data.info)


# The (inputs, outputs) of each dense layer of the dense-only families above, on 8x8 digits.
DENSE_BY_HAND = {'mlp': [(64, 32), (32, 32), (32, 10)],
                 'autoencoder': [(64, 32), (32, 16), (16, 8), (8, 16), (16, 32), (32, 64)],
                 'vae': [(64, 32), (32, 16), (16, 2 * 8), (8, 16), (16, 32), (32, 64)]}   # mean and log-variance


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_names_logical_axes_sizes(name):
  config, _, exp = _experiment(name)
  boxed = jax.eval_shape(exp.task.init_state, jax.random.key(0), exp.example)
  variables = exp.task.variables(boxed)
  axes = protocol.logical_axes(variables['params'])
  leaves = dict(zip(axes, jax.tree.leaves(nn.unbox(variables['params']))))
  # Every parameter carries one logical name per axis.
  unnamed = [p for p, names in axes.items() if names is None or len(names) != leaves[p].ndim]
  assert not unnamed, unnamed[:5]
  # Blocks are block_0, block_1, ... with no gap (in each stack), heads are <x>_head.
  stacks = {}
  for path in axes:
    i = protocol.block_index(path)
    if i is not None:
      stacks.setdefault(path[:[k for k, part in enumerate(path) if part == f'block_{i}'][-1]], set()).add(i)
  assert stacks and all(found == set(range(len(found))) for found in stacks.values()), stacks
  assert any(protocol.is_head(p) for p in axes) == (name not in TIED)
  assert not any(part.startswith(('Dense_', 'Conv_')) for p in axes for part in p[:1]), 'unnamed top-level layer'
  # Sizes, the same way for every family: by hand for the dense-only ones; for every family, each kernel
  # weight takes part in at least one multiply-add per example (forward) and two more (backward).
  count = protocol.param_count(variables['params'])
  if name in DENSE_BY_HAND:
    assert count == sum(i * o + o for i, o in DENSE_BY_HAND[name])
  inputs = exp.task.model_inputs(exp.example) if hasattr(exp.task, 'model_inputs') else None
  if inputs is not None:
    flops = protocol.flops_per_example(exp.task.model, variables, *inputs, **exp.task.model_kwargs(exp.example))
    kernels = sum(x.size for p, x in leaves.items() if p[-1] == 'kernel')
    assert kernels and flops >= 6 * kernels, (flops, kernels)
    if name in DENSE_BY_HAND:
      assert flops == 6 * sum(i * o for i, o in DENSE_BY_HAND[name])


# One block a stack is enough to shard and train (and compiles twice as fast).
ONE_BLOCK = {'mlp': {'model.hidden_sizes': (32,)}, 'cnn': {'model.features': (8,)}, 'resnet': {'model.stage_sizes': (1,)},
             'vit': {'model.num_layers': 1}, 'mixer': {'model.num_layers': 1}, 'rnn_lm': {'model.num_layers': 1},
             'gpt': {'model.num_layers': 1}, 'bert': {'model.num_layers': 1},
             'transformer': {'model.num_encoder_layers': 1, 'model.num_decoder_layers': 1},
             'autoencoder': {'model.hidden_sizes': (32,)}, 'vae': {'model.hidden_sizes': (32,)}}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_fsdp_shards_the_largest_kernel_and_trains_like_one_device(name):
  """One step with the parameters split 8 ways (fsdp) gives the loss and new parameters of the same step on one
  device, unsharded. (Data parallelism against one device: tests/test_cli.py, and test_lm.py's layouts.)"""
  # SGD, so that new parameters compare like gradients (Adam's first step is lr * sign(g): a gradient
  # that is zero up to rounding, as a bias before a normalisation has, would flip it)
  sgd = {'optimizer.name': 'sgd', **({'discriminator_optimizer.name': 'sgd'} if name == 'dcgan' else {})}
  config, data, exp = _experiment(name, data=1, fsdp=8, **ONE_BLOCK.get(name, {}), **sgd)
  # initialised op by op (nothing to compile), then placed as the layout says
  state = jax.device_put(nn.unbox(exp.task.init_state(jax.random.key(0), exp.example)), exp.state_shardings)
  params = exp.task.variables(state)['params']
  path, largest = max(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: kv[1].size)
  shard = largest.sharding.shard_shape(largest.shape)
  assert 'fsdp' in jax.tree.leaves(tuple(largest.sharding.spec)) and shard != largest.shape, (
      jax.tree_util.keystr(path), largest.shape, largest.sharding.spec)
  batch = sharding.to_global(next(pipeline.train_iterator(data, batch_size=config.batch_size, seed=0)), exp.mesh)
  step = jax.jit(exp.task.train_step, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), None),
                 out_shardings=(exp.state_shardings, None))
  new_state, metrics = step(state, batch, jax.random.key(1))
  one = jax.devices()[0]
  state_1, batch_1 = jax.device_put(jax.device_get((state, batch)), one)
  new_1, metrics_1 = jax.jit(exp.task.train_step)(state_1, batch_1, jax.random.key(1))
  losses = {k: float(v) for k, v in metrics.items() if k == 'loss' or k.endswith('_loss')}
  assert losses and all(k in metrics_1 for k in losses)
  for k in losses:
    assert losses[k] == pytest.approx(float(metrics_1[k]), rel=1e-5, abs=1e-6), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               jax.device_get(exp.task.variables(new_state)['params']), jax.device_get(exp.task.variables(new_1)['params']))


@pytest.mark.parametrize('name', ['gpt', 'rnn_lm', 'transformer'])
def test_decoders_expose_their_cache(name):
  _, _, exp = _experiment(name)
  model = exp.task.model
  assert isinstance(model, protocol.Decoder)
  inputs = exp.task.model_inputs(exp.example)
  cache = protocol.init_cache(model, *inputs)
  assert jax.tree.leaves(cache) and all(not np.any(x) for x in jax.tree.leaves(cache))
  for other in ('mlp', 'bert', 'vit'):
    assert not isinstance(models.MODELS[other](**({'vocab_size': 8} if other == 'bert' else {'num_classes': 2})),
                          protocol.Decoder)


def test_flops_of_a_convolution_and_a_dense_layer_by_hand():
  """2 multiply-adds... per output position: conv 3x3 from 1 to 8 channels on 8x8 'SAME', pool to 4x4, dense."""
  model = models.MODELS['cnn'](num_classes=10, features=(8,), dense_size=16)
  x = jnp.zeros((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  conv = 8 * 8 * 8 * 3 * 3 * 1        # output positions x channels x kernel x input channels
  dense = 4 * 4 * 8 * 16 + 16 * 10
  assert protocol.flops_per_example(model, variables, x) == 3 * 2 * (conv + dense)
