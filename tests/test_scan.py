"""Scanned blocks (model.scan_layers) and remat policies (model.remat_policy): the same function and gradients as
the unrolled model, checkpoints that convert between the two layouts, and the tools that read blocks by name."""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import family_config, family_data
from model_zoo.evaluation import evaluate
from model_zoo.experiment import build_experiment
from model_zoo.models import protocol
from model_zoo.models.gpt import GPT
from model_zoo.inference import sampling
from model_zoo.tasks import registry as task_registry
from model_zoo.training import loop, optimizers
from model_zoo.transfer import export as export_lib
from model_zoo.transfer import finetune

FAMILIES = ['gpt', 'bert', 'transformer', 'vit']


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _close_to_scale(a, b, tol=1e-5):
  """Every value within tol of the largest value of `b` (float32 sums in another order)."""
  scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol * scale), a, b)


@pytest.mark.parametrize('family', FAMILIES)
def test_scanned_blocks_compute_what_unrolled_blocks_do(family):
  """The same parameters, stacked on a 'layers' axis, give the unrolled model's loss and gradients."""
  config = family_config(family, **{'model.dropout_rate': 0.0})
  data = family_data(config)
  task = task_registry.build(config, data.info)
  with config.unlocked():
    config.model.scan_layers = True
  scanned = task_registry.build(config, data.info)
  batch = jax.tree.map(lambda *x: np.stack(x), *[data.preprocess(data.source[i])
                                                 for i in range(min(4, len(data.source)))])
  variables = nn.unbox(task.model.init(jax.random.key(0), *task.model_inputs(batch), train=False,
                                       **task.model_kwargs(batch)))
  stacked = protocol.to_layout(variables, 'scanned')
  assert protocol.layout(protocol.path_names(k) for k, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]) == \
      'scanned'
  boxed = scanned.model.init(jax.random.key(0), *task.model_inputs(batch), train=False, **task.model_kwargs(batch))
  assert jax.tree.map(jnp.shape, nn.unbox(boxed)) == jax.tree.map(jnp.shape, stacked)
  axes = protocol.logical_axes(boxed['params'])
  assert all(names[0] == 'layers' for path, names in axes.items() if 'blocks' in path)

  def loss(t, v):
    out, _ = t.apply(v['params'], {k: x for k, x in v.items() if k != 'params'}, t.model_inputs(batch),
                     train=False, **t.model_kwargs(batch))
    return jnp.mean(jnp.square(out)) if out.ndim else out
  got, want = jax.value_and_grad(lambda p: loss(scanned, {**stacked, 'params': p}))(stacked['params']), \
      jax.value_and_grad(lambda p: loss(task, {**variables, 'params': p}))(variables['params'])
  _close(got[0], want[0])
  _close_to_scale(protocol.to_layout(got[1], 'unrolled'), want[1])


def _gpt(**kw):
  model = GPT(vocab_size=23, num_layers=3, d_model=32, num_heads=4, d_ff=64, max_len=32, **kw)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), train=False)['params'])
  return model, params


@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_recompute_what_they_do_not_save(scan):
  """Every policy gives the same gradients; the backward pass holds more matmuls the less a policy saves (the
  program's dot_generals, recomputation included): none < attention_mlp < attention < qkv < full, none < dots
  < full."""
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 23)
  dots, grads = {}, {}
  for policy in ('none', 'attention_mlp', 'attention', 'qkv', 'dots', 'full'):
    model, params = _gpt(remat_policy=policy, scan_layers=scan)
    params = protocol.to_layout(_gpt()[1], 'scanned' if scan else 'unrolled')
    loss = lambda p, m=model: m.apply({'params': p}, tokens, train=False).mean()
    grads[policy] = jax.jit(jax.grad(loss))(params)
    dots[policy] = jax.jit(jax.grad(loss)).lower(params).as_text().count('dot_general')
  for policy in grads:
    _close(grads[policy], grads['none'], rtol=1e-5, atol=1e-7)
  assert dots['none'] < dots['attention_mlp'] < dots['attention'] < dots['qkv'] < dots['full']
  assert dots['none'] < dots['dots'] < dots['full']


def test_scanned_decoder_decodes_as_the_unrolled_one():
  """The cache of scanned blocks (layers on axis 1, after the batch) gives the unrolled model's greedy tokens."""
  model, params = _gpt()
  prompt = jnp.array([[1, 5, 7, 9], [2, 4, 6, 8]])
  want = sampling.generate(model, params, prompt, jax.random.key(0), max_new_tokens=6, temperature=0.0)
  got = sampling.generate(model.clone(scan_layers=True), protocol.to_layout(params, 'scanned'), prompt,
                          jax.random.key(0), max_new_tokens=6, temperature=0.0)
  np.testing.assert_array_equal(got, want)
  cache = protocol.init_cache(model.clone(scan_layers=True), prompt)
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(cache))   # batch-major, as protocol.empty_cache needs


def test_layer_decay_scales_each_stacked_block_as_its_unrolled_twin():
  _, params = _gpt()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optimizers.finetuning(layer_decay=0.5)
  want = tx.update(grads, tx.init(params))[0]
  got = tx.update(protocol.to_layout(grads, 'scanned'), tx.init(params))[0]
  _close(protocol.to_layout(got, 'unrolled'), want)
  assert float(want['block_0']['mlp']['wi']['kernel'][0, 0]) == 0.5 ** 3   # 3 blocks + the top: 0.5^(4 - 1)
  assert float(got['blocks']['mlp']['wi']['kernel'][2, 0, 0]) == 0.5 ** 1


def test_checkpoints_convert_between_scanned_and_unrolled(tmp_path):
  """Train scanned; evaluate and resume unrolled (the optimizer state converted too), from the checkpoint of step 4
  with the later one removed: the unrolled resume ends where the uninterrupted scanned run did. Its export names
  the blocks block_<i>."""
  overrides = {'model.dropout_rate': 0.0, 'num_train_steps': 8, 'checkpoint_every_steps': 4, 'log_every_steps': 4,
               'eval_every_steps': 8}
  scanned = family_config('gpt', **overrides, **{'model.scan_layers': True})
  unrolled = family_config('gpt', **overrides)
  straight, switched = str(tmp_path / 'straight'), str(tmp_path / 'switched')
  loop.train_and_evaluate(scanned, straight)
  shutil.copytree(straight, switched)
  shutil.rmtree(os.path.join(switched, 'checkpoints', '8'))
  want = evaluate.evaluate(scanned, switched, step=4)
  got = evaluate.evaluate(unrolled, switched, step=4)   # a scanned checkpoint, read unrolled
  assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)
  loop.train_and_evaluate(unrolled, switched)            # resumed at step 4, unrolled, to step 8
  last = lambda run: [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))][-1]
  assert last(switched)['split'] == 'eval' and last(switched)['loss'] == pytest.approx(last(straight)['loss'],
                                                                                      rel=1e-4)
  # Fine-tuning reads the scanned checkpoint into unrolled blocks (and the other way round).
  exp = build_experiment(unrolled, family_data(unrolled).info)
  saved = exp.checkpoints(straight).restore(8, exp.abstract_state).params
  for config in (unrolled, scanned):
    with config.unlocked():
      config.init_from = straight
    fresh = build_experiment(config, family_data(config).info)
    variables = fresh.task.variables(fresh.init_state())
    restored = finetune.initial_variables(config, variables)['params']
    assert protocol.layout(protocol.path_names(k) for k, _ in jax.tree_util.tree_flatten_with_path(restored)[0]) \
        == ('scanned' if config.model.scan_layers else 'unrolled')
    jax.tree.map(np.testing.assert_array_equal, protocol.to_layout(restored, 'unrolled'), saved)

  out = str(tmp_path / 'export')
  evaluate.export(scanned, straight, out)
  params, config = export_lib.load(out)
  assert 'block_1' in params and 'blocks' not in params and config['model']['scan_layers'] is False
